"""Backend slots shared by a consumer's lanes, interactive work first.

The backend (vLLM's continuous batching) is kept at `total` requests at once.
Batch work may use all but `reserved_for_interactive` of them, and waits while
interactive work is waiting, so a bulk job never delays a researcher's chat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from broker.messages import Lane


class BackendSlots:
    def __init__(self, total: int, reserved_for_interactive: int) -> None:
        self.total = total
        self.batch_limit = max(1, total - reserved_for_interactive)
        self.in_use = 0
        self._interactive_waiting = 0
        self._changed = asyncio.Event()  # set, and replaced, at every change a waiter may care about

    def _free_for(self, lane: Lane) -> bool:
        if lane is Lane.INTERACTIVE:
            return self.in_use < self.total
        return self._interactive_waiting == 0 and self.in_use < self.batch_limit

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def hold(self, lane: Lane) -> AsyncIterator[None]:
        """A slot for `lane` while in the block. Only the wait can be interrupted: a slot is
        taken and given back with no await between, so a cancel never loses one."""
        if lane is Lane.INTERACTIVE:
            self._interactive_waiting += 1
        try:
            while not self._free_for(lane):
                await self._changed.wait()
        finally:
            if lane is Lane.INTERACTIVE:
                self._interactive_waiting -= 1
                self._notify()  # batch work may have waited behind this one
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._notify()

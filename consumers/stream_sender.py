"""Sending a stream's events to the caller as they come, coalescing only under load.

The reader hands over each event as soon as the backend produced it; a frame goes out at
once when none is on its way. While one is (a publisher confirm takes a moment, more so
under load), what arrives meanwhile waits and leaves in the next frame together: one
stream sees no added delay, a thousand streams still send few messages. `min_gap_s`
(`stream_flush_ms`) can space a stream's frames further apart, never holding an event
longer than that.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker.messages import ChunkBatch
from consumers.replies import ReplySender


class StreamSender:
    def __init__(
        self, replies: ReplySender, request_id: str, attempt: str, min_gap_s: float, on_sent: Callable[[], None]
    ) -> None:
        self._replies = replies
        self._request_id = request_id
        self._attempt = attempt
        self._min_gap_s = min_gap_s
        self._on_sent = on_sent
        self._events: list[bytes] = []
        self._wake = asyncio.Event()
        self._finishing = False
        self.seq = 0  # frames sent so far
        self._task = asyncio.ensure_future(self._run())

    def put(self, events: list[bytes]) -> None:
        """Queue events for the caller; raises what stopped the sending (the caller gone, say)."""
        if self._task.done():
            self._task.result()
        if events:
            self._events.extend(events)
            self._wake.set()

    async def finish(self) -> bytes:
        """Stop sending once the frame on its way is confirmed; return what was not sent yet
        (it travels in the final frame: one message less)."""
        self._finishing = True
        self._wake.set()
        await self._task
        rest = b"".join(self._events)
        self._events.clear()
        return rest

    def cancel(self) -> None:
        self._task.cancel()

    async def _run(self) -> None:
        sent_at = float("-inf")
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._finishing:
                return
            if (gap := self._min_gap_s - (time.monotonic() - sent_at)) > 0:
                await asyncio.sleep(gap)
                if self._finishing:
                    return
            if not self._events:
                continue
            batch = b"".join(self._events)
            self._events.clear()
            await self._replies.send(ChunkBatch(self._request_id, self._attempt, self.seq, batch))
            self.seq += 1
            sent_at = time.monotonic()
            self._on_sent()

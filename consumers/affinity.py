"""An agent's affinity queues: the requests the API placed on this agent for its KV cache.

The consumer takes them first (a slot, if one frees before the request's spill
deadline), and hands on to the model's shared queue, through the affinity queue's
dead-lettering, whatever it cannot serve: a request still waiting for a slot at its
spill deadline, one handed back (a drain, a backend lost), and on a drain every request
still queued, so none waits for a consumer that is leaving. Requests nobody takes
spill by themselves (their per-message TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from broker import topology
from broker.messages import Lane
from consumers.slots import BackendSlots

log = structlog.get_logger("hotq.consumer")

SPILLED_RETURNS = 3  # well under the delivery limit, which dead-letters a request
SPILLED_SLOT_WAIT_S = 0.05


class AffinityIntake:
    def __init__(self, model: str, agent_id: str, spill_after_ms: dict[Lane, int]) -> None:
        self.model = model
        self.agent_id = agent_id
        self._spill_after_s = {lane: ms / 1000 for lane, ms in spill_after_ms.items()}
        self._names = {topology.affinity_queue_name(model, lane, agent_id) for lane in Lane}
        self._queues: list[AbstractQueue] = []
        self._declared_on: list[tuple[AbstractChannel, Lane]] = []
        self.taken = 0  # requests served from this agent's affinity queues
        self.spilled_in = 0  # requests served here after spilling from an affinity queue (any agent's)

    async def declare(self, channel: AbstractChannel, lane: Lane) -> AbstractQueue:
        queue = await topology.declare_affinity_queue(channel, self.model, lane, self.agent_id)
        self._queues.append(queue)
        self._declared_on.append((channel, lane))
        return queue

    async def redeclare(self) -> None:
        """Declare the queues again before consuming them again: a pause longer than their
        `x-expires` (a backend that took long to restart) lets RabbitMQ delete them."""
        for channel, lane in self._declared_on:
            await topology.declare_affinity_queue(channel, self.model, lane, self.agent_id)

    def placed_here(self, message: AbstractIncomingMessage) -> bool:
        return message.routing_key in self._names and not message.headers.get("x-death")

    def count(self, message: AbstractIncomingMessage) -> None:
        """Count a delivery about to be served: an affinity hit, or a spill served here."""
        if self.placed_here(message):
            self.taken += 1
        elif spilled(message):
            self.spilled_in += 1

    @contextlib.asynccontextmanager
    async def slot(self, slots: BackendSlots, message: AbstractIncomingMessage, lane: Lane) -> AsyncIterator[bool]:
        """Hold a backend slot while in the block (True), or give up (False: hand it on): a request
        placed here at its spill deadline (to the shared queue); a request that spilled out of an
        affinity queue at once if no slot is free, its first `SPILLED_RETURNS` times (back to the
        shared queue, where a free agent takes it rather than wait behind this busy one)."""
        deadline = None
        if self.placed_here(message):
            deadline = self._spill_deadline(message, lane)
        elif spilled(message) and _delivery_count(message) < SPILLED_RETURNS:
            deadline = asyncio.get_running_loop().time() + SPILLED_SLOT_WAIT_S
        async with contextlib.AsyncExitStack() as held:
            try:
                async with asyncio.timeout_at(deadline):
                    await held.enter_async_context(slots.hold(lane))
            except TimeoutError:
                yield False
                return
            yield True

    def _spill_deadline(self, message: AbstractIncomingMessage, lane: Lane) -> float:
        """The event loop's time at which the request should go to the shared queue: when its
        placer said (clocks differ between nodes: never later than a full spill delay from now)."""
        longest = self._spill_after_s[lane]
        spill_at = message.headers.get(topology.SPILL_AT_HEADER)
        wait = min(longest, float(spill_at) - time.time()) if isinstance(spill_at, int | float) else longest
        return asyncio.get_running_loop().time() + max(0.0, wait)

    async def spill_waiting(self) -> int:
        """Hand every request still queued here on to the shared queue (the agent stops taking work)."""
        moved = 0
        for queue in self._queues:
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                await message.nack(requeue=False)  # dead-lettered to the shared queue, at least once
                moved += 1
        if moved:
            log.info("affinity_queue_spilled", requests=moved)
        return moved


def spilled(message: AbstractIncomingMessage) -> bool:
    """Whether the request came to its shared queue out of an affinity queue."""
    deaths = message.headers.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return False
    first = deaths[0]
    return isinstance(first, dict) and ".agent." in str(first.get("queue", ""))


def _delivery_count(message: AbstractIncomingMessage) -> int:
    count = message.headers.get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0


def maybe_started(message: AbstractIncomingMessage) -> bool:
    """Whether a consumer may have started this request before (its caller waits for it, and a
    stream may have sent output): a redelivery, or a spill (dead-lettering resets `redelivered`:
    a request handed back, or returned by a consumer that died, arrives in the shared queue as new)."""
    return message.redelivered or spilled(message)

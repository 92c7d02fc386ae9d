"""Every delivery a consumer holds, from receipt to settlement: settled exactly once.

One task serves each delivery and returns how to settle it (`Settlement`); the task's
done callback settles it, in a task of its own that nothing cancels. A done callback runs
once whatever ends the task: a result, an exception, or a cancel, even one that came
before the task's first step (a coroutine cancelled before it starts runs none of its
own code, no `finally` included, so settling inside it cannot be relied on). Settling in
one place also means a delivery is never acked twice (a second ack of a delivery tag
makes RabbitMQ close the channel, handing back every other delivery on it).

Each delivery holds one prefetch place until it is settled; a slot of the backend is
held by its task (`BackendSlots`) and comes back when the task ends.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Coroutine
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from consumers.dead_letters import dead_letter

log = structlog.get_logger("hotq.consumer")


class Settlement(enum.Enum):
    ACK = "ack"  # done with it: answered, dropped, or nobody waits for it any more
    REQUEUE = "requeue"  # someone should serve it (again)
    DEAD_LETTER = "dead_letter"  # unreadable, or the consumer failed on it: for an operator
    SPILL = "spill"  # out of an affinity queue to the model's shared queue: another agent may serve it


class Delivery:
    """One delivery and the task serving it."""

    def __init__(self, message: AbstractIncomingMessage, request_id: str, on_settled: Callable[[], None]) -> None:
        self.message = message
        self.on_settled = on_settled  # its prefetch place is free again
        self.request_id = request_id
        self.cancelled_by_client = False
        self.movable: Callable[[], bool] = lambda: True  # another consumer can take it over now
        self.dead_reason = "the consumer failed on it"  # why, if it is dead-lettered (broker/WIRE.md)
        self.task: asyncio.Task[Settlement] | None = None
        self.settled: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def channel_gone(self) -> bool:
        """Its channel closed (a lost connection): RabbitMQ has handed the delivery back already."""
        try:
            return self.message.channel.is_closed
        except aio_pika.exceptions.ChannelInvalidStateError:
            return True


Serve = Callable[[Delivery], Coroutine[Any, Any, Settlement]]


class Deliveries:
    def __init__(self, spills: Callable[[AbstractIncomingMessage], bool] = lambda _message: False) -> None:
        """`spills`: whether a delivery handed back goes on to its shared queue (out of an affinity
        queue, by rejecting it) rather than back into its own queue."""
        self._spills = spills
        self._open: set[Delivery] = set()
        self._serving: dict[str, Delivery] = {}  # the newest delivery of each request, for cancels

    def __len__(self) -> int:
        return len(self._open)

    def take(
        self, message: AbstractIncomingMessage, request_id: str, serve: Serve, on_settled: Callable[[], None]
    ) -> None:
        delivery = Delivery(message, request_id, on_settled)
        self._open.add(delivery)
        self._serving[request_id] = delivery  # a redelivery of the same request replaces an older one
        delivery.task = asyncio.create_task(serve(delivery))
        delivery.task.add_done_callback(lambda task: self._done(delivery, task))

    def cancel_by_client(self, request_id: str) -> bool:
        """Stop serving this request (its client left); False if no delivery of it is held."""
        delivery = self._serving.get(request_id)
        if delivery is None or delivery.task is None or delivery.task.done():
            return False
        delivery.cancelled_by_client = True
        delivery.task.cancel()
        return True

    async def requeue_all(self) -> None:
        """Stop serving every delivery now and hand it back (unless its client left meanwhile)."""
        await self.drain(grace_s=0)

    async def drain(self, grace_s: float) -> None:
        """Hand back at once the deliveries another consumer can take over, let the others being
        served finish within `grace_s`, hand back the rest, and return once every one is settled."""
        tasks = []
        for delivery in self._open:
            if delivery.task is None or delivery.task.done():
                continue
            if delivery.movable():
                delivery.task.cancel()  # a cancel that is not the client's hands the delivery back
            else:
                tasks.append(delivery.task)
        if tasks and grace_s > 0:
            await asyncio.wait(tasks, timeout=grace_s)
        for task in tasks:
            task.cancel()  # a cancel that is not the client's hands the delivery back
        await asyncio.gather(*(delivery.settled for delivery in list(self._open)), return_exceptions=True)

    def _done(self, delivery: Delivery, task: asyncio.Task[Settlement]) -> None:
        if self._serving.get(delivery.request_id) is delivery:
            del self._serving[delivery.request_id]
        if task.cancelled():
            settlement = Settlement.ACK if delivery.cancelled_by_client else Settlement.REQUEUE
        elif (error := task.exception()) is not None:
            log.error("delivery_failed", request_id=delivery.request_id, exc_info=error)
            delivery.dead_reason = f"the consumer failed on it: {error!r}"
            settlement = Settlement.DEAD_LETTER
        else:
            settlement = task.result()
        if settlement is Settlement.REQUEUE and self._spills(delivery.message):
            settlement = Settlement.SPILL
        settling = asyncio.ensure_future(_settle(delivery.message, settlement, delivery.dead_reason))
        settling.add_done_callback(lambda _: self._closed(delivery))

    def _closed(self, delivery: Delivery) -> None:
        self._open.discard(delivery)
        delivery.settled.set_result(None)
        delivery.on_settled()


async def _settle(message: AbstractIncomingMessage, settlement: Settlement, dead_reason: str) -> None:
    """Ack, requeue or dead-letter (with `dead_reason`); a delivery whose channel closed is back in
    its queue already."""
    try:
        if settlement is Settlement.ACK:
            await message.ack()
        elif settlement is Settlement.REQUEUE:
            await message.nack(requeue=True)
        elif settlement is Settlement.SPILL:
            await message.nack(requeue=False)  # the affinity queue dead-letters it to the shared queue
        else:
            await dead_letter(message, dead_reason)
    except (aio_pika.exceptions.ChannelInvalidStateError, aio_pika.exceptions.AMQPError, ConnectionError) as exc:
        log.info("delivery_already_returned", settlement=settlement.value, error=repr(exc))

"""How much a consumer's queues may send it: prefetch dealt from free backend slots, across all its queues.

RabbitMQ fixes a consumer's prefetch when it starts consuming (`basic.qos` only changes the consumers
started after it; checked on 3.10), and quorum queues refuse a channel-wide prefetch (a connection
error). With a prefetch of `max_inflight` on each of its queues, a consumer could hold several times
what its backend runs, and that work would wait here while another agent idles.

So each queue is consumed through grants: a `basic.consume` with prefetch k, for which RabbitMQ never
lets more than k deliveries be unsettled. Grants are dealt from `limit = max_inflight + number of
queues`: every queue keeps a grant of at least one, so its work is seen without polling, and the rest
goes to the queues that used theirs up. A used-up grant gets credit back with each ack, which is right
while its queue is the only one that wants more (no churn under a steady load); when another queue
wants room too, it is cancelled (acks of a cancelled consumer's deliveries give credit to nobody) and
the room freed is dealt again. The deliveries held never exceed the limit, so while the backend is
full at most one per queue waits for a slot. Batch grants stop at the batch lane's own limit plus
one, so batch work never takes the interactive reservation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import math
import uuid
from collections.abc import Callable

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustQueue

from broker.messages import Lane
from consumers.slots import BackendSlots

log = structlog.get_logger("hotq.consumer")

# A channel that closed under a call: its consumers are gone with it.
_CHANNEL_LOST = (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError, ConnectionError)

# Hands a delivery on, with what to call once it is settled.
Take = Callable[[AbstractIncomingMessage, Callable[[], None]], None]


@dataclasses.dataclass(eq=False)
class _Source:
    queue: AbstractRobustQueue
    lane: Lane
    current: _Grant | None = None  # the grant not (yet) being cancelled
    hungry: bool = False  # its last grant was used up: it has more work than that


@dataclasses.dataclass(eq=False)
class _Grant:
    source: _Source
    size: int
    tag: str
    open: bool = True  # until its cancel is answered RabbitMQ may still deliver up to `size`
    unsettled: int = 0
    channel_generation: int | None = None  # the channel it consumes on (None: being opened)

    @property
    def committed(self) -> int:
        """Deliveries it holds or may still bring."""
        return max(self.size, self.unsettled) if self.open else self.unsettled


class Intake:
    """The grants of one consumer's queues on one channel; `take` gets every delivery."""

    def __init__(self, channel: AbstractRobustChannel, slots: BackendSlots, take: Take) -> None:
        self._channel = channel
        self._slots = slots
        self._take = take
        self._sources: list[_Source] = []
        self._grants: set[_Grant] = set()
        self._tags = (f"hotq-{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())
        self._paused = True
        self._lock = asyncio.Lock()  # one change of grants at a time (set_qos then consume)
        self._wake = asyncio.Event()
        self._dealer: asyncio.Task[None] | None = None
        self._channel_generation = 0  # one more at each reconnect

    def add(self, queue: AbstractRobustQueue, lane: Lane) -> None:
        """Consume `queue` too (before `resume`). Sources are served in the order added within a lane."""
        self._sources.append(_Source(queue, lane))

    @property
    def limit(self) -> int:
        return self._slots.total + len(self._sources)

    def start(self) -> None:
        self._channel.reopen_callbacks.add(self._reopened)
        self._dealer = asyncio.create_task(self._deal_forever())

    async def resume(self) -> None:
        self._paused = False
        self._wake.set()

    async def pause(self) -> None:
        """Take no new deliveries: cancel every grant (deliveries held go on)."""
        async with self._lock:
            self._paused = True
            for source in self._sources:
                if source.current is not None:
                    await self._cancel(source.current)

    async def close(self) -> None:
        await self.pause()
        if self._dealer is not None:
            self._dealer.cancel()
        self._channel.reopen_callbacks.discard(self._reopened)

    async def _deal_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._lock:
                    if not self._paused:
                        await self._deal()
            except _CHANNEL_LOST as exc:  # `_reopened` deals again
                log.info("intake_deal_interrupted", error=repr(exc))

    async def _deal(self) -> None:
        wanting = [source for source in self._sources if source.current is None or _used_up(source.current)]
        if self._room(Lane.INTERACTIVE) <= 0 and any(self._under_lane_limit(source.lane) for source in wanting):
            # Room left unused on queues that ran dry while another queue wants some: take it back.
            for source in list(self._sources):
                grant = source.current
                if grant is not None and 1 < grant.size and grant.unsettled < grant.size:
                    await self._cancel(grant)
        # A used-up grant gets its credit back from RabbitMQ at each ack. That is right while its
        # queue alone wants more and its lane has no more room; else it stops, and the room is
        # dealt again, interactive first.
        used_up = [source.current for source in self._sources if source.current and _used_up(source.current)]
        if used_up and (len(wanting) > 1 or self._room(used_up[0].source.lane) > 0):
            for grant in used_up:
                grant.source.hungry = True
                await self._cancel(grant)
        await self._deal_room()

    async def _deal_room(self) -> None:
        # First a grant of one for each queue with none, so its work is seen; then the rest to the
        # queues that used theirs up, interactive first and evenly between them.
        for source in list(self._sources):
            if source.current is None and not source.hungry and self._room(source.lane) > 0:
                await self._open(source, 1)
        hungry = [source for source in self._by_priority() if source.current is None and source.hungry]
        for index, source in enumerate(hungry):
            room = self._room(source.lane)
            if room > 0:
                share = math.ceil(self._room(Lane.INTERACTIVE) / (len(hungry) - index))  # of the room of all lanes
                await self._open(source, max(1, min(room, share)))

    def _under_lane_limit(self, lane: Lane) -> bool:
        """The batch lane has a limit of its own: past it, taking room back from other queues is no help."""
        return lane is Lane.INTERACTIVE or self._batch_room() > 0

    def _by_priority(self) -> list[_Source]:
        """Interactive sources first; the one served last goes to the end of its lane's turn."""
        return sorted(self._sources, key=lambda source: source.lane is not Lane.INTERACTIVE)

    def _room(self, lane: Lane) -> int:
        room = self.limit - sum(grant.committed for grant in self._grants)
        return min(room, self._batch_room()) if lane is Lane.BATCH else room

    def _batch_room(self) -> int:
        return self._slots.batch_limit + 1 - sum(g.committed for g in self._grants if g.source.lane is Lane.BATCH)

    async def _open(self, source: _Source, size: int) -> None:
        grant = _Grant(source, size, next(self._tags))
        source.current = grant
        source.hungry = False
        self._grants.add(grant)
        try:
            await self._channel.set_qos(prefetch_count=size)  # for the consumer started next
            # Not robust: after a reconnect `_reopened` deals afresh instead of restoring old grants.
            await source.queue.consume(functools.partial(self._delivered, grant), consumer_tag=grant.tag, robust=False)
        except BaseException:
            self._closed(grant)
            raise
        # A consume that waited out a reconnect ran on the new channel: it belongs to that one.
        grant.channel_generation = self._channel_generation
        # A move to the back of the turn, so that queues of one lane share the room.
        self._sources.remove(source)
        self._sources.append(source)

    async def _cancel(self, grant: _Grant) -> None:
        if grant.source.current is grant:
            grant.source.current = None
        try:
            await grant.source.queue.cancel(grant.tag)  # waits for cancel-ok: deliveries before it still come
        except _CHANNEL_LOST:
            pass
        finally:
            self._closed(grant)

    def _closed(self, grant: _Grant) -> None:
        grant.open = False
        if grant.source.current is grant:
            grant.source.current = None
        if grant.unsettled == 0:
            self._grants.discard(grant)

    async def _delivered(self, grant: _Grant, message: AbstractIncomingMessage) -> None:
        grant.unsettled += 1
        if grant.unsettled >= grant.size:
            self._wake.set()
        self._take(message, functools.partial(self._settled, grant))

    def _settled(self, grant: _Grant) -> None:
        grant.unsettled -= 1
        if not grant.open and grant.unsettled == 0:
            self._grants.discard(grant)
        self._wake.set()

    def _reopened(self, channel: AbstractRobustChannel | None, /) -> None:
        """A new channel after a lost connection: the old one's consumers are gone, deal again.
        A grant still being opened is left alone: its consume goes to the new channel."""
        self._channel_generation += 1
        for grant in list(self._grants):
            if grant.channel_generation is not None and grant.channel_generation < self._channel_generation:
                self._closed(grant)
        self._wake.set()


def _used_up(grant: _Grant) -> bool:
    return grant.unsettled >= grant.size

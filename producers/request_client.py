"""The API process's request/reply client over RabbitMQ.

One connection, one publishing channel with publisher confirms (renewed when RabbitMQ nacks:
broker/publisher.py), and one reply queue per process. Each submitted request gets an
`asyncio.Queue` of reply frames keyed by its request id (the correlation id); the reply
consumer routes frames there. Like aio-pika's RPC pattern, publishes are `mandatory`, and every
pending request fails when the connection drops, because replies published while the broker was
away may be gone (the reply queue lives on the node the process is connected to). After a
reconnect the process consumes a reply queue of a new name (see `_open_reply_queue`), and a
request is published only while a reply queue's consumer is in place.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from broker import messages, topology
from broker.connection import plain_channel
from broker.errors import BrokerUnavailable, HotqError, WireError
from broker.messages import Abandoned, Cancel, Control, Final, Lane, ReplyFrame, RequestEnvelope, Resuming
from broker.publisher import ConfirmingPublisher
from producers.placement import Placed

log = structlog.get_logger("hotq.producer")

STATS_TIMEOUT_S = 1.0
RECONNECT_WAIT_S = 5.0  # how long a request waits for a dropped broker connection to come back
ABANDONED_REMEMBERED = 10_000  # abandoned requests whose token count may still come ...
ABANDONED_WAIT_S = 60.0  # ... and for how long (a consumer answers a cancel within moments)

_CONNECTION_ERRORS = (
    aio_pika.exceptions.AMQPConnectionError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
)

# Anything put on a pending queue: a reply frame, or the error that ends the wait.
ReplyItem = ReplyFrame | HotqError


@dataclass(frozen=True, slots=True)
class QueueStats:
    messages: int
    consumers: int


class RequestClient:
    """Publishes request envelopes and hands each caller the frames of its reply."""

    def __init__(
        self, connection: AbstractRobustConnection, models: list[str], pinned: dict[str, list[str]] | None = None
    ) -> None:
        self._connection = connection
        self._models = models
        self._pinned = pinned or {}  # model -> clusters its requests may be pinned to
        self._reply_queue_prefix = (
            f"{topology.REPLY_QUEUE_PREFIX}{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        )
        self._reply_queue_name = self._reply_queue_prefix
        self._connections = itertools.count(1)  # the reply queue's name, one per connection made
        self._reply_channel: AbstractChannel | None = None
        self._pending: dict[str, asyncio.Queue[ReplyItem]] = {}
        # Abandoned requests whose token count is awaited: (since, callback), oldest first.
        self._on_abandoned: collections.OrderedDict[str, tuple[float, Callable[[dict[str, int] | None], object]]] = (
            collections.OrderedDict()
        )
        self._channel: AbstractChannel | None = None
        self._requests_out: ConfirmingPublisher | None = None
        self._reply_consumer_ready = asyncio.Event()  # unset while the connection is away
        self._control_exchange: AbstractExchange | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def connection(self) -> AbstractRobustConnection:
        """The process's one connection, for others in the process to open their channels on."""
        return self._connection

    @classmethod
    async def open(
        cls, connection: AbstractRobustConnection, models: list[str], pinned: dict[str, list[str]] | None = None
    ) -> RequestClient:
        """A client on the process's connection (which it leaves open when it closes)."""
        client = cls(connection, models, pinned)
        try:
            await client._start()
        except aiormq.exceptions.ChannelAccessRefused as exc:
            await client._close_channel()
            # The api role may not create request queues (RabbitMQ wants read permission on a
            # queue to declare it with a dead-letter exchange): the scaler's role creates them.
            raise BrokerUnavailable(
                f"RabbitMQ refused the api role: {exc}; are the request queues declared (start the scaler)?"
            ) from exc
        except BaseException:
            await client._close_channel()
            raise
        return client

    @property
    def reply_queue_name(self) -> str:
        return self._reply_queue_name

    async def _start(self) -> None:
        # on_return_raises: a mandatory publish nobody can route fails the await.
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        await topology.declare_model_queues(channel, self._models, pinned=self._pinned)
        self._requests_out = await ConfirmingPublisher.open(self._connection, topology.REQUEST_EXCHANGE)
        self._control_exchange = await channel.get_exchange(topology.CONTROL_EXCHANGE)
        await self._open_reply_queue()
        self._connection.close_callbacks.add(self._on_connection_lost)
        self._connection.reconnect_callbacks.add(self._on_reconnected)

    async def _open_reply_queue(self) -> None:
        """Consume a reply queue of a new name, on a channel of its own; then requests may go out.

        A new name on every connection, not the robust connection's re-declaration of the old one:
        when the node holding the old queue dies, its record lingers for a moment on the survivors,
        and a process that reconnects at once could declare and consume "it" there, then lose it
        (binding, consumer and all) when the survivors remove the dead node's queues: every answer
        would be returned from then on. Replies are not acked one by one: a lost reply fails its
        request anyway."""
        name = f"{self._reply_queue_prefix}.{next(self._connections)}"
        channel = await plain_channel(self._connection)  # not restored: after a reconnect, a new one here
        queue = await channel.declare_queue(name, arguments={"x-expires": topology.REPLY_QUEUE_EXPIRES_MS})
        await topology.bind_reply_queue(channel, queue)
        await queue.consume(self._on_reply, no_ack=True)
        self._reply_channel, self._reply_queue_name = channel, name
        self._reply_consumer_ready.set()

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            frame = messages.decode_as(message.body, ReplyFrame | Abandoned)
        except WireError as exc:
            log.warning("reply_undecodable", error=exc.message, correlation_id=message.correlation_id)
            return
        if isinstance(frame, Abandoned | Final) and frame.request_id in self._on_abandoned:
            _, on_usage = self._on_abandoned.pop(frame.request_id)
            on_usage(frame.usage)
            return
        pending = self._pending.get(frame.request_id)
        if pending is not None:  # otherwise the caller already finished or gave up
            pending.put_nowait(frame)
        elif isinstance(frame, Resuming):  # a stream nobody waits for any more: it must not go on
            task = asyncio.ensure_future(self.control(Cancel(frame.request_id)))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _on_reconnected(self, *_: object) -> None:
        task = asyncio.ensure_future(self._reopen_reply_queue())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reopen_reply_queue(self) -> None:
        try:
            await self._open_reply_queue()
        except (*_CONNECTION_ERRORS, aio_pika.exceptions.AMQPError) as exc:
            # Lost again meanwhile: the next reconnect opens one. Requests wait, then get 503.
            log.warning("reply_queue_not_opened", error=repr(exc))
            return
        log.info("reply_queue_opened", reply_queue=self._reply_queue_name)

    def _on_connection_lost(self, _sender: object, exc: BaseException | None) -> None:
        self._reply_consumer_ready.clear()
        if not self._pending:
            return
        log.warning("broker_connection_lost", pending=len(self._pending), error=str(exc))
        for pending in self._pending.values():
            pending.put_nowait(BrokerUnavailable("lost the connection to RabbitMQ while waiting for the answer"))

    async def submit(
        self, envelope: RequestEnvelope, cluster: str | None = None, placed: Placed | None = None
    ) -> asyncio.Queue[ReplyItem]:
        """Publish a request (confirmed, mandatory), pinned to `cluster` if given, else into the
        affinity queue it was `placed` in (if that queue is gone, the shared one); return the
        queue its reply frames arrive on.

        The caller must call `release` when done with the request.
        """
        if self._requests_out is None:
            raise BrokerUnavailable("not connected to RabbitMQ")
        replies: asyncio.Queue[ReplyItem] = asyncio.Queue()
        self._pending[envelope.request_id] = replies
        body = messages.encode(envelope)

        def message() -> aio_pika.Message:
            """The request as it goes out now: its answer to the reply queue of the connection it takes."""
            return aio_pika.Message(
                body=body,
                content_type=messages.CONTENT_TYPE,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                correlation_id=envelope.request_id,
                message_id=envelope.request_id,
                reply_to=self._reply_queue_name,
                # Past its deadline nobody waits for the answer: RabbitMQ may drop it even unconsumed.
                # (Not the shorter queue-wait limit: a request handed back after a drain must survive.)
                expiration=max(1.0, envelope.deadline - time.time()),
            )

        routing_key = topology.request_queue_name(envelope.model, envelope.lane, cluster)
        try:
            await self._wait_usable()  # an answer needs the reply queue: not before it is back
            try:
                if placed is None or not await self._publish_placed(message(), placed):
                    await self._requests_out.publish(message(), routing_key, mandatory=True)
            except _CONNECTION_ERRORS:
                # The connection dropped under us (a broker restart, a forced close): wait for the
                # robust connection and its new reply queue, and publish once more (naming that
                # queue). The first copy may have landed too; its answer goes to the old queue.
                await self._wait_usable()
                replies = self._pending[envelope.request_id] = asyncio.Queue()
                await self._requests_out.publish(message(), routing_key, mandatory=True)
        except aiormq.exceptions.DeliveryError as exc:
            self.release(envelope.request_id)
            returned = isinstance(exc.frame, aiormq.spec.Basic.Return)
            reason = "no queue for this model" if returned else "RabbitMQ refused the request (queue full?)"
            raise BrokerUnavailable(f"could not enqueue the request: {reason}") from exc
        except (*_CONNECTION_ERRORS, BrokerUnavailable) as exc:
            self.release(envelope.request_id)
            raise BrokerUnavailable(f"could not reach RabbitMQ: {exc!r}") from exc
        return replies

    async def _publish_placed(self, message: aio_pika.Message, placed: Placed) -> bool:
        """Publish into an affinity queue, spilling after its delay (or at the deadline, if sooner);
        False if RabbitMQ has no such queue (its agent left long ago)."""
        assert self._requests_out is not None
        deadline_ms = message.expiration * 1000 if isinstance(message.expiration, int | float) else None
        placed_message = aio_pika.Message(
            body=message.body,
            content_type=message.content_type,
            delivery_mode=message.delivery_mode,
            correlation_id=message.correlation_id,
            message_id=message.message_id,
            reply_to=message.reply_to,
            headers={topology.SPILL_AT_HEADER: placed.spill_at},
            expiration=min(placed.spill_after_ms, deadline_ms or placed.spill_after_ms) / 1000,
        )
        try:
            await self._requests_out.publish(placed_message, placed.queue, mandatory=True)
        except aiormq.exceptions.DeliveryError as exc:
            if isinstance(exc.frame, aiormq.spec.Basic.Return):
                log.info("affinity_queue_gone", queue=placed.queue)
                return False
            raise
        return True

    async def _wait_usable(self) -> None:
        """Until the connection is back with the reply queue's consumer (at most RECONNECT_WAIT_S)."""
        if self._reply_consumer_ready.is_set():
            return  # the usual case, on every request: no timer to arm
        try:
            async with asyncio.timeout(RECONNECT_WAIT_S):
                await self._reply_consumer_ready.wait()
        except TimeoutError:
            raise BrokerUnavailable("RabbitMQ is unreachable; retry shortly") from None

    def release(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def abandon(self, request_id: str, on_usage: Callable[[dict[str, int] | None], object] | None) -> None:
        """Release a request whose caller left before its answer was relayed. `on_usage` gets the
        backend's token count: from the `Final` if the answer came after all (already queued, or
        still on its way), else from the consumer's `Abandoned` once `cancel` has reached it."""
        pending = self._pending.pop(request_id, None)
        if on_usage is None:
            return
        while pending is not None and not pending.empty():
            frame = pending.get_nowait()
            if isinstance(frame, Final):
                on_usage(frame.usage)
                return
        now = time.monotonic()
        self._on_abandoned[request_id] = (now, on_usage)
        while self._on_abandoned:  # requests whose consumer never answered (one that never started)
            oldest, _ = next(iter(self._on_abandoned.values()))
            if now - oldest < ABANDONED_WAIT_S and len(self._on_abandoned) <= ABANDONED_REMEMBERED:
                break
            self._on_abandoned.popitem(last=False)

    async def cancel(self, request_id: str) -> None:
        """Tell whichever consumer holds the request to abort it (best effort)."""
        await self.control(Cancel(request_id))

    async def control(self, record: Control) -> None:
        """Send every consumer `record` (a `Cancel`, or a `Resume` for the one that asked; best effort)."""
        if self._control_exchange is None:
            return
        try:
            await self._control_exchange.publish(
                aio_pika.Message(messages.encode(record)), routing_key="", mandatory=False
            )
        except _CONNECTION_ERRORS as exc:
            log.warning("control_not_sent", request_id=record.request_id, error=repr(exc))

    async def queue_stats(self, model: str, lane: Lane = Lane.INTERACTIVE) -> QueueStats | None:
        """Depth and consumer count of a model's queue, or None if RabbitMQ is unreachable."""
        if self._channel is None:
            return None
        try:
            async with asyncio.timeout(STATS_TIMEOUT_S):  # while reconnecting, say unknown at once
                messages_ready, consumers = await topology.queue_depth(self._channel, model, lane)
        except (*_CONNECTION_ERRORS, TimeoutError):
            return None
        return QueueStats(messages=messages_ready, consumers=consumers)

    async def close(self) -> None:
        for pending in self._pending.values():
            pending.put_nowait(BrokerUnavailable("the API is shutting down"))
        self._pending.clear()
        self._connection.close_callbacks.discard(self._on_connection_lost)
        self._connection.reconnect_callbacks.discard(self._on_reconnected)
        await self._close_channel()

    async def _close_channel(self) -> None:
        if self._reply_channel is not None:
            with contextlib.suppress(Exception):
                await self._reply_channel.close()
        if self._channel is not None:
            # Closed on purpose, so the robust connection does not reopen it (even one the broker
            # closed by refusing a declare).
            with contextlib.suppress(Exception):
                await self._channel.close()
        if self._requests_out is not None:
            with contextlib.suppress(Exception):
                await self._requests_out.close()

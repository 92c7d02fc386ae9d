"""A consumer of one model's request queues.

`start` consumes with a prefetch of `max_inflight`, so that many requests are in
the backend at once; `stop` cancels the consumers, lets in-flight requests finish
within a grace period and requeues the rest. A request is acked only after its
final frame is confirmed, so a consumer that dies mid-request has it redelivered.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection

from broker import messages, topology
from broker.errors import BackendError, WireError
from broker.messages import Cancel, Lane, RequestEnvelope, Started
from consumers.handler import BackendUnreachable, RequestHandler, error_frame
from consumers.replies import CallerGone, ReplySender

log = structlog.get_logger("hotq.consumer")

BACKEND_RETRY_PAUSE_S = 1.0  # before handing a request back when the backend is unreachable


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        model: str,
        handler: RequestHandler,
        max_inflight: int,
        lanes: tuple[Lane, ...] = (Lane.INTERACTIVE,),
    ) -> None:
        self.name = worker_name()
        self.model = model
        self._connection = connection
        self._handler = handler
        self._max_inflight = max_inflight
        self._lanes = lanes
        self._channel: AbstractChannel | None = None
        self._reply_exchange: AbstractExchange | None = None
        self._consumer_tags: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._cancelled_by_client: set[str] = set()
        self.served = 0

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.set_qos(prefetch_count=self._max_inflight)
        self._channel = channel
        self._reply_exchange = channel.default_exchange
        queues = await topology.declare_model_queues(channel, [self.model], self._lanes)
        control = await channel.get_exchange(topology.CONTROL_EXCHANGE)
        cancels = await channel.declare_queue(f"hotq.cancel.{self.name}", exclusive=True, auto_delete=True)
        await cancels.bind(control)
        await cancels.consume(self._on_cancel, no_ack=True)
        for queue in queues.values():
            self._consumer_tags.append((queue, await queue.consume(self._on_request)))
        log.info("worker_started", worker=self.name, model=self.model, max_inflight=self._max_inflight)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking work, let in-flight requests finish for `grace_s`, requeue the rest."""
        for queue, tag in self._consumer_tags:
            await queue.cancel(tag)
        self._consumer_tags.clear()
        tasks = list(self._inflight.values())
        if tasks:
            log.info("worker_draining", inflight=len(tasks), grace_s=grace_s)
            _, unfinished = await asyncio.wait(tasks, timeout=grace_s)
            for task in unfinished:
                task.cancel()  # _serve requeues a request cancelled this way
            await asyncio.gather(*unfinished, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()
        log.info("worker_stopped", worker=self.name, served=self.served)

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._serve(message))
        key = message.correlation_id or uuid.uuid4().hex
        self._inflight[key] = task
        task.add_done_callback(lambda _: self._inflight.pop(key, None))

    def _on_cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            cancel = messages.decode_as(message.body, Cancel)
        except WireError:
            return
        task = self._inflight.get(cancel.request_id)
        if task is not None:
            log.info("request_cancelled_by_client", request_id=cancel.request_id)
            self._cancelled_by_client.add(cancel.request_id)
            task.cancel()

    async def _serve(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = messages.decode_as(message.body, RequestEnvelope)
        except WireError as exc:
            log.error("request_undecodable", error=exc.message, message_id=message.message_id)
            await message.reject(requeue=False)  # to the dead-letter queue, for an operator
            return
        with structlog.contextvars.bound_contextvars(request_id=envelope.request_id, model=envelope.model):
            now = time.time()
            if now > envelope.start_by or now > envelope.deadline:
                log.info("request_expired", waited_s=round(now - envelope.submitted_at, 3))
                await message.ack()
                return
            if message.reply_to is None:
                await message.reject(requeue=False)
                return
            await self._serve_envelope(message, envelope, message.reply_to)

    async def _serve_envelope(self, message: AbstractIncomingMessage, envelope: RequestEnvelope, reply_to: str) -> None:
        assert self._reply_exchange is not None
        attempt = uuid.uuid4().hex[:12]
        replies = ReplySender(self._reply_exchange, reply_to, envelope.request_id)
        try:
            await replies.send(Started(envelope.request_id, attempt, self.name))
            await self._handler.serve(envelope, attempt, replies)
        except CallerGone:
            log.info("caller_gone")  # nobody waits for this answer any more
        except BackendUnreachable as exc:
            if _is_last_delivery(message):
                await replies.send(error_frame(envelope, attempt, BackendError(f"backend unreachable: {exc}", status=502)))
            else:
                log.warning("backend_unreachable_requeue", error=str(exc))
                await asyncio.sleep(BACKEND_RETRY_PAUSE_S)
                await message.nack(requeue=True)
                return
        except asyncio.CancelledError:
            if envelope.request_id in self._cancelled_by_client:
                self._cancelled_by_client.discard(envelope.request_id)
                await message.ack()
                return
            await message.nack(requeue=True)  # we are stopping: someone else serves it
            raise
        self.served += 1
        await message.ack()


def _is_last_delivery(message: AbstractIncomingMessage) -> bool:
    """Quorum queues count deliveries; past the limit RabbitMQ dead-letters the request."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return isinstance(count, int) and count + 1 >= topology.DELIVERY_LIMIT

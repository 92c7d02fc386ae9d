"""A consumer of one model's request queues.

`start` consumes the model's lanes (a channel each, so each has its own
prefetch) and keeps the backend at `max_inflight` requests through shared
`BackendSlots`; `pause`/`resume` stop and restart taking work (while the
backend restarts); `stop` cancels the consumers, lets in-flight requests finish
within a grace period and requeues the rest. A request is acked only after its
final frame is confirmed, so a consumer that dies mid-request has it redelivered.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid

import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)

from broker import messages, topology
from broker.errors import BackendError, WireError
from broker.messages import Cancel, Lane, RequestEnvelope, Started
from consumers.handler import BackendUnreachable, RequestHandler, error_frame
from consumers.replies import CallerGone, ReplySender
from consumers.slots import BackendSlots

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
        reserved_interactive: int = 0,
        lanes: tuple[Lane, ...] = (Lane.INTERACTIVE,),
        cluster: str | None = None,
    ) -> None:
        """`cluster`: also take the interactive requests pinned to this cluster."""
        self.name = worker_name()
        self.model = model
        self._connection = connection
        self._handler = handler
        self._slots = BackendSlots(max_inflight, reserved_interactive)
        self._lanes = lanes
        self._cluster = cluster
        self._channels: list[AbstractChannel] = []
        self._queues: list[AbstractQueue] = []
        self._consumer_tags: list[tuple[AbstractQueue, str]] = []
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._cancelled_by_client: set[str] = set()
        self.served = 0
        self.last_active = time.monotonic()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        for lane in self._lanes:
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            limit = self._slots.total if lane is Lane.INTERACTIVE else self._slots.batch_limit
            await channel.set_qos(prefetch_count=limit)
            pinned = {self.model: [self._cluster]} if self._cluster else None
            queues = await topology.declare_model_queues(channel, [self.model], (lane,), pinned)
            self._channels.append(channel)
            self._queues.extend(queues.values())
        control = await self._channels[0].get_exchange(topology.CONTROL_EXCHANGE)
        cancels = await self._channels[0].declare_queue(f"hotq.cancel.{self.name}", exclusive=True, auto_delete=True)
        await cancels.bind(control)
        await cancels.consume(self._on_cancel, no_ack=True)
        await self.resume()
        log.info("worker_started", worker=self.name, model=self.model, max_inflight=self._slots.total)

    async def resume(self) -> None:
        """Take work from every lane (again)."""
        if self._consumer_tags:
            return
        for queue in self._queues:
            self._consumer_tags.append((queue, await queue.consume(self._on_request)))

    async def pause(self) -> None:
        """Take no new work; requests already held go on."""
        for queue, tag in self._consumer_tags:
            await queue.cancel(tag)
        self._consumer_tags.clear()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking work, let in-flight requests finish for `grace_s`, requeue the rest."""
        await self.pause()
        tasks = list(self._inflight.values())
        if tasks:
            log.info("worker_draining", inflight=len(tasks), grace_s=grace_s)
            _, unfinished = await asyncio.wait(tasks, timeout=grace_s)
            for task in unfinished:
                task.cancel()  # _serve_envelope requeues a request cancelled this way
            await asyncio.gather(*unfinished, return_exceptions=True)
        for channel in self._channels:
            await channel.close()
        log.info("worker_stopped", worker=self.name, served=self.served)

    async def requeue_inflight(self) -> None:
        """Hand every held request back to the queue now (the backend is gone)."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_request(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.create_task(self._serve(message))
        key = message.correlation_id or os.urandom(16).hex()
        self._inflight[key] = task
        self.last_active = time.monotonic()

        def done(_: asyncio.Task[None]) -> None:
            self._inflight.pop(key, None)
            self.last_active = time.monotonic()

        task.add_done_callback(done)

    async def _on_cancel(self, message: AbstractIncomingMessage) -> None:
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
            if message.reply_to is None:
                log.error("request_without_reply_queue")
                await message.reject(requeue=False)
                return
            await self._serve_envelope(message, envelope, message.reply_to)

    async def _serve_envelope(self, message: AbstractIncomingMessage, envelope: RequestEnvelope, reply_to: str) -> None:
        """Serve one delivery, then settle it: ack when answered (or unanswerable), requeue otherwise."""
        replies = ReplySender(self._channels[0].default_exchange, reply_to, envelope.request_id)
        try:
            requeue = await self._attempt(message, envelope, replies)
        except asyncio.CancelledError:
            if replies.caller_gone or envelope.request_id in self._cancelled_by_client:
                self._cancelled_by_client.discard(envelope.request_id)
                await message.ack()  # nobody waits for this answer any more
                return
            await message.nack(requeue=True)  # stopping, or the backend went away: someone serves it later
            raise
        finally:
            replies.close()
        if requeue:
            await message.nack(requeue=True)
            return
        self.served += 1
        await message.ack()

    async def _attempt(self, message: AbstractIncomingMessage, envelope: RequestEnvelope, replies: ReplySender) -> bool:
        """Serve the request once; True if it should go back to the queue."""
        attempt = os.urandom(6).hex()
        try:
            async with self._slots.hold(envelope.lane):
                now = time.time()
                if now > envelope.start_by or now > envelope.deadline:
                    log.info("request_expired", waited_s=round(now - envelope.submitted_at, 3))
                    return False
                serving = asyncio.current_task()
                assert serving is not None
                replies.announce_later(Started(envelope.request_id, attempt, self.name), serving.cancel)
                await self._handler.serve(envelope, attempt, replies)
        except CallerGone:
            log.info("caller_gone")  # nobody waits for this answer any more
        except BackendUnreachable as exc:
            if not _is_last_delivery(message):
                log.warning("backend_unreachable_requeue", error=str(exc))
                # A pause, so that a dead backend does not spin requests through the queue.
                await asyncio.sleep(BACKEND_RETRY_PAUSE_S)
                return True
            error = BackendError(f"backend unreachable: {exc}", status=502)
            await replies.send(error_frame(envelope, attempt, error))
        return False


def _is_last_delivery(message: AbstractIncomingMessage) -> bool:
    """Quorum queues count deliveries; past the limit RabbitMQ dead-letters the request."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return isinstance(count, int) and count + 1 >= topology.DELIVERY_LIMIT

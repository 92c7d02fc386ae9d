"""A consumer of one model's request queues (run by `hotq agent` beside its backend, or alone by `hotq worker`).

`start` consumes the model's queues (its own affinity queues first, every lane, the queue pinned to its
cluster) on one channel, with prefetch dealt from free slots across all of them
(`Intake`), and keeps the backend at `max_inflight` requests through shared
`BackendSlots`; `pause`/`resume` stop and restart taking work (while the
backend restarts); `stop` cancels the consumers, lets in-flight requests finish
within a grace period and requeues the rest; what another consumer can take over
(non-streaming requests, streams it can continue) is handed back at once. A request is
acked only after its final frame is confirmed, so a consumer that dies mid-request has it
redelivered; a redelivered stream asks the API what its client already got
(`consumers/handover.py`) and goes on from there.
Each delivery is settled exactly once, however its serving ends (`Deliveries`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import cast

import aio_pika
import structlog
from aio_pika.abc import (
    AbstractIncomingMessage,
    AbstractRobustChannel,
    AbstractRobustConnection,
    AbstractRobustQueue,
)

from broker import messages, topology
from broker.errors import BackendError, DeadlineExceeded, HotqError, WireError, WorkerLost
from broker.messages import Abandoned, Cancel, Control, Lane, RequestEnvelope, Resume, Resuming, Started
from broker.publisher import ConfirmingPublisher
from consumers.affinity import AffinityIntake, maybe_started
from consumers.continuation import why_not_continuable
from consumers.deliveries import Deliveries, Delivery, Settlement
from consumers.handler import AttemptProgress, BackendUnreachable, RequestHandler, error_frame
from consumers.handover import ResumeWaits
from consumers.intake import Intake
from consumers.replies import CallerGone, ReplySender
from consumers.slots import BackendSlots
from consumers.usage_reporter import UsageReporter

log = structlog.get_logger("hotq.consumer")

BACKEND_RETRY_PAUSE_S = 1.0  # before handing a request back when the backend is unreachable
CANCELS_REMEMBERED = 10_000  # cancels for requests not held here, in case one is still queued


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Consumer:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        model: str,
        handler: RequestHandler,
        max_inflight: int,
        reserved_interactive: int = 0,
        lanes: tuple[Lane, ...] = (Lane.INTERACTIVE,),
        cluster: str | None = None,
        affinity: AffinityIntake | None = None,
    ) -> None:
        """`cluster`: also take the interactive requests pinned to this cluster; `affinity`: first
        take the requests placed on this agent, in its own queue per lane."""
        self.name = worker_name()
        self.model = model
        self._connection = connection
        self._handler = handler
        self._slots = BackendSlots(max_inflight, reserved_interactive)
        self._lanes = lanes
        self._cluster = cluster
        self._channel: AbstractRobustChannel | None = None
        self._intake: Intake | None = None
        self._replies_out: ConfirmingPublisher | None = None
        self._usage_out: ConfirmingPublisher | None = None
        self._usage: UsageReporter | None = None
        self.affinity = affinity
        self._deliveries = Deliveries(affinity.placed_here if affinity else lambda _message: False)
        self._cancelled_unseen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._resumes = ResumeWaits()
        self._stopping = False
        # Results queues of cancelled batches: their requests still queued are dropped, not served.
        self._cancelled_batches: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.served = 0
        self.last_active = time.monotonic()

    @property
    def inflight(self) -> int:
        """Requests in the backend now."""
        return self._slots.in_use

    @property
    def held(self) -> int:
        """Deliveries taken and not settled yet: in the backend, or waiting for a slot."""
        return len(self._deliveries)

    async def start(self) -> None:
        channel = self._channel = self._connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.initialize()
        pinned = {self.model: [self._cluster]} if self._cluster else None
        queues = await topology.declare_model_queues(channel, [self.model], self._lanes, pinned)
        self._intake = Intake(channel, self._slots, self._on_request)
        if self.affinity is not None:  # first in their lane: requests placed here for this backend's cache
            for lane in self._lanes:
                self._intake.add(cast(AbstractRobustQueue, await self.affinity.declare(channel, lane)), lane)
        for (_, lane, _), queue in queues.items():
            self._intake.add(cast(AbstractRobustQueue, queue), lane)  # declared on a robust channel
        control = await channel.get_exchange(topology.CONTROL_EXCHANGE)
        # Replies go through hotq.replies, never the default exchange (which reaches every queue), on
        # channels of their own: one renewed after a nack leaves the deliveries' channel alone.
        self._replies_out = await ConfirmingPublisher.open(self._connection, topology.REPLY_EXCHANGE)
        self._usage_out = await ConfirmingPublisher.open(self._connection, topology.EVENTS_EXCHANGE)
        self._usage = UsageReporter(self._usage_out, self.name)
        cancels = await channel.declare_queue(
            f"{topology.CANCEL_QUEUE_PREFIX}{self.name}", exclusive=True, auto_delete=True
        )
        await cancels.bind(control)
        await cancels.consume(self._on_control, no_ack=True)
        self._intake.start()
        await self.resume()
        self._usage.start()
        log.info("worker_started", worker=self.name, model=self.model, max_inflight=self._slots.total)

    async def resume(self) -> None:
        """Take work from every queue (again)."""
        assert self._intake is not None, "start() first"
        if self.affinity is not None:
            await self.affinity.redeclare()
        await self._intake.resume()

    async def pause(self) -> None:
        """Take no new work; requests already held go on."""
        if self._intake is not None:
            await self._intake.pause()

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop taking work, hand back at once what another consumer can take over, let the
        rest finish for `grace_s`, requeue what is left."""
        self._stopping = True  # held requests still waiting for a slot go back at once
        if self._intake is not None:
            await self._intake.close()
        await self.spill_waiting()
        if self._deliveries:
            log.info("worker_draining", inflight=self.inflight, held=self.held, grace_s=grace_s)
        await self._deliveries.drain(grace_s)
        if self._usage is not None:
            await self._usage.close()
        if self._channel is not None:
            await self._channel.close()
        for publisher in (self._replies_out, self._usage_out):
            if publisher is not None:
                await publisher.close()
        log.info("worker_stopped", worker=self.name, served=self.served)

    async def requeue_inflight(self) -> None:
        """Hand every held request back to the queue now (the backend is gone)."""
        await self._deliveries.requeue_all()
        await self.spill_waiting()

    async def spill_waiting(self) -> None:
        """Requests placed on this agent and still queued go to the shared queue: it takes no work now."""
        if self.affinity is not None:
            with contextlib.suppress(aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError):
                await self.affinity.spill_waiting()

    def _on_request(self, message: AbstractIncomingMessage, on_settled: Callable[[], None]) -> None:
        self.last_active = time.monotonic()
        self._deliveries.take(message, message.correlation_id or os.urandom(16).hex(), self._serve, on_settled)

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            control = messages.decode_as(message.body, Control)
        except WireError:
            return
        if isinstance(control, Resume):
            self._resumes.deliver(control)  # for whichever consumer asked: most get it for nothing
            return
        await self._on_cancel(control)

    async def _on_cancel(self, cancel: Cancel) -> None:
        if cancel.request_id.startswith(topology.RESULTS_QUEUE_PREFIX):  # a whole batch was cancelled
            self._cancelled_batches[cancel.request_id] = None
            while len(self._cancelled_batches) > 1000:
                self._cancelled_batches.popitem(last=False)
            return
        if self._deliveries.cancel_by_client(cancel.request_id):
            log.info("request_cancelled_by_client", request_id=cancel.request_id)
            return
        # Not here (yet): if it is still queued, whoever takes it should drop it.
        self._cancelled_unseen[cancel.request_id] = None
        while len(self._cancelled_unseen) > CANCELS_REMEMBERED:
            self._cancelled_unseen.popitem(last=False)

    async def _serve(self, delivery: Delivery) -> Settlement:
        """Serve one delivery and say how to settle it (`Deliveries` settles it)."""
        message = delivery.message
        try:
            envelope = messages.decode_as(message.body, RequestEnvelope)
        except WireError as exc:
            log.error("request_undecodable", error=exc.message, message_id=message.message_id)
            delivery.dead_reason = f"undecodable request: {exc.message}"
            return Settlement.DEAD_LETTER
        with structlog.contextvars.bound_contextvars(request_id=envelope.request_id, model=envelope.model):
            if message.reply_to is None:
                log.error("request_without_reply_queue")
                delivery.dead_reason = "no reply_to: nowhere to send the answer"
                return Settlement.DEAD_LETTER
            try:
                return await self._serve_envelope(delivery, envelope, message.reply_to)
            finally:
                self.last_active = time.monotonic()

    async def _serve_envelope(self, delivery: Delivery, envelope: RequestEnvelope, reply_to: str) -> Settlement:
        """Serve one delivery: ack when done with it, requeue otherwise."""
        assert self._replies_out is not None, "start() first"
        replies = ReplySender(self._replies_out, reply_to, envelope.request_id)
        progress = AttemptProgress(envelope.body)
        progress.continuable = envelope.stream and why_not_continuable(envelope.endpoint, envelope.body) is None
        # Draining, hand it over at once unless it is a stream that cannot go on elsewhere.
        delivery.movable = lambda: progress.continuable or not progress.sent_output
        try:
            outcome = await self._attempt(delivery, envelope, replies, progress)
        except asyncio.CancelledError:
            if not (replies.caller_gone or delivery.cancelled_by_client):
                raise  # stopping, or the backend went away: handed back, someone serves it later
            self._account(envelope, progress, cancelled=True)
            if delivery.cancelled_by_client and progress.called_backend and not replies.caller_gone:
                # What the backend generated until the cut, for the API to charge the user's limits.
                with contextlib.suppress(Exception):
                    await replies.send(Abandoned(envelope.request_id, progress.usage_at_cut()))
            return Settlement.ACK  # nobody waits for this answer any more
        except (aio_pika.exceptions.ChannelInvalidStateError, aio_pika.exceptions.AMQPError) as exc:
            # Our channel to RabbitMQ closed mid-answer: it hands the request back by itself.
            log.warning("reply_not_sent_broker_lost", error=repr(exc))
            outcome = _Outcome.REQUEUE
        except Exception as exc:  # a bug: answer if we can, never leave it held
            log.exception("request_failed")
            with contextlib.suppress(Exception):
                await replies.send(error_frame(envelope, "failed", HotqError(f"the consumer failed: {exc!r}")))
            outcome = _Outcome.DROPPED
        finally:
            replies.close()
        if outcome is _Outcome.ANSWERED:
            self.served += 1
        if outcome is _Outcome.REQUEUE:
            return Settlement.REQUEUE
        self._account(envelope, progress, cancelled=outcome is _Outcome.CALLER_GONE)
        return Settlement.ACK

    def _account(self, envelope: RequestEnvelope, progress: AttemptProgress, cancelled: bool) -> None:
        """Count a request the backend worked on against its user: answered, failed or cut short.
        An attempt handed back is not counted (the request is served again, and counted then)."""
        if progress.called_backend and self._usage is not None:
            self._usage.record(envelope, progress.usage_at_cut() if cancelled else progress.usage, cancelled)

    async def _attempt(
        self,
        delivery: Delivery,
        envelope: RequestEnvelope,
        replies: ReplySender,
        progress: AttemptProgress,
    ) -> _Outcome:
        """Serve the request once."""
        attempt = os.urandom(6).hex()
        message = delivery.message
        try:
            async with self._slot(message, envelope.lane) as slot:
                if not slot:
                    return _Outcome.REQUEUE  # this agent is busy: another may take it (`AffinityIntake.slot`)
                if self._stopping:
                    return _Outcome.REQUEUE  # draining: take no new work, even what we hold
                if delivery.channel_gone():
                    return _Outcome.REQUEUE  # the connection was lost while it waited: RabbitMQ has it again
                if dropped := self._why_drop(message, envelope):
                    log.info("request_dropped", reason=dropped, waited_s=round(time.time() - envelope.submitted_at, 3))
                    if dropped == "deadline passed":
                        with contextlib.suppress(CallerGone):
                            await replies.send(error_frame(envelope, attempt, DeadlineExceeded(dropped)))
                    return _Outcome.DROPPED
                if self.affinity is not None:
                    self.affinity.count(message)
                resume = None
                if progress.continuable and maybe_started(message):
                    await replies.ensure_listened()  # else nobody would answer
                    resume = await self._resumes.ask(replies, Resuming(envelope.request_id, attempt, self.name))
                    if resume is None:
                        log.warning("resume_unanswered", request_id=envelope.request_id, reply_to=message.reply_to)
                        lost = WorkerLost("the consumer serving this stream was lost; retry the request")
                        await replies.send(error_frame(envelope, attempt, lost))
                        return _Outcome.ANSWERED
                    if resume.tokens:
                        log.info("stream_resumed", tokens=resume.tokens, worker=self.name)
                serving = asyncio.current_task()
                assert serving is not None
                replies.announce_later(Started(envelope.request_id, attempt, self.name), serving.cancel)
                await self._handler.serve(envelope, attempt, replies, progress, resume)
        except CallerGone as gone:
            # Its reply queue is really gone (checked): nobody waits for this answer any more.
            log.info("caller_gone", request_id=envelope.request_id, reply_to=str(gone))
            return _Outcome.CALLER_GONE
        except BackendUnreachable as exc:
            if not _is_last_delivery(message):
                log.warning("backend_unreachable_requeue", error=str(exc))
                # A pause, so that a dead backend does not spin requests through the queue.
                await asyncio.sleep(BACKEND_RETRY_PAUSE_S)
                return _Outcome.REQUEUE
            error = BackendError(f"backend unreachable: {exc}", status=502)
            await replies.send(error_frame(envelope, attempt, error))
        return _Outcome.ANSWERED

    def _slot(self, message: AbstractIncomingMessage, lane: Lane) -> contextlib.AbstractAsyncContextManager[bool]:
        if self.affinity is None:
            return _always(self._slots.hold(lane))
        return self.affinity.slot(self._slots, message, lane)

    def _why_drop(self, message: AbstractIncomingMessage, envelope: RequestEnvelope) -> str | None:
        """Why this delivery should not be served, if it should not."""
        now = time.time()
        if now > envelope.deadline:
            return "deadline passed"
        # Only a first delivery can be too late to start: the API gave up on it with a 503.
        # A redelivered one was started before (and handed back), and its caller still waits.
        if not maybe_started(message) and now > envelope.start_by:
            return "not started within max_queue_wait_s"
        if envelope.request_id in self._cancelled_unseen:
            return "cancelled by the client while queued"
        if envelope.lane is Lane.BATCH and message.reply_to in self._cancelled_batches:
            return "its batch was cancelled"
        return None


class _Outcome(enum.Enum):
    ANSWERED = "answered"  # a final frame went to the caller
    DROPPED = "dropped"  # settled without an answer (expired, cancelled while queued, a consumer bug)
    CALLER_GONE = "caller_gone"  # settled without an answer: nobody waits for it any more
    REQUEUE = "requeue"  # someone should serve it (again)


@contextlib.asynccontextmanager
async def _always(hold: contextlib.AbstractAsyncContextManager[None]) -> AsyncIterator[bool]:
    async with hold:
        yield True


def _is_last_delivery(message: AbstractIncomingMessage) -> bool:
    """Quorum queues count deliveries; past the limit RabbitMQ dead-letters the request."""
    count = (message.headers or {}).get("x-delivery-count", 0)
    return isinstance(count, int) and count + 1 >= topology.DELIVERY_LIMIT

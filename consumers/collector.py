"""Running a batch to its end: dispatch its lines, collect its answers, write its files.

`BatchRunner.run` drives one stored batch. It publishes the lines not yet confirmed
(`producers.bulk.dispatch`), consumes the batch's durable results queue, and records
each answer in the job store, acking a delivery only after the store committed it.
Recording is idempotent per custom_id, so a runner killed at any point (with the API,
or a `hotq submit` process) and started again loses and duplicates nothing: the answers
it had not acked are delivered again, and the lines it had not seen confirmed are
published again. When every line has an answer the batch goes finalizing → completed
with OpenAI's output and error files; at its expiry the unfinished lines get
`batch_expired` and the batch is `expired`; a cancelled batch stops dispatching, waits
briefly for answers in flight and ends `cancelled` with what it has. A finished
batch's results queue is deleted. A direct job's input may stay open (`producers.jobs`):
its runner publishes lines as they are stored (`wake`) and the job cannot complete until
the input is closed.

Several API processes follow each API batch (`shared`): every one consumes its results
queue, which RabbitMQ's single active consumer gives to one at a time (the next takes over
when that one's connection goes), and records what it receives; the process holding the
batch's lease in the job store (`lease`, renewed every second) dispatches it and finishes it.
A results queue made before it had single active consumer keeps its arguments: its
consumers compete, and recording stays exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from aiormq.exceptions import ChannelPreconditionFailed

from broker import messages, topology
from broker.connection import ConnectionClosedMeanwhile, plain_channel
from broker.errors import WireError
from broker.jobstore import TERMINAL_STATUSES, AsyncJobStore, BatchRow
from broker.messages import Endpoint, ErrorReply, Final, ReplyFrame
from broker.openai_objects import batch_object
from consumers.result_records import expired_result, result_of, write_result_files
from producers.bulk import dispatch
from producers.placement import Placement

log = structlog.get_logger("hotq.collector")

COLLECT_PREFETCH = 2000  # answers held unacked at once, recorded in one transaction each round
RESUME_S = 1.0  # before a runner whose results consumer was lost consumes again
POLL_S = 0.5  # how often the runner looks at the batch's status (cancel, expiry) when idle
# A round of answers costs three job-store calls and a transaction however many it records: a
# round that found fewer than GATHER_ENOUGH waits GATHER_S for more before recording them.
GATHER_S = 0.02
GATHER_ENOUGH = 200
CANCEL_QUIET_S = 1.0  # a cancelled batch ends once no answer came for this long ...
CANCEL_MAX_S = 10.0  # ... or this long after the cancel, whichever is first
DISPATCH_WINDOW = 100_000  # requests a collecting runner keeps queued unanswered at most
UNKNOWN_OWNER = "batch"  # whose usage the lines of a batch stored before batches had owners count as


class ResultsConsumerLost(ConnectionError):
    """The results queue's channel closed or its consumer was cancelled before the batch ended."""


class BatchRunner:
    def __init__(
        self,
        connection: AbstractRobustConnection,
        store: AsyncJobStore,
        batch_id: str,
        *,
        publish: bool = True,
        collect: bool = True,
        on_published: Callable[[int], None] | None = None,
        on_collected: Callable[[int], None] | None = None,
        shared: bool = False,
        lease: Callable[[], Awaitable[bool]] | None = None,
        collector: str | None = None,
        placement: Placement | None = None,
    ) -> None:
        self._connection = connection
        self._store = store
        self.batch_id = batch_id
        self._publish = publish
        self._collect = collect
        self._on_published = on_published
        self._on_collected = on_collected
        self._shared = shared  # other processes follow this batch too
        self._lease = lease  # renews this process's lease on running the batch: whether it holds it
        self._collector = collector  # this process's name, recorded with the answers it collects
        self._placement = placement  # lines sharing a prefix go to one agent (the API's view of them)
        self._stop_dispatch = False
        self._dispatching: asyncio.Task[None] | None = None
        self._new_lines = asyncio.Event()
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._consumer_lost = False  # the broker cancelled the results consumer (its queue was deleted)

    async def run(self) -> dict[str, Any]:
        """Run until the batch is finished (or, with collect=False, until it is dispatched)."""
        with structlog.contextvars.bound_contextvars(batch_id=self.batch_id):
            try:
                if not self._collect:
                    row = await self._row()
                    if self._publish and row.status == "in_progress":
                        self._dispatch_now(row)
                    if self._dispatching is not None:
                        await self._dispatching
                    return await self._batch()
                while True:
                    try:
                        return await self._collect_until_done()
                    except (
                        ResultsConsumerLost,
                        aio_pika.exceptions.AMQPError,
                        aio_pika.exceptions.ChannelInvalidStateError,  # a RuntimeError, not an AMQPError
                    ) as lost:
                        # A lost connection (or deleted queue): consume again once the connection is back.
                        log.warning("results_consumer_lost_resuming", error=repr(lost))
                        await asyncio.sleep(RESUME_S)
            finally:
                await self._stop_dispatching()

    def _dispatch_now(self, row: BatchRow) -> None:
        if self._dispatching is None and not self._stop_dispatch:
            self._dispatching = asyncio.create_task(self._dispatch(row))

    async def _stop_dispatching(self) -> None:
        dispatching, self._dispatching = self._dispatching, None
        if dispatching is not None and not dispatching.done():
            dispatching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatching

    def wake(self) -> None:
        """Lines were added to the job: publish them."""
        self._new_lines.set()

    async def _wait_for_lines(self) -> bool:
        """Whether more lines may still come (the input is open); if so, wait a moment for them."""
        row = await self._row()
        if not row.input_open or row.status != "in_progress":
            return False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new_lines.wait(), POLL_S)
        self._new_lines.clear()
        return True

    async def _row(self) -> BatchRow:
        batch_id = self.batch_id
        row = await self._store.run(lambda db: db.batches.get(batch_id))
        if row is None:
            raise KeyError(batch_id)
        return row

    async def _batch(self) -> dict[str, Any]:
        return batch_object(await self._row())

    async def _dispatch(self, row: BatchRow) -> None:
        while not self._stop_dispatch:
            try:
                await dispatch(
                    self._connection,
                    self._store,
                    self.batch_id,
                    row.model or "",  # a batch with lines has its model
                    Endpoint(row.endpoint.removeprefix("/v1/")),
                    row.expires_at,
                    row.owner or UNKNOWN_OWNER,
                    should_stop=lambda: self._stop_dispatch,
                    on_published=self._on_published,
                    wait_for_lines=self._wait_for_lines,
                    # Without a collector here nothing would free the window (`hotq submit --detach`).
                    max_unanswered=DISPATCH_WINDOW if self._collect else None,
                    declare_results=not self._shared,  # the collector declared it, single active
                    placement=self._placement,
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a dropped connection: the robust connection comes back
                log.warning("batch_dispatch_failed_retrying", error=repr(exc))
                await asyncio.sleep(1.0)

    async def _consume(self) -> tuple[AbstractChannel, AbstractQueue, str]:
        """A channel consuming the results queue into the inbox.

        A plain channel, not one the robust connection restores: a restored channel re-declares
        its queues after every reconnect, and after a consumer of it is cancelled by the broker,
        which is what happens when the process finishing the batch deletes the queue. Restoring
        then brought the deleted queue back, and when the declare met the deletion in RabbitMQ
        (INTERNAL_ERROR, cluster_not_formed) it closed the process's shared connection on every
        reconnect: its requests failed with 503 for as long as it ran. The loop in
        `_collect_until_done` notices a closed channel or a cancelled consumer itself."""
        self._consumer_lost = False
        channel = await self._plain_channel()
        try:
            try:
                queue = await topology.declare_results_queue(channel, self.batch_id, single_active=self._shared)
            except ChannelPreconditionFailed:  # made before single active consumer (or by `hotq submit`)
                await channel.close()
                channel = await self._plain_channel()
                queue = await channel.get_queue(topology.results_queue_name(self.batch_id), ensure=True)
                log.info("results_queue_without_single_active_consumer")

            async def on_message(message: AbstractIncomingMessage) -> None:
                self._inbox.put_nowait(message)

            def on_cancelled_by_broker(_frame: object) -> None:
                self._consumer_lost = True

            underlay = await channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)  # aio-pika tells only robust channels of a cancel
            underlay.on_consumer_cancel_callbacks.add(on_cancelled_by_broker)
            return channel, queue, await queue.consume(on_message)
        except BaseException as exc:
            connection_went = channel.is_closed or not self._connection.connected.is_set()
            with contextlib.suppress(Exception):
                await channel.close()
            if isinstance(exc, Exception) and connection_went:  # whatever it raised (aiormq: RuntimeError)
                raise ResultsConsumerLost(repr(exc)) from exc
            raise

    async def _plain_channel(self) -> AbstractChannel:
        try:
            channel = await plain_channel(self._connection)
        except ConnectionClosedMeanwhile as closed:
            raise ResultsConsumerLost(str(closed)) from closed
        await channel.set_qos(prefetch_count=COLLECT_PREFETCH)
        return channel

    async def _hold(self) -> bool:
        """Whether this process runs the batch now (dispatch, status, finishing)."""
        if self._lease is not None:
            return await self._lease()
        batch_id = self.batch_id
        await self._store.run(lambda db: db.batches.touch(batch_id))
        return True

    async def _collect_until_done(self) -> dict[str, Any]:
        if (await self._row()).status in TERMINAL_STATUSES:  # finished by another process: its queue is gone
            return await self._batch()
        channel, queue, tag = await self._consume()
        control = await channel.declare_exchange(topology.CONTROL_EXCHANGE, "fanout", durable=True)
        cancel_seen: float | None = None
        cancel_sent = 0.0
        last_answer = last_hold = time.monotonic()
        holding = await self._hold()
        row = await self._row()
        if holding and self._publish and row.status == "in_progress":
            self._dispatch_now(row)  # at once, not after the first wait for answers
        try:
            while True:
                if await self._record(await self._take()):
                    last_answer = time.monotonic()
                now = time.monotonic()
                if now - last_hold > 1.0:
                    holding = await self._hold()
                    last_hold = now
                row = await self._row()
                status = row.status
                if status in TERMINAL_STATUSES:
                    break
                if channel.is_closed or self._consumer_lost:  # the runner starts over: declare, consume
                    raise ResultsConsumerLost(f"{topology.results_queue_name(self.batch_id)}: consumer gone")
                if not holding:  # another process runs it; this one only records what reaches it
                    await self._stop_dispatching()
                    continue
                if self._publish and status == "in_progress":
                    self._dispatch_now(row)
                if status == "finalizing" or (status == "in_progress" and row.answered):
                    await self._finish("completed")
                elif status == "in_progress" and time.time() >= row.expires_at:
                    await self._finish("expired")
                elif status == "cancelling":
                    self._stop_dispatch = True
                    cancel_seen = cancel_seen or now
                    if now - cancel_sent > 1.0:  # again now and then, for consumers that just started
                        cancel = messages.Cancel(topology.results_queue_name(self.batch_id))
                        await control.publish(aio_pika.Message(messages.encode(cancel)), routing_key="")
                        cancel_sent = now
                    if now - last_answer >= CANCEL_QUIET_S or now - cancel_seen >= CANCEL_MAX_S:
                        await self._finish("cancelled")
        except BaseException:
            with contextlib.suppress(Exception):
                await channel.close()  # its answers not yet acked are delivered again, to the next runner
            raise
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        batch = await self._batch()
        if batch["status"] in TERMINAL_STATUSES:
            with contextlib.suppress(Exception):
                await channel.queue_delete(topology.results_queue_name(self.batch_id))
        with contextlib.suppress(Exception):
            await channel.close()
        log.info("batch_finished", status=batch["status"], counts=batch["request_counts"])
        return batch

    async def _take(self) -> list[AbstractIncomingMessage]:
        """The answers that arrived (waiting up to POLL_S for the first)."""
        try:
            first = await asyncio.wait_for(self._inbox.get(), POLL_S)
        except TimeoutError:
            return []
        taken = [first]
        self._take_waiting(taken)
        if len(taken) < GATHER_ENOUGH:  # answers come one by one: let more arrive for the same round
            await asyncio.sleep(GATHER_S)
            self._take_waiting(taken)
        return taken

    def _take_waiting(self, taken: list[AbstractIncomingMessage]) -> None:
        while len(taken) < COLLECT_PREFETCH:
            try:
                taken.append(self._inbox.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _record(self, delivered: list[AbstractIncomingMessage]) -> bool:
        """Record the answers among `delivered` (once each), then ack them all."""
        if not delivered:
            return False
        frames: list[Final | ErrorReply] = []
        for message in delivered:
            try:
                frame = messages.decode_as(message.body, ReplyFrame)
            except WireError as exc:
                log.warning("result_undecodable", error=exc.message)
                continue
            if isinstance(frame, Final | ErrorReply):
                frames.append(frame)  # `Started` (a slow answer announcing itself) needs nothing
        if frames:
            request_ids = [frame.request_id for frame in frames]
            owners = await self._store.run(lambda db: db.lines.owners(request_ids))
            results = []
            for frame in frames:
                owner = owners.get(frame.request_id)
                if owner is None or owner.batch_id != self.batch_id:
                    log.warning("result_for_unknown_request", request_id=frame.request_id)
                    continue
                results.append(result_of(frame, owner.line, owner.custom_id))
            batch_id, collector = self.batch_id, self._collector
            added_ok, added_failed = await self._store.run(lambda db: db.results.record(batch_id, results, collector))
            if self._on_collected is not None and (added_ok or added_failed):
                self._on_collected(added_ok + added_failed)
        try:
            await delivered[-1].ack(multiple=True)  # after the commit: a crash before it redelivers
        except Exception as exc:  # the channel went away with the connection: redelivered, recorded once
            log.warning("result_ack_failed", error=repr(exc))
        return True

    async def _finish(self, status: str) -> None:
        """Write the output and error files and end the batch as `status`."""
        batch_id = self.batch_id
        if status == "completed":
            await self._store.run(lambda db: db.batches.set_status(batch_id, "finalizing", only_from=["in_progress"]))
            before = ["finalizing"]
        elif status == "expired":
            after = 0
            while unfinished := await self._store.run(
                lambda db: db.lines.unfinished(batch_id, after, COLLECT_PREFETCH)  # noqa: B023
            ):
                expired = [expired_result(line.request_id, line.line, line.custom_id) for line in unfinished]
                await self._store.run(lambda db: db.results.record(batch_id, expired))  # noqa: B023
                after = unfinished[-1].line
            before = ["in_progress"]
        else:
            before = ["cancelling"]
        files = await self._store.run(lambda db: write_result_files(db, batch_id))
        changed = await self._store.run(lambda db: db.batches.set_status(batch_id, status, only_from=before, **files))
        if changed:
            log.info("batch_finalized", status=status, **files)

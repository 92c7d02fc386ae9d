"""Bulk publishing: a stored batch's lines onto its model's batch lane.

`dispatch` publishes every line of a stored batch that RabbitMQ has not yet
confirmed, as a `RequestEnvelope` on the batch lane, whose answers go to the
batch's results queue. Publishes are pipelined (a whole chunk in flight, confirms
awaited together: `producers.pipelined_publish`), and a chunk's lines are marked
published only after their confirms, so a dispatcher killed at any point and started
again re-publishes only lines RabbitMQ never confirmed (at most one chunk), and never
a confirmed one. A line RabbitMQ refuses for its size (over the broker's
`max_message_size`) is not tried again: it fails alone, with a 413 in the batch's error
file, answered through the results queue like any failed request. The API's batch
runners and direct jobs (`producers.jobs`, `hotq submit`) both use it. A direct job's
input may still be open: `wait_for_lines` waits for more, and `max_unanswered` holds
publishing while that many requests are queued unanswered (RabbitMQ keeps a window of a
job, not all of it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker import messages, topology
from broker.errors import HotqError
from broker.jobstore import AsyncJobStore, Line
from broker.messages import Endpoint, ErrorReply, Lane, RequestEnvelope
from broker.schemas import affinity_key, validate
from producers.pipelined_publish import Outgoing, Published, publish_confirmed
from producers.placement import Placement

log = structlog.get_logger("hotq.bulk")

PUBLISH_CHUNK = 5000  # lines in flight at once (and read from the store at once)
WINDOW_POLL_S = 0.2  # how often a dispatcher held by `max_unanswered` looks again


async def dispatch(
    connection: AbstractRobustConnection,
    store: AsyncJobStore,
    batch_id: str,
    model: str,
    endpoint: Endpoint,
    expires_at: float,
    caller: str,
    should_stop: Callable[[], bool] = lambda: False,
    on_published: Callable[[int], None] | None = None,
    wait_for_lines: Callable[[], Awaitable[bool]] | None = None,
    max_unanswered: int | None = None,
    placement: Placement | None = None,
    declare_results: bool = True,
) -> int:
    """Publish the batch's unconfirmed lines for `caller` (whose usage they count as);
    return how many were published now. `wait_for_lines`: when all are published, wait for
    more and say whether more may still come (the input is open). `placement`: lines that
    share a prefix wait for the same agent (its affinity queue), as interactive requests do.
    `declare_results=False`: the collector declared the results queue already (with arguments
    of its own)."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        request_exchange = await topology.declare_exchanges(channel)
        await topology.declare_request_queue(channel, request_exchange, model, Lane.BATCH)
        if declare_results:
            await topology.declare_results_queue(channel, batch_id)
        routing_key = topology.request_queue_name(model, Lane.BATCH)
        reply_to = topology.results_queue_name(batch_id)
        published = 0
        already = await store.run(lambda db: db.lines.published_count(batch_id)) if max_unanswered else 0
        after = 0
        while not should_stop():
            if max_unanswered and already + published - await _answered(store, batch_id) >= max_unanswered:
                await asyncio.sleep(WINDOW_POLL_S)  # the collector frees the window as answers come
                continue
            # (the store's lambdas run before the loop moves on: B023's late binding cannot bite)
            lines = await store.run(lambda db: db.lines.unpublished(batch_id, after, PUBLISH_CHUNK))  # noqa: B023
            if not lines and wait_for_lines is not None:
                more_may_come = await wait_for_lines()
                # Lines stored meanwhile, or before the input closed, are published either way.
                lines = await store.run(lambda db: db.lines.unpublished(batch_id, after, PUBLISH_CHUNK))  # noqa: B023
                if not lines and more_may_come:
                    continue
            if not lines:
                break
            underlay = await channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)  # the frames go through its internals
            confirmed, too_large = await _publish_chunk(
                underlay, lines, model, endpoint, expires_at, caller, routing_key, reply_to, placement
            )
            if too_large:  # RabbitMQ closed the channel refusing them: answer them as failed, on a new one
                if not channel.is_closed:
                    await channel.close()
                channel = await connection.channel(publisher_confirms=True)
                confirmed += await _fail_too_large(channel, too_large, reply_to)
                log.warning("batch_lines_too_large", batch_id=batch_id, lines=[line.line for line, _ in too_large])
            await store.run(lambda db: db.lines.mark_published(batch_id, confirmed))  # noqa: B023
            published += len(confirmed)
            if on_published is not None:
                on_published(len(confirmed))
            if len(confirmed) < len(lines):
                # RabbitMQ refused some (a full queue, a lost connection, a queue leader lost): try
                # those again shortly, on a new channel (one that saw a leader die keeps nacking).
                log.warning("batch_publish_incomplete", batch_id=batch_id, refused=len(lines) - len(confirmed))
                await asyncio.sleep(1.0)
                if not channel.is_closed:
                    await channel.close()
                channel = await connection.channel(publisher_confirms=True)
                after = 0
            else:
                after = lines[-1].line
        log.info("batch_dispatched", batch_id=batch_id, published=published)
        return published
    finally:
        if not channel.is_closed:
            await channel.close()


async def _answered(store: AsyncJobStore, batch_id: str) -> int:
    row = await store.run(lambda db: db.batches.get(batch_id))
    return 0 if row is None else row.completed + row.failed


async def _publish_chunk(
    channel: aiormq.Channel,
    lines: list[Line],
    model: str,
    endpoint: Endpoint,
    expires_at: float,
    caller: str,
    routing_key: str,
    reply_to: str,
    placement: Placement | None = None,
) -> tuple[list[int], list[tuple[Line, int]]]:
    """Publish a chunk with every confirm in flight at once; the line numbers RabbitMQ confirmed,
    and the lines (with their message sizes) it refused as larger than it takes."""
    now = time.time()
    outgoing = [
        Outgoing(
            line.request_id,
            messages.encode(
                RequestEnvelope(
                    request_id=line.request_id,
                    model=model,
                    endpoint=endpoint,
                    body=line.body,
                    stream=False,
                    deadline=expires_at,
                    start_by=expires_at,
                    caller=caller,
                    lane=Lane.BATCH,
                    submitted_at=now,
                )
            ),
        )
        for line in lines
    ]
    # Lines left in the queue past the batch's expiry are dropped by RabbitMQ: nobody waits for
    # them, and an expired line must not make the scaler start an agent for a model nobody serves.
    ttl_ms = round((expires_at - now) * 1000)
    if placement is None:
        result = await publish_confirmed(channel, topology.REQUEST_EXCHANGE, routing_key, reply_to, ttl_ms, outgoing)
    else:
        result = await _publish_placed(
            channel, placement, model, endpoint, lines, outgoing, routing_key, reply_to, ttl_ms
        )
    confirmed = [line.line for line, acked in zip(lines, result.acked) if acked]
    limit = result.broker_max_size
    if limit is None:
        return confirmed, []
    return confirmed, [(line, len(out.body)) for line, out in zip(lines, outgoing) if len(out.body) > limit]


async def _publish_placed(
    channel: aiormq.Channel,
    placement: Placement,
    model: str,
    endpoint: Endpoint,
    lines: list[Line],
    outgoing: list[Outgoing],
    routing_key: str,
    reply_to: str,
    ttl_ms: int,
) -> Published:
    """Publish each line into the affinity queue its prefix is placed in (spilling after the batch
    lane's delay), or the shared queue; the confirms in the lines' order. A placed agent is hot, so
    its queue exists (it outlives its agent by minutes): these frames are not `mandatory`."""
    groups: dict[tuple[str, int], list[int]] = {}
    for index, line in enumerate(lines):
        try:
            placed = placement.place(model, Lane.BATCH, affinity_key(validate(endpoint, line.body), batch_line=True))
        except HotqError:  # checked when stored; never fails here, and the shared queue takes it anyway
            placed = None
        target = (routing_key, ttl_ms) if placed is None else (placed.queue, min(ttl_ms, placed.spill_after_ms))
        groups.setdefault(target, []).append(index)
    acked = [False] * len(lines)
    broker_max_size = None
    for (queue, ttl), indexes in groups.items():
        published = await publish_confirmed(
            channel, topology.REQUEST_EXCHANGE, queue, reply_to, ttl, [outgoing[i] for i in indexes]
        )
        broker_max_size = broker_max_size or published.broker_max_size
        for index, ok in zip(indexes, published.acked):
            acked[index] = ok
    return Published(acked, broker_max_size)


async def _fail_too_large(channel: AbstractChannel, too_large: list[tuple[Line, int]], reply_to: str) -> list[int]:
    """Answer each refused line with a 413 on the batch's results queue; the lines so answered."""
    answered = []
    for line, size in too_large:
        error = ErrorReply(
            request_id=line.request_id,
            attempt="publish",
            status=413,
            error_type="invalid_request_error",
            message=f"the request's message is {size} bytes, more than RabbitMQ accepts (its max_message_size)",
            code="message_too_large",
            param=None,
        )
        await channel.default_exchange.publish(aio_pika.Message(messages.encode(error)), routing_key=reply_to)
        answered.append(line.line)
    return answered

"""Bulk publishing: a stored batch's lines onto its model's batch lane.

`dispatch` publishes every line of a stored batch that RabbitMQ has not yet
confirmed, as a `RequestEnvelope` on the batch lane, whose answers go to the
batch's results queue. Publishes are pipelined (a whole chunk in flight, confirms
awaited together: `producers.pipelined_publish`), and a chunk's lines are marked
published only after their confirms, so a dispatcher killed at any point and started
again re-publishes only lines RabbitMQ never confirmed (at most one chunk), and never
a confirmed one. The API's batch runners and `hotq submit` (ops/submit.py) both use it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiormq
import structlog
from aio_pika.abc import AbstractRobustConnection

from broker import messages, topology
from broker.jobstore import AsyncJobStore, Line
from broker.messages import Endpoint, Lane, RequestEnvelope
from producers.pipelined_publish import Outgoing, publish_confirmed

log = structlog.get_logger("hotq.bulk")

PUBLISH_CHUNK = 5000  # lines in flight at once (and read from the store at once)


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
) -> int:
    """Publish the batch's unconfirmed lines for `caller` (whose usage they count as);
    return how many were published now."""
    channel = await connection.channel(publisher_confirms=True)
    try:
        request_exchange = await topology.declare_exchanges(channel)
        await topology.declare_request_queue(channel, request_exchange, model, Lane.BATCH)
        await topology.declare_results_queue(channel, batch_id)
        routing_key = topology.request_queue_name(model, Lane.BATCH)
        reply_to = topology.results_queue_name(batch_id)
        published = 0
        after = 0
        while not should_stop():
            # (the store's lambdas run before the loop moves on: B023's late binding cannot bite)
            lines = await store.run(lambda db: db.lines.unpublished(batch_id, after, PUBLISH_CHUNK))  # noqa: B023
            if not lines:
                break
            underlay = await channel.get_underlay_channel()
            assert isinstance(underlay, aiormq.Channel)  # the frames go through its internals
            confirmed = await _publish_chunk(
                underlay, lines, model, endpoint, expires_at, caller, routing_key, reply_to
            )
            await store.run(lambda db: db.lines.mark_published(batch_id, confirmed))  # noqa: B023
            published += len(confirmed)
            if on_published is not None:
                on_published(len(confirmed))
            if len(confirmed) < len(lines):
                # RabbitMQ refused some (a full queue, a lost connection): try those again shortly.
                log.warning("batch_publish_incomplete", batch_id=batch_id, refused=len(lines) - len(confirmed))
                await asyncio.sleep(1.0)
                after = 0
            else:
                after = lines[-1].line
        log.info("batch_dispatched", batch_id=batch_id, published=published)
        return published
    finally:
        if not channel.is_closed:
            await channel.close()


async def _publish_chunk(
    channel: aiormq.Channel,
    lines: list[Line],
    model: str,
    endpoint: Endpoint,
    expires_at: float,
    caller: str,
    routing_key: str,
    reply_to: str,
) -> list[int]:
    """Publish a chunk with every confirm in flight at once; the line numbers RabbitMQ confirmed."""
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
    acked = await publish_confirmed(channel, topology.REQUEST_EXCHANGE, routing_key, reply_to, ttl_ms, outgoing)
    return [line.line for line, confirmed in zip(lines, acked) if confirmed]

"""The RabbitMQ topology hotq declares, and the names in it.

- ``hotq.requests`` (direct): routes each request to its model's queue for one lane.
  Request queues are durable quorum queues, so a RabbitMQ cluster replicates them;
  a message redelivered `DELIVERY_LIMIT` times (a poison request that kills every
  consumer) is dead-lettered instead of looping forever.
- ``hotq.dead`` (fanout) → ``hotq.dead-letters``: where rejected, expired and
  poison requests go, kept for a day for operators to inspect.
- ``hotq.control`` (fanout): cancels, seen by every consumer.
- ``hotq.events`` (topic): agents' state changes and heartbeats, for the scaler and ops,
  and consumers' usage reports (key ``usage``), kept in the durable quorum queue
  ``hotq.usage`` until an API process records them in its job store.
- Pinned queues: a model's interactive requests pinned to one cluster
  (``X-Hotq-Cluster``), consumed only by that cluster's agents.
- ``hotq.replies`` (direct): where consumers publish reply frames, routed by the
  request's ``reply_to``. Reply queues (``hotq.reply.*``, one per API process) and
  results queues (``hotq.results.<batch_id>``, one durable quorum queue per batch,
  where consumers send the batch's answers for its collector) are bound to it under
  their own names. Not the default exchange: publishing there reaches any queue,
  request queues included, so the agents' RabbitMQ role may not
  (ops/rabbitmq/definitions.json).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Awaitable, Callable

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustChannel,
    AbstractRobustConnection,
)
from pamqp.common import FieldTable

from broker.messages import Lane

REQUEST_EXCHANGE = "hotq.requests"
DEAD_LETTER_EXCHANGE = "hotq.dead"
DEAD_LETTER_QUEUE = "hotq.dead-letters"
CONTROL_EXCHANGE = "hotq.control"
EVENTS_EXCHANGE = "hotq.events"  # topic: agent.<state|heartbeat>, scaler.outlook, usage
OUTLOOK_ROUTING_KEY = "scaler.outlook"
USAGE_ROUTING_KEY = "usage"
USAGE_QUEUE = "hotq.usage"
REPLY_EXCHANGE = "hotq.replies"  # direct: reply and results queues, bound under their names
REPLY_QUEUE_PREFIX = "hotq.reply."
CANCEL_QUEUE_PREFIX = "hotq.cancel."

DELIVERY_LIMIT = 5
USAGE_DELIVERY_LIMIT = 100_000
DEAD_LETTER_TTL_MS = 24 * 3600 * 1000
# A reply queue outlives a dropped connection by this much, so frames published
# while its API process reconnects are not lost.
REPLY_QUEUE_EXPIRES_MS = 60_000

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@functools.lru_cache(maxsize=4096)  # on every request's path; a hash is not free
def request_queue_name(model: str, lane: Lane, cluster: str | None = None) -> str:
    """A readable queue name that is safe and unique for any model name.

    The readable part is squeezed to safe characters; the hash keeps two models
    whose names squeeze alike (``a/b`` and ``a_b``) on different queues. With a
    `cluster`, the queue of requests pinned to that cluster: only its agents
    consume it.
    """
    readable = _UNSAFE.sub("_", model).strip("_.")[:120] or "model"
    digest = hashlib.sha256(model.encode()).hexdigest()[:10]
    name = f"hotq.req.{readable}.{digest}.{lane.value}"
    if cluster is not None:
        cluster_digest = hashlib.sha256(cluster.encode()).hexdigest()[:6]
        name += f".at.{_UNSAFE.sub('_', cluster)[:60]}.{cluster_digest}"
    return name


def request_queue_arguments() -> FieldTable:
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # required by at-least-once dead-lettering
        "x-delivery-limit": DELIVERY_LIMIT,
    }


async def declare_exchanges(channel: AbstractChannel) -> AbstractExchange:
    """Declare the shared exchanges and the dead-letter queue; return the request exchange."""
    dead = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_letters = await channel.declare_queue(
        DEAD_LETTER_QUEUE,
        durable=True,
        arguments={"x-queue-type": "quorum", "x-message-ttl": DEAD_LETTER_TTL_MS},
    )
    await dead_letters.bind(dead)
    await channel.declare_exchange(CONTROL_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    await channel.declare_exchange(REPLY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    return await channel.declare_exchange(REQUEST_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)


async def declare_request_queue(
    channel: AbstractChannel,
    request_exchange: AbstractExchange,
    model: str,
    lane: Lane,
    cluster: str | None = None,
) -> AbstractQueue:
    """Declare (idempotently) and bind one model's queue for one lane (pinned to a cluster or not)."""
    name = request_queue_name(model, lane, cluster)
    queue = await channel.declare_queue(name, durable=True, arguments=request_queue_arguments())
    await queue.bind(request_exchange, routing_key=name)
    return queue


async def queue_depth(channel: AbstractChannel, model: str, lane: Lane, cluster: str | None = None) -> tuple[int, int]:
    """(ready messages, consumers) of a model's queue, by an idempotent declare.

    Not a passive declare: that closes the channel when the queue does not exist yet.
    """
    name, arguments = request_queue_name(model, lane, cluster), request_queue_arguments()
    queue: AbstractQueue
    if isinstance(channel, AbstractRobustChannel):  # a probe, nothing to re-declare after a reconnect
        queue = await channel.declare_queue(name, durable=True, arguments=arguments, robust=False)
    else:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
    declared = queue.declaration_result
    return declared.message_count or 0, declared.consumer_count or 0


async def declare_model_queues(
    channel: AbstractChannel,
    models: list[str],
    lanes: tuple[Lane, ...] = tuple(Lane),
    pinned: dict[str, list[str]] | None = None,
) -> dict[tuple[str, Lane, str | None], AbstractQueue]:
    """Declare the models' queues per lane, and the interactive queues pinned to clusters
    (`pinned`: model -> cluster names)."""
    request_exchange = await declare_exchanges(channel)
    queues: dict[tuple[str, Lane, str | None], AbstractQueue] = {}
    for model in models:
        for lane in lanes:
            queues[(model, lane, None)] = await declare_request_queue(channel, request_exchange, model, lane)
        if Lane.INTERACTIVE in lanes:
            for cluster in (pinned or {}).get(model, []):
                queues[(model, Lane.INTERACTIVE, cluster)] = await declare_request_queue(
                    channel, request_exchange, model, Lane.INTERACTIVE, cluster
                )
    return queues


RESULTS_QUEUE_PREFIX = "hotq.results."


def results_queue_name(batch_id: str) -> str:
    """The durable queue a batch's answers wait in until its collector records them.

    A `Cancel` naming a results queue (instead of a request id) cancels the whole batch:
    consumers drop its requests that are still queued.
    """
    return RESULTS_QUEUE_PREFIX + _UNSAFE.sub("_", batch_id)


async def declare_results_queue(channel: AbstractChannel, batch_id: str, single_active: bool = False) -> AbstractQueue:
    """Durable and quorum: answers survive a collector (or the whole API) that dies mid-batch.
    `single_active` (an API batch, which every API process consumes): RabbitMQ delivers to one
    consumer at a time and hands over to the next when it goes. A queue's arguments cannot change,
    so declaring one that exists with other arguments fails (PRECONDITION_FAILED, the channel closes)."""
    arguments: FieldTable = {"x-queue-type": "quorum"}
    if single_active:
        arguments["x-single-active-consumer"] = True
    queue = await channel.declare_queue(results_queue_name(batch_id), durable=True, arguments=arguments)
    await bind_reply_queue(channel, queue)
    return queue


async def bind_reply_queue(channel: AbstractChannel, queue: AbstractQueue) -> None:
    """Make `queue` reachable by consumers' replies: bound to ``hotq.replies`` under its own name."""
    exchange = await channel.declare_exchange(REPLY_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    await queue.bind(exchange, routing_key=queue.name)


async def consume_agent_events(
    connection: AbstractRobustConnection, on_message: Callable[[AbstractIncomingMessage], Awaitable[None]]
) -> None:
    """Hand every agent announcement (and the scaler's outlooks) from now on to `on_message`,
    through a queue of this process's own that goes away with its connection."""
    channel = await connection.channel()
    await declare_exchanges(channel)
    events = await channel.get_exchange(EVENTS_EXCHANGE)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(events, routing_key="agent.#")
    await queue.bind(events, routing_key=OUTLOOK_ROUTING_KEY)
    await queue.consume(on_message, no_ack=True)


def usage_queue_arguments() -> FieldTable:
    """Also in ops/rabbitmq/definitions.json, which creates the queue before any API runs."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,  # where undecodable reports go
        # A report handed back while the job store is down comes round about once a second:
        # RabbitMQ 4's default limit (20) would dead-letter it after a 20 s outage.
        "x-delivery-limit": USAGE_DELIVERY_LIMIT,
    }


async def declare_usage_queue(channel: AbstractChannel) -> AbstractQueue:
    """Durable and quorum: usage reports wait here through API restarts, and none is lost."""
    events = await channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(USAGE_QUEUE, durable=True, arguments=usage_queue_arguments())
    await queue.bind(events, routing_key=USAGE_ROUTING_KEY)
    return queue

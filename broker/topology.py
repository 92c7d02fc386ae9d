"""The RabbitMQ topology hotq declares, and the names in it.

- ``hotq.requests`` (direct): routes each request to its model's queue for one lane.
  Request queues are durable quorum queues, so a RabbitMQ cluster replicates them
  (on `quorum_replicas` nodes: see `declare_quorum_queue`);
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
- Affinity queues: one per agent and lane, where the API places requests whose prefix
  that agent is likely to hold in its KV cache (`broker.affinity`). A request not taken
  within its lane's `spill_after_ms` expires into the model's shared queue (per-message
  TTL, dead-lettered at least once), and so does one its agent hands back.
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
from typing import Any

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.common import FieldTable

from broker.connection import plain_channel, quorum_replicas_of
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
GROUP_SIZE = "x-quorum-initial-group-size"
# RabbitMQ's words when a queue exists with another group size (or none): "... current is the value '3' ...".
_CURRENT_GROUP_SIZE = re.compile(r"inequivalent arg '" + GROUP_SIZE + r"'.*current is (?:the value )?('(\d+)'|none)")


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


async def _probe(channel: AbstractChannel, name: str, arguments: FieldTable) -> tuple[FieldTable, Any]:
    """The arguments quorum queue `name` is (or is now) declared with, and the broker's DeclareOk.

    New queues get ``x-quorum-initial-group-size`` (the connection's `quorum_replicas`; RabbitMQ
    places no more replicas than there are nodes). RabbitMQ takes the group size as part of the
    queue's identity: a queue that exists with another one, or none (made before hotq set it, or
    by definitions.json), refuses a declare that differs (406) and is declared as it is. Tried on a
    channel of its own, since a refused declare closes the channel.
    """
    connection = channel._connection  # type: ignore[attr-defined]  # aio-pika has no public accessor
    probe = await plain_channel(connection)
    try:
        wanted: FieldTable = {**arguments, "x-queue-type": "quorum", GROUP_SIZE: quorum_replicas_of(channel)}
        try:
            queue = await probe.declare_queue(name, durable=True, arguments=wanted)
            return wanted, queue.declaration_result
        except aio_pika.exceptions.ChannelPreconditionFailed as exc:
            found = _CURRENT_GROUP_SIZE.search(str(exc))
            if found is None:
                raise
            current = {} if found.group(2) is None else {GROUP_SIZE: int(found.group(2))}
        as_is: FieldTable = {**arguments, "x-queue-type": "quorum", **current}
        await probe.reopen()
        queue = await probe.declare_queue(name, durable=True, arguments=as_is)
        return as_is, queue.declaration_result
    finally:
        await probe.close()


async def declare_quorum_queue(channel: AbstractChannel, name: str, arguments: FieldTable) -> AbstractQueue:
    """Declare durable quorum queue `name` on `channel` (re-declared there after a reconnect):
    with the replication factor if it is new, as it is if it exists."""
    as_declared, _ = await _probe(channel, name, arguments)
    return await channel.declare_queue(name, durable=True, arguments=as_declared)


async def declare_exchanges(channel: AbstractChannel) -> AbstractExchange:
    """Declare the shared exchanges and the dead-letter queue; return the request exchange."""
    dead = await channel.declare_exchange(DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.FANOUT, durable=True)
    dead_letters = await declare_quorum_queue(channel, DEAD_LETTER_QUEUE, {"x-message-ttl": DEAD_LETTER_TTL_MS})
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
    queue = await declare_quorum_queue(channel, name, request_queue_arguments())
    await queue.bind(request_exchange, routing_key=name)
    return queue


async def queue_depth(channel: AbstractChannel, model: str, lane: Lane, cluster: str | None = None) -> tuple[int, int]:
    """(ready messages, consumers) of a model's queue, by an idempotent declare on a channel of its
    own (not a passive declare: that fails when the queue does not exist yet)."""
    _, declared = await _probe(channel, request_queue_name(model, lane, cluster), request_queue_arguments())
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


# A request's spill deadline (unix seconds, float), set by whoever places it in an affinity queue.
SPILL_AT_HEADER = "x-hotq-spill-at"
# An affinity queue no agent consumed for this long goes away. Far longer than the longest spill
# and than the API takes to notice its agent gone, so every request in it has spilled by then.
AFFINITY_QUEUE_EXPIRES_MS = 300_000
MAX_SPILL_AFTER_MS = 60_000


def affinity_queue_name(model: str, lane: Lane, agent_id: str) -> str:
    """The queue of requests placed on one agent: its model's queue name, then the agent."""
    return f"{request_queue_name(model, lane)}.agent.{_UNSAFE.sub('_', agent_id)[:80]}"


def affinity_queue_arguments(model: str, lane: Lane) -> FieldTable:
    """Expired (spilled), rejected and over-delivered requests go to the model's shared queue."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": REQUEST_EXCHANGE,
        "x-dead-letter-routing-key": request_queue_name(model, lane),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-expires": AFFINITY_QUEUE_EXPIRES_MS,
    }


async def declare_affinity_queue(channel: AbstractChannel, model: str, lane: Lane, agent_id: str) -> AbstractQueue:
    """Declare an agent's affinity queue for one lane (its model's shared queue first: where it spills)."""
    request_exchange = await declare_exchanges(channel)
    await declare_request_queue(channel, request_exchange, model, lane)
    name = affinity_queue_name(model, lane, agent_id)
    queue = await channel.declare_queue(name, durable=True, arguments=affinity_queue_arguments(model, lane))
    await queue.bind(request_exchange, routing_key=name)
    return queue


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
    arguments: FieldTable = {"x-single-active-consumer": True} if single_active else {}
    queue = await declare_quorum_queue(channel, results_queue_name(batch_id), arguments)
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
    queue = await declare_quorum_queue(channel, USAGE_QUEUE, usage_queue_arguments())
    await queue.bind(events, routing_key=USAGE_ROUTING_KEY)
    return queue

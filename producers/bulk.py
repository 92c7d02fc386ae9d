"""Bulk publishing: a batch's lines onto its model's batch lane, and `hotq submit` / `hotq jobs`.

`dispatch` publishes every line of a stored batch that RabbitMQ has not yet
confirmed, as a `RequestEnvelope` on the batch lane, whose answers go to the
batch's results queue. Publishes are pipelined (a whole chunk in flight, confirms
awaited together), and a chunk's lines are marked published only after their
confirms, so a dispatcher killed at any point and started again re-publishes only
lines RabbitMQ never confirmed (at most one chunk), and never a confirmed one. A line
RabbitMQ refuses for its size (over the broker's `max_message_size`) is not tried again:
it fails alone, with a 413 in the batch's error file, answered through the results queue
like any failed request.

`hotq submit` stores a JSONL file as a job (a batch with source "submit", so it is
listed by GET /v1/batches too), then runs it here with a progress bar: the same
`BatchRunner` the API uses. Re-running with the job id resumes it.
"""

from __future__ import annotations

import asyncio
import re
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pamqp.frame
import structlog
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.abc import ChannelFrame
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

from broker import messages, topology
from broker.batch_input import parse_batch_file
from broker.config import Config
from broker.connection import connect
from broker.jobstore import AsyncJobStore, JobStore, Line, new_id
from broker.messages import Endpoint, ErrorReply, Lane, RequestEnvelope
from broker.openai_objects import batch_object

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
            confirmed, too_large = await _publish_chunk(
                underlay, lines, model, endpoint, expires_at, caller, routing_key, reply_to
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
) -> tuple[list[int], list[tuple[Line, int]]]:
    """Publish a chunk with every confirm in flight at once; the line numbers RabbitMQ confirmed,
    and the lines (with their message sizes) it refused as larger than it takes.

    aiormq's `basic_publish` costs a coroutine, a lock round and a full pamqp marshal per
    message, which caps one producer well below 20,000/s. Every message of a batch has
    the same method frame and nearly the same header, so the frames are built here
    (method frame once, header by hand) and written as one buffer per few hundred
    messages, registering each delivery tag's confirmation the way `basic_publish` does.
    """
    now = time.time()
    bodies = [
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
        )
        for line in lines
    ]
    if max(map(len, bodies)) > _MAX_INLINE_BODY:
        return await _publish_chunk_plainly(channel, lines, bodies, routing_key, reply_to)
    reply_to_bytes = reply_to.encode()
    method_frame = pamqp.frame.marshal(
        aiormq.spec.Basic.Publish(exchange=topology.REQUEST_EXCHANGE, routing_key=routing_key), channel.number
    )
    channel_number = channel.number
    confirmations: list[asyncio.Future[object]] = []
    async with channel.lock:  # the same lock basic_publish holds: delivery tags stay in order
        buffer = bytearray()
        for index, (line, body) in enumerate(zip(lines, bodies)):
            channel.delivery_tag += 1
            confirmation = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            confirmations.append(confirmation)
            buffer += method_frame
            buffer += _header_frame(channel_number, len(body), line.request_id.encode(), reply_to_bytes)
            buffer += struct.pack(">BHI", 3, channel_number, len(body))
            buffer += body
            buffer += b"\xce"
            if index % 256 == 255:
                await channel.write_queue.put(ChannelFrame(payload=bytes(buffer), should_close=False))
                buffer.clear()
        if buffer:
            await channel.write_queue.put(ChannelFrame(payload=bytes(buffer), should_close=False))
    outcomes = await asyncio.gather(*confirmations, return_exceptions=True)
    return [line.line for line, outcome in zip(lines, outcomes) if isinstance(outcome, aiormq.spec.Basic.Ack)], []


async def _publish_chunk_plainly(
    channel: aiormq.Channel, lines: list[Line], bodies: list[bytes], routing_key: str, reply_to: str
) -> tuple[list[int], list[tuple[Line, int]]]:
    """Through aiormq's own `basic_publish` (it splits large bodies into frames), still pipelined."""
    pending = [
        asyncio.ensure_future(
            channel.basic_publish(
                body,
                exchange=topology.REQUEST_EXCHANGE,
                routing_key=routing_key,
                properties=aiormq.spec.Basic.Properties(
                    content_type=_CONTENT_TYPE.decode(),
                    delivery_mode=2,
                    correlation_id=line.request_id,
                    message_id=line.request_id,
                    reply_to=reply_to,
                ),
                wait=False,
            )
        )
        for line, body in zip(lines, bodies)
    ]
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    confirmed = [line.line for line, outcome in zip(lines, outcomes) if isinstance(outcome, aiormq.spec.Basic.Ack)]
    limit = _broker_max_size(outcomes)
    if limit is None:
        return confirmed, []
    return confirmed, [(line, len(body)) for line, body in zip(lines, bodies) if len(body) > limit]


_REFUSED_SIZE = re.compile(r"larger than configured max size (\d+)")


def _broker_max_size(outcomes: Sequence[object]) -> int | None:
    """RabbitMQ's max_message_size, if it closed the channel over a message larger than that."""
    for outcome in outcomes:
        if isinstance(outcome, aiormq.exceptions.ChannelPreconditionFailed):
            match = _REFUSED_SIZE.search(str(outcome))
            if match:
                return int(match.group(1))
    return None


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


_MAX_INLINE_BODY = 120_000  # one body frame: below RabbitMQ's default frame_max (131,072) minus framing
_CONTENT_TYPE = messages.CONTENT_TYPE.encode()
# Header properties: content_type, delivery_mode, correlation_id, reply_to, message_id.
_PROPERTY_FLAGS = (1 << 15) | (1 << 12) | (1 << 10) | (1 << 9) | (1 << 7)


def _header_frame(channel_number: int, body_size: int, request_id: bytes, reply_to: bytes) -> bytes:
    payload = b"".join(
        (
            struct.pack(">HHQH", 60, 0, body_size, _PROPERTY_FLAGS),
            bytes((len(_CONTENT_TYPE),)),
            _CONTENT_TYPE,
            b"\x02",  # persistent
            bytes((len(request_id),)),
            request_id,
            bytes((len(reply_to),)),
            reply_to,
            bytes((len(request_id),)),
            request_id,
        )
    )
    return struct.pack(">BHI", 2, channel_number, len(payload)) + payload + b"\xce"


# -- `hotq submit` and `hotq jobs` ---------------------------------------------------


class SubmitError(Exception):
    """What `hotq submit` / `hotq jobs` report to the user (and exit 1 on)."""


def create_job(
    config: Config, store: JobStore, path: Path, model: str, job_id: str | None, owner: str
) -> dict[str, Any]:
    """Validate the input file and store it as `owner`'s batch (source "submit"); raise SubmitError if invalid."""
    data = path.read_bytes()
    parsed = parse_batch_file(data, None, config.models, config.max_body_bytes, default_model=model, allow_plain=True)
    if parsed.errors:
        problems = "\n".join(f"  line {e['line']}: {e['code']}: {e['message']}" for e in parsed.errors[:20])
        more = f"\n  ... and {len(parsed.errors) - 20} more" if len(parsed.errors) > 20 else ""
        raise SubmitError(f"{path} has {len(parsed.errors)} invalid line(s); nothing was submitted:\n{problems}{more}")
    assert parsed.endpoint is not None
    file = store.files.create(path.name, "batch", data, owner)
    batch = store.batches.create(
        batch_id=job_id or new_id("batch_"),
        endpoint=parsed.endpoint.path,
        model=parsed.model,
        input_file_id=file.id,
        window_s=config.batch_window_s,
        metadata={"submitted_by": "hotq submit", "input": str(path)},
        source="submit",
        owner=owner,
        lines=parsed.lines,
    )
    return batch_object(batch)


def write_results(store: JobStore, batch_id: str, out: Path) -> int:
    """Every answer of the job in OpenAI's batch output format, in input order (failed ones too)."""
    records = store.results.records(batch_id)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w") as file:
        for record in records:
            file.write(record + "\n")
    tmp.replace(out)
    return len(records)


async def run_job(config: Config, store: JobStore, batch_id: str, collect: bool, show_progress: bool) -> dict[str, Any]:
    """Dispatch a stored job's unconfirmed lines and (with `collect`) collect until it is finished."""
    from consumers.collector import BatchRunner  # collector imports this module

    row = store.batches.get(batch_id)
    assert row is not None
    astore = AsyncJobStore(store)
    connection = await connect(config.amqp_url, "submit", config.amqp_tls)
    progress = Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>9}/s"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show_progress,
    )
    published = progress.add_task(
        "published", total=row.total, completed=store.lines.published_count(batch_id), rate="-"
    )
    collected = progress.add_task(
        "collected", total=row.total, completed=store.results.count(batch_id), rate="-", visible=collect
    )

    def advance(task: TaskID, count: int) -> None:
        progress.advance(task, count)
        speed = progress.tasks[task].speed
        progress.update(task, rate=f"{speed:,.0f}" if speed else "-")

    runner = BatchRunner(
        connection,
        astore,
        batch_id,
        collect=collect,
        on_published=lambda n: advance(published, n),
        on_collected=lambda n: advance(collected, n),
    )
    try:
        with progress:
            return await runner.run()
    finally:
        await connection.close()
        astore.shutdown()


def cancel_job(config: Config, store: JobStore, batch_id: str) -> dict[str, Any]:
    batch = store.batches.get(batch_id)
    if batch is None:
        raise SubmitError(f"no job {batch_id}")
    if batch.status in ("cancelling", "cancelled"):
        return batch_object(batch)
    if not store.batches.set_status(batch_id, "cancelling", only_from=["validating", "in_progress"]):
        raise SubmitError(f"job {batch_id} is {batch.status}; it cannot be cancelled")
    if store.batches.runner_alive(batch_id):  # its runner finishes the cancel
        cancelling = store.batches.get(batch_id)
        assert cancelling is not None
        return batch_object(cancelling)
    return asyncio.run(run_job(config, store, batch_id, collect=True, show_progress=False))

"""A consumer drops an answer only when its reply queue is really gone (issue 13: a batch line lost).

RabbitMQ refuses a reply in two ways that aio-pika raises alike: a return (no queue by that name:
the caller left) and a nack (the queue could not take it now: a quorum results queue without a
leader during a failover). Only the first may end a request without an answer. Here a results
queue that rejects what it cannot hold (`x-overflow: reject-publish`, full) plays the failover's nacks
on a single node.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp.common import FieldTable

from broker import messages, topology
from broker.messages import Endpoint, ErrorReply, Final, Lane, ReplyFrame, RequestEnvelope
from ops.processes import wait_until_async
from ops.testing.deadlines import EVENTUALLY_S
from tests.conftest import FakeWorker


async def _publish_request(channel: AbstractChannel, model: str, request_id: str, reply_to: str) -> None:
    now = time.time()
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"line {request_id}"}]})
    envelope = RequestEnvelope(
        request_id, model, Endpoint.CHAT, body.encode(), False, now + 600, now + 600, "tester", Lane.BATCH, now
    )
    exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE)
    message = aio_pika.Message(
        messages.encode(envelope),
        content_type=messages.CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=request_id,
        message_id=request_id,
        reply_to=reply_to,
    )
    await exchange.publish(message, topology.request_queue_name(model, Lane.BATCH), mandatory=True)


def _log_lines(log: Path, event: str, request_id: str | None = None) -> list[str]:
    return [
        line for line in log.read_text().splitlines() if event in line and (request_id is None or request_id in line)
    ]


async def test_a_nacked_answer_is_sent_again_not_dropped(fake_worker: FakeWorker, amqp_url: str) -> None:
    model, request_id = fake_worker.model, uuid.uuid4().hex
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_model_queues(channel, [model], (Lane.BATCH,))
        # A batch's results queue that is full and refuses (nacks) more until the test takes the fillers.
        arguments: FieldTable = {"x-queue-type": "quorum", "x-max-length": 1, "x-overflow": "reject-publish"}
        results = await channel.declare_queue(f"hotq.results.nacks-{request_id}", durable=True, arguments=arguments)
        await topology.bind_reply_queue(channel, results)
        for _ in range(2):  # a quorum queue notices it is over its length after the fact: one more
            await channel.default_exchange.publish(aio_pika.Message(b"filler"), routing_key=results.name)

        await _publish_request(channel, model, request_id, results.name)
        nacks_before = len(_log_lines(fake_worker.log, "publish_nacked_renewing_channel", results.name))
        await wait_until_async(
            lambda: len(_log_lines(fake_worker.log, "publish_nacked_renewing_channel", results.name)) > nacks_before,
            EVENTUALLY_S,
            "the answer nacked",
        )
        frames: asyncio.Queue[ReplyFrame] = asyncio.Queue()

        async def on_message(message: AbstractIncomingMessage) -> None:
            await message.ack()
            if message.body != b"filler":
                frames.put_nowait(messages.decode_as(message.body, ReplyFrame))

        await results.consume(on_message)  # the fillers go: the queue takes the answer now
        async with asyncio.timeout(EVENTUALLY_S):
            while not isinstance(frame := await frames.get(), Final | ErrorReply):
                pass
        assert isinstance(frame, Final) and frame.request_id == request_id and frame.status == 200, frame
        await results.delete(if_unused=False, if_empty=False)
    assert not _log_lines(fake_worker.log, "caller_gone", request_id), "a nacked answer was taken for a caller gone"


async def test_an_answer_whose_queue_is_gone_is_dropped_and_logged(fake_worker: FakeWorker, amqp_url: str) -> None:
    model, request_id = fake_worker.model, uuid.uuid4().hex
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare_model_queues(channel, [model], (Lane.BATCH,))
        await _publish_request(channel, model, request_id, f"hotq.results.never-made-{request_id}")
        await wait_until_async(
            lambda: _log_lines(fake_worker.log, "caller_gone", request_id), EVENTUALLY_S, "caller_gone logged"
        )
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        assert depth == 0, "the request was settled: nobody can take its answer"

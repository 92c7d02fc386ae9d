"""Issue 14: a consumer whose backend is full leaves new work to a free consumer of the same model.

Prefetch is dealt from free backend slots across all of a consumer's queues (`consumers/intake.py`),
so a full consumer holds at most one waiting delivery per queue, on its interactive, cluster-pinned
and batch queues alike; everything else goes to the consumer that can start it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from broker import messages, topology
from broker.connection import connect
from broker.messages import Endpoint, ErrorReply, Final, Lane, RequestEnvelope
from consumers.backend_client import BackendClient
from consumers.consumer import Consumer
from consumers.handler import RequestHandler
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import Hold, fake_stats, running_fake_backend

MAX_INFLIGHT, RESERVED_INTERACTIVE = 4, 1
PER_QUEUE = 8
CLUSTER = "c1"
QUEUES = ((Lane.INTERACTIVE, None), (Lane.INTERACTIVE, CLUSTER), (Lane.BATCH, None))


async def _eventually(condition_name: str, condition: Callable[[], bool]) -> None:
    """Wait for `condition()`: polls, with a deadline only to turn a hang into a failure."""
    deadline = time.monotonic() + EVENTUALLY_S
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, f"never: {condition_name}"
        await asyncio.sleep(0.05)


async def test_a_full_consumer_leaves_new_work_to_a_free_one(
    amqp_url: str, session_tag: str, delete_test_queues: list[str], tmp_path: Path
) -> None:
    model = f"test-org/intake.v1-{session_tag}"
    delete_test_queues.append(model)
    hold = Hold(tmp_path / "release")
    with running_fake_backend([model]) as backend_url:
        connection = await connect(amqp_url, "test-intake")
        backend = BackendClient(backend_url, max_connections=128)
        full, free = (
            Consumer(
                connection,
                model,
                RequestHandler(backend, flush_interval_s=0.05),
                max_inflight=max_inflight,
                reserved_interactive=RESERVED_INTERACTIVE,
                lanes=tuple(Lane),
                cluster=CLUSTER,
            )
            for max_inflight in (MAX_INFLIGHT, 4 * PER_QUEUE)
        )
        channel = await connection.channel()
        replies = await channel.declare_queue(f"test-intake-replies-{uuid.uuid4().hex}", exclusive=True)
        await topology.bind_reply_queue(channel, replies)
        answered: set[str] = set()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            record = messages.decode(message.body)
            if isinstance(record, Final | ErrorReply):
                answered.add(record.request_id)

        await replies.consume(on_reply, no_ack=True)
        request_exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE, ensure=False)
        sent: list[str] = []

        async def publish(lane: Lane, cluster: str | None) -> None:
            request_id = uuid.uuid4().hex
            body = {"model": model, "messages": [{"role": "user", "content": f"held {request_id}"}]} | hold.field
            now = time.time()
            envelope = RequestEnvelope(
                request_id, model, Endpoint.CHAT, json.dumps(body).encode(), False, now + 600, now + 600, "t", lane, now
            )
            message = aio_pika.Message(
                messages.encode(envelope),
                content_type=messages.CONTENT_TYPE,
                correlation_id=request_id,
                reply_to=replies.name,
            )
            await request_exchange.publish(message, topology.request_queue_name(model, lane, cluster), mandatory=True)
            sent.append(request_id)

        try:
            await full.start()
            for _ in range(MAX_INFLIGHT):
                await publish(Lane.INTERACTIVE, None)
            await _eventually(
                "the first consumer's backend is full", lambda: fake_stats(backend_url)["active"] == MAX_INFLIGHT
            )
            await free.start()
            for _ in range(PER_QUEUE):
                for lane, cluster in QUEUES:
                    await publish(lane, cluster)
            total = MAX_INFLIGHT + PER_QUEUE * len(QUEUES)
            await _eventually("every request taken", lambda: full.held + free.held == total)
            # What the full consumer holds beyond what it runs: at most one waiting per queue.
            assert full.held <= MAX_INFLIGHT + len(QUEUES), (full.held, free.held)
            assert free.held >= PER_QUEUE * len(QUEUES) - len(QUEUES)
            hold.release()
            await _eventually("every request answered", lambda: answered == set(sent))
            await _eventually("every delivery settled", lambda: full.held == free.held == 0)
            for lane, cluster in QUEUES:
                name = topology.request_queue_name(model, lane, cluster)
                queue = await channel.declare_queue(name, passive=True)
                assert queue.declaration_result.message_count == 0, name
        finally:
            hold.release()
            await full.stop(grace_s=5)
            await free.stop(grace_s=5)
            await backend.close()
            await connection.close()

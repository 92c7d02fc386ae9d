"""Issue 14: a consumer whose backend is full leaves new work to a free consumer of the same model.

Prefetch is dealt from free backend slots across all of a consumer's queues (`consumers/intake.py`),
so a full consumer holds at most one waiting delivery per queue, on its interactive, cluster-pinned
and batch queues alike; everything else goes to the consumer that can start it. And any one of its
queues still fills the backend alone, after another one ran dry.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

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


class _Rig:
    """Consumers of one model on the fake backend, and requests published straight to their queues."""

    def __init__(self, model: str, backend_url: str, connection: AbstractRobustConnection) -> None:
        self.model = model
        self.backend_url = backend_url
        self.connection = connection
        self.backend = BackendClient(backend_url, max_connections=128)
        self.consumers: list[Consumer] = []
        self.sent: list[str] = []
        self.answered: set[str] = set()

    async def open(self) -> None:
        self.channel = await self.connection.channel()
        self.replies = await self.channel.declare_queue(f"test-intake-replies-{uuid.uuid4().hex}", exclusive=True)
        await topology.bind_reply_queue(self.channel, self.replies)
        await self.replies.consume(self._on_reply, no_ack=True)
        self.requests = await self.channel.get_exchange(topology.REQUEST_EXCHANGE, ensure=False)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        record = messages.decode(message.body)
        if isinstance(record, Final | ErrorReply):
            self.answered.add(record.request_id)

    async def consumer(self, max_inflight: int) -> Consumer:
        consumer = Consumer(
            self.connection,
            self.model,
            RequestHandler(self.backend, flush_interval_s=0.05),
            max_inflight=max_inflight,
            reserved_interactive=RESERVED_INTERACTIVE,
            lanes=tuple(Lane),
            cluster=CLUSTER,
        )
        self.consumers.append(consumer)
        await consumer.start()
        return consumer

    async def publish(self, lane: Lane, cluster: str | None, hold: Hold) -> None:
        request_id = uuid.uuid4().hex
        body = {"model": self.model, "messages": [{"role": "user", "content": f"held {request_id}"}]} | hold.field
        now = time.time()
        envelope = RequestEnvelope(
            request_id,
            self.model,
            Endpoint.CHAT,
            json.dumps(body).encode(),
            False,
            now + 600,
            now + 600,
            "t",
            lane,
            now,
        )
        message = aio_pika.Message(
            messages.encode(envelope),
            content_type=messages.CONTENT_TYPE,
            correlation_id=request_id,
            reply_to=self.replies.name,
        )
        await self.requests.publish(message, topology.request_queue_name(self.model, lane, cluster), mandatory=True)
        self.sent.append(request_id)

    def active(self) -> int:
        return int(fake_stats(self.backend_url)["active"])

    async def all_answered_and_settled(self) -> None:
        await _eventually("every request answered", lambda: self.answered == set(self.sent))
        await _eventually("every delivery settled", lambda: all(c.held == 0 for c in self.consumers))
        for lane, cluster in QUEUES:
            name = topology.request_queue_name(self.model, lane, cluster)
            queue = await self.channel.declare_queue(name, passive=True)
            assert queue.declaration_result.message_count == 0, name


@asynccontextmanager
async def _rig(amqp_url: str, model: str) -> AsyncIterator[_Rig]:
    with running_fake_backend([model]) as backend_url:
        connection = await connect(amqp_url, "test-intake")
        rig = _Rig(model, backend_url, connection)
        try:
            await rig.open()
            yield rig
        finally:
            for consumer in rig.consumers:
                await consumer.stop(grace_s=5)
            await rig.backend.close()
            await connection.close()


async def test_a_full_consumer_leaves_new_work_to_a_free_one(
    amqp_url: str, session_tag: str, delete_test_queues: list[str], tmp_path: Path
) -> None:
    model = f"test-org/intake.v1-{session_tag}"
    delete_test_queues.append(model)
    hold = Hold(tmp_path / "release")
    async with _rig(amqp_url, model) as rig:
        try:
            full = await rig.consumer(MAX_INFLIGHT)
            for _ in range(MAX_INFLIGHT):
                await rig.publish(Lane.INTERACTIVE, None, hold)
            await _eventually("the first consumer's backend is full", lambda: rig.active() == MAX_INFLIGHT)
            free = await rig.consumer(4 * PER_QUEUE)
            for _ in range(PER_QUEUE):
                for lane, cluster in QUEUES:
                    await rig.publish(lane, cluster, hold)
            total = MAX_INFLIGHT + PER_QUEUE * len(QUEUES)
            await _eventually("every request taken", lambda: full.held + free.held == total)
            # What the full consumer holds beyond what it runs: at most one waiting per queue.
            assert full.held <= MAX_INFLIGHT + len(QUEUES), (full.held, free.held)
            assert free.held >= PER_QUEUE * len(QUEUES) - len(QUEUES)
        finally:
            hold.release()
        await rig.all_answered_and_settled()


async def test_each_queue_alone_fills_the_backend_after_another_ran_dry(
    amqp_url: str, session_tag: str, delete_test_queues: list[str], tmp_path: Path
) -> None:
    model = f"test-org/intake-turns.v1-{session_tag}"
    delete_test_queues.append(model)
    async with _rig(amqp_url, model) as rig:
        consumer = await rig.consumer(MAX_INFLIGHT)
        for turn, (lane, cluster) in enumerate(QUEUES + QUEUES[:1]):
            hold = Hold(tmp_path / f"release-{turn}")
            try:
                await _alone_it_fills_the_backend(rig, consumer, lane, cluster, hold)
            finally:
                hold.release()
            await rig.all_answered_and_settled()


async def _alone_it_fills_the_backend(
    rig: _Rig, consumer: Consumer, lane: Lane, cluster: str | None, hold: Hold
) -> None:
    for _ in range(MAX_INFLIGHT + 2):
        await rig.publish(lane, cluster, hold)
    fills = MAX_INFLIGHT - RESERVED_INTERACTIVE if lane is Lane.BATCH else MAX_INFLIGHT
    await _eventually(f"{lane} {cluster} alone fills the backend", lambda: rig.active() == fills)
    await _eventually("one more held, ready for the next free slot", lambda: consumer.held == fills + 1)

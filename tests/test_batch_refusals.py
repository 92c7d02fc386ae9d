"""A batch line RabbitMQ refuses for its size fails alone: no retry loop, other lines go on.

The one large test of the suite: RabbitMQ's default max_message_size is 128 MiB and hotq does not
change the broker, so the refused line is 128 MiB + 1 KiB (the test process peaks near 0.6 GB).
Lines over max_body_bytes never get this far: batch creation refuses them (tests/test_hardening.py).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from pathlib import Path

import aio_pika

from broker import messages, topology
from broker.jobstore import AsyncJobStore, JobStore
from broker.messages import Endpoint, ErrorReply, Lane
from ops.testing.jobs import store_submitted_batch
from producers import bulk

RABBITMQ_MAX_MESSAGE = 128 * 1024 * 1024  # RabbitMQ's default max_message_size


async def test_a_line_rabbitmq_refuses_fails_alone(tmp_path: Path, amqp_url: str, session_tag: str) -> None:
    model = f"test-org/refused-line-{session_tag}"  # no consumer: queue depths count publishes
    db = JobStore(tmp_path)
    store = AsyncJobStore(db)
    small = json.dumps({"model": model, "prompt": "x"}).encode()
    huge = json.dumps({"model": model, "prompt": "x" * (RABBITMQ_MAX_MESSAGE + 1024)}).encode()
    batch_id = f"batch_refused_{session_tag}"
    store_submitted_batch(db, batch_id, model, "/v1/completions", [small, huge, small], "tester")
    del huge
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        # Returns (the old code re-sent the refused line every second, forever).
        await bulk.dispatch(connection, store, batch_id, model, Endpoint.COMPLETIONS, time.time() + 3600, "tester")
        assert db.lines.published_count(batch_id) == 3  # nothing is left to publish again
        channel = await connection.channel()
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        assert depth == 2  # the two small lines, once each
        results = await channel.declare_queue(topology.results_queue_name(batch_id), passive=True)
        message = await results.get(no_ack=True, fail=True)
        assert message is not None
        reply = messages.decode_as(message.body, ErrorReply)
        assert db.lines.owners([reply.request_id])[reply.request_id].line == 2  # the huge line's answer
        assert reply.status == 413 and reply.code == "message_too_large"
        assert await results.get(no_ack=True, fail=False) is None  # one answer, for that line only
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"\nrefused line: {RABBITMQ_MAX_MESSAGE + 1024} bytes; test process peak RSS {peak_mb:.0f} MB")
        await channel.queue_delete(topology.request_queue_name(model, Lane.BATCH))
        await channel.queue_delete(topology.results_queue_name(batch_id))
    finally:
        await connection.close()
        await asyncio.to_thread(store.close)

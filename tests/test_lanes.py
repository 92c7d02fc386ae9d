"""Issue 5 acceptance 6: interactive requests beside a 10,000-request batch backlog."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import openai
import pytest

from broker import topology
from broker.jobstore import AsyncJobStore, JobStore
from broker.messages import Endpoint, Lane
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import Hold, fake_stats
from ops.testing.jobs import store_submitted_batch
from ops.testing.stack import Stack, api_and_worker_on_a_fake_backend
from producers import bulk

DELAY_MS = 50  # the fake backend's delay before each token of the interactive streams
BACKLOG = 10_000
MAX_INFLIGHT, RESERVED_INTERACTIVE = 8, 2


@pytest.fixture(scope="module")
def lanes_model(session_tag: str, delete_test_queues: list[str]) -> str:
    model = f"test-org/lanes.v1-{session_tag}"
    delete_test_queues.append(model)
    return model


@pytest.fixture(scope="module")
def lanes_stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, lanes_model: str) -> Iterator[Stack]:
    table = {"max_inflight": MAX_INFLIGHT, "reserved_interactive": RESERVED_INTERACTIVE}
    workdir = tmp_path_factory.mktemp("lanes")
    with api_and_worker_on_a_fake_backend(workdir, amqp_url, lanes_model, table, stream_flush_ms=0) as stack:
        yield stack


def _ttfts(client: openai.OpenAI, model: str, count: int) -> list[float]:
    samples = []
    for i in range(count):
        started = time.perf_counter()
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": f"interactive {i} now"}],
            stream=True,
            extra_body={"fake_delay_ms": DELAY_MS},
        )
        first = None
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        assert first is not None
        samples.append(first)
    return samples


async def _publish_backlog(amqp_url: str, data_dir: Path, model: str, hold: Hold) -> str:
    db = JobStore(data_dir)
    store = AsyncJobStore(db)
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "batch work"}]} | hold.field).encode()
    batch_id = "batch_lanes_backlog"
    store_submitted_batch(db, batch_id, model, "/v1/chat/completions", [body] * BACKLOG, "tester")
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        await bulk.dispatch(connection, store, batch_id, model, Endpoint.CHAT, time.time() + 3600, "tester")
    finally:
        await connection.close()
        await asyncio.to_thread(store.close)
    return batch_id


async def _batch_depth(amqp_url: str, model: str, delete_with: str | None = None) -> int:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel()
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        if delete_with is not None:
            await channel.queue_delete(topology.request_queue_name(model, Lane.BATCH))
            await channel.queue_delete(topology.results_queue_name(delete_with))
        return depth


def test_interactive_requests_are_served_beside_a_batch_backlog(
    lanes_stack: Stack, lanes_model: str, amqp_url: str, tmp_path: Path
) -> None:
    """The batch lane fills every slot but the reserved ones, and its work is held there: interactive
    streams are still answered, so they never wait for batch work (the reserved slots are theirs).
    Their time to first token, idle and beside the backlog, is printed, not asserted: how fast is a
    benchmark's question, asked on a quiet machine."""
    backend_url = str(lanes_stack.backend_url)
    client = openai.OpenAI(base_url=lanes_stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)
    _ttfts(client, lanes_model, 3)  # warm up connections
    idle = _ttfts(client, lanes_model, 15)
    hold = Hold(tmp_path / "release")
    batch_id = asyncio.run(_publish_backlog(amqp_url, tmp_path, lanes_model, hold))
    try:
        saturated = MAX_INFLIGHT - RESERVED_INTERACTIVE
        wait_until(
            lambda: fake_stats(backend_url)["active"] == saturated, EVENTUALLY_S, f"{saturated} batch requests held"
        )
        loaded = _ttfts(client, lanes_model, 15)
        assert fake_stats(backend_url)["completed"] == 3 + 15 + 15  # the streams, while no batch work ended
        remaining = asyncio.run(_batch_depth(amqp_url, lanes_model, delete_with=batch_id))
    finally:
        hold.release()
    # Beside the held ones, the consumer keeps one batch request ready for its next free slot (consumers/intake.py).
    assert remaining >= BACKLOG - saturated - 1, "the backlog moved during the measurement"
    idle_p50, loaded_p50 = statistics.median(idle), statistics.median(loaded)
    print(
        f"\nTTFT idle p50 {idle_p50 * 1000:.1f} ms p99 {max(idle) * 1000:.1f} ms;"
        f" beside a {BACKLOG} backlog p50 {loaded_p50 * 1000:.1f} ms p99 {max(loaded) * 1000:.1f} ms"
    )

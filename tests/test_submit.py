"""Issue 5 acceptance 4: `hotq submit` of 20,000 lines, resumable; and the dispatcher's resume rule."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest

from broker import topology
from broker.jobstore import AsyncJobStore, JobStore
from broker.messages import Endpoint, Lane
from ops.testing.fake_backend import reply_text, running_fake_backend
from ops.testing.stack import Stack, api_and_worker
from producers import bulk

ROOT = Path(__file__).resolve().parent.parent
LINES = 20_000


@pytest.fixture(scope="module")
def submit_model(session_tag: str, delete_test_queues: list[str]) -> str:
    model = f"test-org/bulk-submit.v1-{session_tag}"
    delete_test_queues.append(model)
    return model


@pytest.fixture(scope="module")
def backend_url(submit_model: str) -> Iterator[str]:
    with running_fake_backend([submit_model]) as url:
        yield url


@pytest.fixture(scope="module")
def submit_stack(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, submit_model: str, backend_url: str
) -> Iterator[Stack]:
    """An API (to see bulk jobs in GET /v1/batches) and one worker; `hotq submit` runs beside them."""
    table = {"backend_url": backend_url, "max_inflight": 64}
    with api_and_worker(tmp_path_factory.mktemp("submit"), amqp_url, submit_model, table) as stack:
        yield stack


def _hotq(stack: Stack, *args: str, log: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", *args, "--config", str(stack.config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=open(stack.workdir / log, "wb"),
    )


def _collected(stack: Stack, job_id: str) -> int:
    store = JobStore(stack.workdir / "data")
    try:
        batch = store.get_batch(job_id)
        return 0 if batch is None else batch["request_counts"]["completed"] + batch["request_counts"]["failed"]
    finally:
        store.close()


def test_submit_20000_lines_killed_and_resumed(submit_stack: Stack, submit_model: str, backend_url: str) -> None:
    workdir = submit_stack.workdir
    source = workdir / "prompts.jsonl"
    # Plain request bodies (custom_id = line number) and no model: --model fills it in.
    source.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"p {i}"}]}) + "\n" for i in range(LINES))
    )
    httpx.post(backend_url + "/_reset")
    out = workdir / "results.jsonl"
    job_id = "batch_submit_test_job"
    args = ["submit", str(source), "--model", submit_model, "--out", str(out), "--job-id", job_id]

    started = time.monotonic()
    first = _hotq(submit_stack, *args, log="submit1.log")
    deadline = time.monotonic() + 60
    while _collected(submit_stack, job_id) < LINES // 4:
        assert first.poll() is None, (workdir / "submit1.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    collected_at_kill = _collected(submit_stack, job_id)
    assert collected_at_kill < LINES, "the job finished before it was killed"
    listed = httpx.get(submit_stack.url + "/v1/batches").json()["data"]
    assert job_id in [b["id"] for b in listed]  # a bulk job is a batch like any other

    second = _hotq(submit_stack, *args, log="submit2.log")
    assert second.wait(timeout=120) == 0, (workdir / "submit2.log").read_text()
    elapsed = time.monotonic() - started
    log = (workdir / "submit2.log").read_text()
    assert f"resuming job {job_id}" in log

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == LINES
    assert [r["custom_id"] for r in records] == [str(n) for n in range(1, LINES + 1)]
    for number in (1, LINES // 2, LINES):
        record = records[number - 1]
        assert record["error"] is None and record["response"]["status_code"] == 200
        content = record["response"]["body"]["choices"][0]["message"]["content"]
        assert content == reply_text([{"role": "user", "content": f"p {number - 1}"}], None)
    stats = httpx.get(backend_url + "/_stats").json()
    assert stats["started"] == LINES  # every line served once: nothing was published twice
    batch = httpx.get(f"{submit_stack.url}/v1/batches/{job_id}").json()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == LINES
    print(f"\nsubmit: {LINES} lines end to end in {elapsed:.1f} s ({LINES / elapsed:,.0f}/s incl. the kill)")


def test_submit_rejects_invalid_file(submit_stack: Stack, submit_model: str) -> None:
    bad = submit_stack.workdir / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{oops\n{"prompt": "y", "model": "other"}\n')
    process = _hotq(submit_stack, "submit", str(bad), "--model", submit_model, "--out", "x.jsonl", log="bad.log")
    assert process.wait(timeout=30) == 1
    log = (submit_stack.workdir / "bad.log").read_text()
    assert "line 2: invalid_json_line" in log and "line 3: mismatched_endpoint" in log


def test_detach_then_fetch(submit_stack: Stack, submit_model: str) -> None:
    source = submit_stack.workdir / "small.jsonl"
    lines = [
        {
            "custom_id": f"d{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": submit_model, "prompt": f"w {i}"},
        }
        for i in range(50)
    ]
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    detached = _hotq(submit_stack, "submit", str(source), "--model", submit_model, "--detach", log="detach.log")
    stdout, _ = detached.communicate(timeout=30)
    assert detached.returncode == 0, (submit_stack.workdir / "detach.log").read_text()
    job_id = stdout.decode().strip().splitlines()[-1]
    assert job_id.startswith("batch_")
    out = submit_stack.workdir / "fetched.jsonl"
    fetch = _hotq(submit_stack, "jobs", "fetch", job_id, "--out", str(out), log="fetch.log")
    assert fetch.wait(timeout=60) == 0, (submit_stack.workdir / "fetch.log").read_text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [f"d{i}" for i in range(50)]
    status = _hotq(submit_stack, "jobs", "status", job_id, log="status.log")
    assert json.loads(status.communicate(timeout=30)[0])["status"] == "completed"


async def test_dispatch_resumes_without_republishing(tmp_path: Path, amqp_url: str, session_tag: str) -> None:
    """A dispatcher stopped after its first chunk, run again, leaves each line in the queue exactly once."""
    model = f"test-org/dispatch-resume-{session_tag}"  # no consumer: the queue depth counts publishes
    store = AsyncJobStore(JobStore(tmp_path))
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    total = 3 * bulk.PUBLISH_CHUNK + 17
    batch_id = "batch_dispatch_resume"
    store.store.create_batch(
        batch_id=batch_id,
        endpoint="/v1/completions",
        model=model,
        input_file_id="file-x",
        window_s=3600,
        metadata=None,
        source="submit",
        owner="tester",
        lines=[(n, str(n), body) for n in range(1, total + 1)],
    )
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        chunks: list[int] = []
        started = time.perf_counter()
        first = await bulk.dispatch(
            connection,
            store,
            batch_id,
            model,
            Endpoint.COMPLETIONS,
            time.time() + 3600,
            "tester",
            should_stop=lambda: len(chunks) >= 1,
            on_published=chunks.append,
        )
        assert first == bulk.PUBLISH_CHUNK == store.store.published_count(batch_id)
        second = await bulk.dispatch(
            connection, store, batch_id, model, Endpoint.COMPLETIONS, time.time() + 3600, "tester"
        )
        elapsed = time.perf_counter() - started
        assert first + second == total == store.store.published_count(batch_id)
        channel = await connection.channel()
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        assert depth == total
        print(f"\nbulk publish: {total} confirmed in {elapsed:.2f} s = {total / elapsed:,.0f}/s")
        await channel.queue_delete(topology.request_queue_name(model, Lane.BATCH))
        await channel.queue_delete(topology.results_queue_name(batch_id))
    finally:
        await connection.close()
        await asyncio.to_thread(store.close)

"""Issue 5 acceptance 4: `hotq submit` of 20,000 lines, resumable; and the dispatcher's resume rule."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import pytest

from broker import topology
from broker.jobstore import AsyncJobStore, JobStore
from broker.messages import Endpoint, Lane
from ops.processes import Child, wait_until
from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S
from ops.testing.fake_backend import fake_stats, reply_text
from ops.testing.jobs import store_submitted_batch
from ops.testing.stack import ROOT, Stack, api_and_worker_on_a_fake_backend, hotq_command, run_hotq
from producers import bulk

LINES = 20_000


@pytest.fixture(scope="module")
def submit_model(session_tag: str, delete_test_queues: list[str]) -> str:
    model = f"test-org/bulk-submit.v1-{session_tag}"
    delete_test_queues.append(model)
    return model


@pytest.fixture(scope="module")
def submit_stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, submit_model: str) -> Iterator[Stack]:
    """An API (to see bulk jobs in GET /v1/batches) and one worker; `hotq submit` runs beside them."""
    workdir = tmp_path_factory.mktemp("submit")
    with api_and_worker_on_a_fake_backend(workdir, amqp_url, submit_model, {"max_inflight": 64}) as stack:
        yield stack


def _submit(stack: Stack, name: str, *args: str) -> Child:
    """`hotq submit ARGS` running, its output in `<name>.log` in the stack's directory."""
    command = hotq_command("submit", *args, "--config", str(stack.config))
    return Child(name, command, stack.workdir / f"{name}.log", cwd=ROOT)


def _collected(stack: Stack, job_id: str) -> int:
    store = JobStore(stack.workdir / "data")
    try:
        batch = store.batches.get(job_id)
        return 0 if batch is None else batch.completed + batch.failed
    finally:
        store.close()


def test_submit_20000_lines_killed_and_resumed(submit_stack: Stack, submit_model: str) -> None:
    workdir, backend_url = submit_stack.workdir, str(submit_stack.backend_url)
    source = workdir / "prompts.jsonl"
    # Plain request bodies (custom_id = line number) and no model: --model fills it in.
    source.write_text(
        "".join(json.dumps({"messages": [{"role": "user", "content": f"p {i}"}]}) + "\n" for i in range(LINES))
    )
    httpx.post(backend_url + "/_reset", timeout=EVENTUALLY_S)
    out = workdir / "results.jsonl"
    job_id = "batch_submit_test_job"
    args = [str(source), "--model", submit_model, "--out", str(out), "--job-id", job_id]

    started = time.monotonic()
    first = _submit(submit_stack, "submit1", *args)
    wait_until(
        lambda: _collected(submit_stack, job_id) >= LINES // 4, LONG_WORK_S, "a quarter of the lines collected", first
    )
    first.send_signal(signal.SIGKILL)
    first.wait()
    collected_at_kill = _collected(submit_stack, job_id)
    assert collected_at_kill < LINES, "the job finished before it was killed"
    listed = httpx.get(submit_stack.url + "/v1/batches", timeout=EVENTUALLY_S).json()["data"]
    assert job_id in [b["id"] for b in listed]  # a bulk job is a batch like any other

    second = _submit(submit_stack, "submit2", *args)
    assert second.wait(timeout=LONG_WORK_S) == 0, second.log_text()
    elapsed = time.monotonic() - started
    assert f"resuming job {job_id}" in second.log_text()

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == LINES
    assert [r["custom_id"] for r in records] == [str(n) for n in range(1, LINES + 1)]
    for number in (1, LINES // 2, LINES):
        record = records[number - 1]
        assert record["error"] is None and record["response"]["status_code"] == 200
        content = record["response"]["body"]["choices"][0]["message"]["content"]
        assert content == reply_text([{"role": "user", "content": f"p {number - 1}"}], None)
    stats = fake_stats(backend_url)
    assert stats["started"] == LINES  # every line served once: nothing was published twice
    batch = httpx.get(f"{submit_stack.url}/v1/batches/{job_id}", timeout=EVENTUALLY_S).json()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == LINES
    print(f"\nsubmit: {LINES} lines end to end in {elapsed:.1f} s ({LINES / elapsed:,.0f}/s incl. the kill)")


def test_submit_rejects_invalid_file(submit_stack: Stack, submit_model: str) -> None:
    bad = submit_stack.workdir / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n{oops\n{"prompt": "y", "model": "other"}\n')
    done = run_hotq(submit_stack.config, "submit", str(bad), "--model", submit_model, "--out", "x.jsonl",
                    "--job-id", "batch_invalid_input")  # fmt: skip
    assert done.returncode == 1
    assert "line 2: invalid_json_line" in done.stderr and "line 3: mismatched_endpoint" in done.stderr
    store = JobStore(submit_stack.workdir / "data")
    try:  # nothing was submitted: neither the job nor the copy of its input stays behind
        assert store.batches.get("batch_invalid_input") is None
        assert "bad.jsonl" not in [file.filename for file in store.files.page()[0]]
    finally:
        store.close()


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
    detached = run_hotq(submit_stack.config, "submit", str(source), "--model", submit_model, "--detach")
    assert detached.returncode == 0, detached.stderr
    job_id = detached.stdout.strip().splitlines()[-1]
    assert job_id.startswith("batch_")
    out = submit_stack.workdir / "fetched.jsonl"
    fetch = run_hotq(submit_stack.config, "jobs", "fetch", job_id, "--out", str(out))
    assert fetch.returncode == 0, fetch.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["custom_id"] for r in records] == [f"d{i}" for i in range(50)]
    status = run_hotq(submit_stack.config, "jobs", "status", job_id)
    assert json.loads(status.stdout)["status"] == "completed"


async def test_dispatch_resumes_without_republishing(tmp_path: Path, amqp_url: str, session_tag: str) -> None:
    """A dispatcher stopped after its first chunk, run again, leaves each line in the queue exactly once."""
    model = f"test-org/dispatch-resume-{session_tag}"  # no consumer: the queue depth counts publishes
    db = JobStore(tmp_path)
    store = AsyncJobStore(db)
    body = json.dumps({"model": model, "prompt": "x"}).encode()
    total = 3 * bulk.PUBLISH_CHUNK + 17
    batch_id = "batch_dispatch_resume"
    store_submitted_batch(db, batch_id, model, "/v1/completions", [body] * total, "tester")
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
        assert first == bulk.PUBLISH_CHUNK == db.lines.published_count(batch_id)
        second = await bulk.dispatch(
            connection, store, batch_id, model, Endpoint.COMPLETIONS, time.time() + 3600, "tester"
        )
        elapsed = time.perf_counter() - started
        assert first + second == total == db.lines.published_count(batch_id)
        channel = await connection.channel()
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        assert depth == total
        print(f"\nbulk publish: {total} confirmed in {elapsed:.2f} s = {total / elapsed:,.0f}/s")
        await channel.queue_delete(topology.request_queue_name(model, Lane.BATCH))
        await channel.queue_delete(topology.results_queue_name(batch_id))
    finally:
        await connection.close()
        await asyncio.to_thread(store.close)

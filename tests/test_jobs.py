"""Direct jobs from Python (producers/jobs.py, issue 16): the README's example as written, results
read while the input is still open, resuming by id, refused requests, and the sync form."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S
from ops.testing.fake_backend import fake_stats, reply_text
from ops.testing.stack import ROOT
from producers.jobs import Job, JobInputError, SyncJob
from tests.conftest import FakeWorker

README_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def _chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


def _content(result: dict[str, Any]) -> str:
    assert result["error"] is None and result["response"]["status_code"] == 200, result
    return str(result["response"]["body"]["choices"][0]["message"]["content"])


async def _take(results: AsyncIterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    async def take() -> list[dict[str, Any]]:
        return [await anext(results) for _ in range(count)]

    return await asyncio.wait_for(take(), EVENTUALLY_S)


def test_the_readme_example_runs_as_written(fake_worker: FakeWorker) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("**Direct jobs from Python**") :]
    example = re.search(r"```python\n(.*?)```", section, re.S)
    assert example is not None
    assert README_MODEL in example.group(1)
    script = fake_worker.config.parent / "readme_example.py"
    script.write_text(example.group(1).replace(README_MODEL, fake_worker.model))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script)], cwd=fake_worker.config.parent, env=env, capture_output=True, text=True,
        timeout=LONG_WORK_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # (hotq logs with structlog, which prints to stdout until a program configures it)
    printed = [line for line in done.stdout.strip().splitlines() if not LOG_LINE.match(line)]
    *lines, last = printed
    answers = dict(line.split(" ", 1) for line in lines)
    assert sorted(answers, key=int) == [str(n) for n in range(1, 21)]  # each once, whatever the order
    for custom_id, content in answers.items():
        assert content == reply_text([{"role": "user", "content": f"Name a colour ({int(custom_id) - 1})."}], None)
    assert last.startswith("batch_") and last.endswith(" completed")


async def test_results_arrive_while_the_input_is_open_and_a_job_resumes_by_id(fake_worker: FakeWorker) -> None:
    httpx.post(fake_worker.backend_url + "/_reset", timeout=EVENTUALLY_S)
    job = await Job.open(fake_worker.config, fake_worker.model)
    lines = [{"custom_id": f"a{i}", "method": "POST", "url": "/v1/chat/completions", "body": _chat(f"early {i}")}
             for i in range(10)]  # fmt: skip
    assert await job.add(lines) == 10
    early = await _take(job.results(), 10)  # answered before the input is closed
    assert sorted(r["custom_id"] for r in early) == sorted(f"a{i}" for i in range(10))
    assert (await job.status())["status"] == "in_progress"
    await job.close()  # this process lets go; the job stays in the store

    async def later() -> AsyncIterator[dict[str, Any]]:  # an async source of plain bodies
        for i in range(10):
            yield _chat(f"late {i}")

    resumed = await Job.open(fake_worker.config, job_id=job.id)
    try:
        assert await resumed.add(later()) == 10
        await resumed.close_input()
        rest = [r async for r in resumed.results(after=10)]
        batch = await asyncio.wait_for(resumed.wait(), LONG_WORK_S)
    finally:
        await resumed.close()
    assert sorted(r["custom_id"] for r in rest) == [str(n) for n in range(11, 21)]  # line numbers go on
    for result in rest:
        assert _content(result) == reply_text(
            [{"role": "user", "content": f"late {int(result['custom_id']) - 11}"}], None
        )
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 20, "completed": 20, "failed": 0}
    assert fake_stats(fake_worker.backend_url)["started"] == 20  # each request served once


async def test_a_bad_request_is_refused_by_line_and_nothing_is_lost(fake_worker: FakeWorker) -> None:
    job = await Job.open(fake_worker.config, fake_worker.model)
    try:
        assert await job.add([_chat("one"), _chat("two")]) == 2
        with pytest.raises(JobInputError) as refused:
            await job.add([_chat("three"), {"messages": "not a list"}])
        assert refused.value.stored == 0  # the bad request's chunk is stored whole or not at all
        [error] = refused.value.errors
        assert error["line"] == 4 and error["param"] == "body.messages", error
        duplicate = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": _chat("again")}
        with pytest.raises(JobInputError, match="duplicate_custom_id"):
            await job.add([duplicate])
        assert await job.add([_chat("three")]) == 1
        await job.close_input()
        with pytest.raises(JobInputError, match="input is closed"):
            await job.add([_chat("four")])
        results = [r async for r in job.results()]
        batch = await asyncio.wait_for(job.wait(), LONG_WORK_S)
    finally:
        await job.close()
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 3
    assert sorted(_content(r) for r in results) == sorted(
        reply_text([{"role": "user", "content": text}], None) for text in ("one", "two", "three")
    )


def test_the_sync_form(fake_worker: FakeWorker) -> None:
    with SyncJob.open(fake_worker.config, model=fake_worker.model) as job:
        assert job.add(_chat(f"sync {i}") for i in range(5)) == 5
        job.close_input()
        results = list(job.results())
        assert job.wait()["status"] == "completed"
    assert sorted(r["custom_id"] for r in results) == ["1", "2", "3", "4", "5"]
    assert json.loads(json.dumps(results))  # plain JSON objects

"""Direct jobs of growing size through the fake backend: rates, peak memory, exactly once.

Run from the repository root::

    .venv/bin/python -m bench.direct_jobs [--sizes 100000,1000000] [--interactive 5000] [--max-inflight 64]

One fake backend (`ops.testing.fake_backend`, instant answers) behind one ``hotq worker``
(``max_inflight`` 64, of which the batch lane may take 60) and an API for the interactive
comparison. For each size, ``hotq submit - --model M --out OUT`` reads a JSONL of plain chat
bodies from stdin, as a pipeline would, and runs the job in its own process (the collector
runs in it too, so its peak memory is the collector's as well). Measured:

- ``stored``: process start to the job being stored (copied, checked, written in chunks);
- ``published/s``: lines over the time from the job stored to the last line confirmed;
- ``completed/s``: lines over the time from the job stored to the last result collected;
- ``peak RSS``: the submit process's VmHWM (Linux), read from /proc every 0.2 s until it exits;
- exactly once: OUT read line by line (custom ids 1..N in order, each answer the fake
  backend's), and the backend's own counter of requests served equals N.

``--interactive N``: N non-streaming chat requests, 64 at a time, through the API to the same
worker first, for the completed/s a job should reach (the issue's target: within 90 %).
The machine is shared: compare runs on it, do not read capacity from them.

Results: a table on stdout and JSON in ``bench/results/direct_jobs-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    HOTQ_CLI,
    BenchReport,
    Processes,
    add_shared_options,
    child_env,
    delete_queues,
    fmt,
    http_session,
    print_header,
    print_notes,
    request_queues,
    run_bench,
    start_api,
    start_fake_backend,
    start_worker,
)
from ops.processes import peak_rss_mb
from ops.testing.fake_backend import fake_stats, reply_text
from ops.testing.stack import write_config

SAMPLE_S = 0.2
JOB_TIMEOUT_S = 6 * 3600.0


@dataclass
class Report(BenchReport):
    interactive_per_s: float | None = None
    jobs: list[dict[str, Any]] = field(default_factory=list)


def _prompt(number: int) -> str:
    return f"direct job line {number}"


def _progress(db: Path, job_id: str) -> tuple[str | None, int, int]:
    """(status, lines published, results collected) of the job, read-only."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        row = conn.execute("SELECT status, completed + failed FROM batches WHERE id = ?", [job_id]).fetchone()
        if row is None:
            return None, 0, 0
        (published,) = conn.execute(
            "SELECT count(*) FROM lines WHERE batch_id = ? AND published = 1", [job_id]
        ).fetchone()
        return row[0], int(published), int(row[1])


async def _interactive(url: str, model: str, count: int) -> float:
    """Requests/s of `count` chat requests, 64 at a time, each answer checked."""
    limit = asyncio.Semaphore(64)

    async def one(session: aiohttp.ClientSession, n: int) -> None:
        messages: list[dict[str, Any]] = [{"role": "user", "content": _prompt(n)}]
        async with (
            limit,
            session.post(url + "/chat/completions", json={"model": model, "messages": messages}) as response,
        ):
            answer = await response.json()
        if answer["choices"][0]["message"]["content"] != reply_text(messages, None):
            raise RuntimeError(f"wrong answer: {answer}")

    async with http_session(64, 600) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, n) for n in range(count)))
        return count / (time.perf_counter() - started)


async def _job(workdir: Path, config: Path, model: str, backend: str, size: int) -> dict[str, Any]:
    source, out = workdir / f"in-{size}.jsonl", workdir / f"out-{size}.jsonl"
    with open(source, "w") as file:
        for n in range(1, size + 1):
            file.write(json.dumps({"messages": [{"role": "user", "content": _prompt(n)}]}) + "\n")
    async with aiohttp.ClientSession() as session, session.post(backend + "/_reset"):
        pass  # the backend counts what this job has it serve
    job_id = f"batch_bench_{size}_{uuid.uuid4().hex[:6]}"
    argv = [*HOTQ_CLI, "submit", "-", "--config", str(config), "--model", model, "--out", str(out), "--job-id", job_id]
    db = workdir / "data" / "jobs.db"
    started = time.perf_counter()
    stored_at = published_at = collected_at = None
    peak = 0.0
    with open(source, "rb") as stdin, open(workdir / f"submit-{size}.log", "wb") as log:
        submit = subprocess.Popen(argv, stdin=stdin, stdout=log, stderr=subprocess.STDOUT, env=child_env())
        try:
            while submit.poll() is None:
                peak = max(peak, peak_rss_mb(submit.pid) or 0.0)
                now = time.perf_counter() - started
                if db.exists():
                    status, published, collected = _progress(db, job_id)
                    if stored_at is None and status == "in_progress":
                        stored_at = now
                    if published_at is None and published >= size:
                        published_at = now
                    if collected_at is None and collected >= size:
                        collected_at = now
                if now > JOB_TIMEOUT_S:
                    raise TimeoutError(f"the {size}-line job did not finish in {JOB_TIMEOUT_S:g} s")
                await asyncio.sleep(SAMPLE_S)
        finally:
            if submit.poll() is None:
                submit.kill()
            submit.wait()
    wall = time.perf_counter() - started
    if submit.returncode != 0:
        raise RuntimeError(
            f"hotq submit exited {submit.returncode}: {(workdir / f'submit-{size}.log').read_text()[-2000:]}"
        )
    collected_at = collected_at or wall
    count = 0
    with open(out) as results:
        for count, line in enumerate(results, start=1):
            record = json.loads(line)
            content = record["response"]["body"]["choices"][0]["message"]["content"]
            if record["custom_id"] != str(count) or content != reply_text(
                [{"role": "user", "content": _prompt(count)}], None
            ):
                raise RuntimeError(f"line {count} of the output is wrong: {line[:300]}")
    served = fake_stats(backend)["started"]
    base = stored_at or 0.0
    return {
        "lines": size,
        "wall_s": round(wall, 1),
        "stored_s": None if stored_at is None else round(stored_at, 1),
        "published_per_s": None if published_at is None else round(size / (published_at - base), 1),
        "completed_per_s": round(size / (collected_at - base), 1),
        "peak_rss_mb": round(peak, 1),
        "output_lines": count,
        "served_by_backend": served,
        "exactly_once": count == size and served == size,
    }


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"bench/direct-jobs-{uuid.uuid4().hex[:8]}"
    backend, _ = await start_fake_backend(processes, model)
    table = {"backend_url": backend, "max_inflight": settings.max_inflight}
    config = write_config(workdir / "hotq.toml", settings.amqp_url, {model: table})
    try:
        url, _ = await start_api(processes, config)
        await start_worker(processes, config, model)
        if settings.interactive:
            report.interactive_per_s = round(await _interactive(url, model, settings.interactive), 1)
        for size in settings.sizes:
            report.jobs.append(await _job(workdir, config, model, backend, size))
            print(f"{size} lines: {report.jobs[-1]}", flush=True)
    finally:
        await delete_queues(settings.amqp_url, request_queues(model))


def print_report(report: Report, json_path: Path) -> None:
    print()
    print(f"interactive, the same worker: {fmt(report.interactive_per_s, 1)} requests/s")
    print_header(
        f"{'lines':>9} {'stored s':>9} {'published/s':>12} {'completed/s':>12} {'peak RSS MB':>12} exactly once"
    )
    for job in report.jobs:
        print(
            f"{job['lines']:>9} {fmt(job['stored_s'], 1):>9} {fmt(job['published_per_s'], 0):>12}"
            f" {fmt(job['completed_per_s'], 0):>12} {fmt(job['peak_rss_mb'], 0):>12} {job['exactly_once']}"
        )
    print_notes(report.notes, json_path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.direct_jobs", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="job sizes in lines, comma-separated")
    parser.add_argument("--interactive", type=int, default=5000, help="interactive requests to compare with (0: none)")
    parser.add_argument("--max-inflight", type=int, default=64, help="the worker's max_inflight [64]")
    add_shared_options(parser)
    settings = parser.parse_args(argv)
    settings.sizes = [int(size) for size in settings.sizes.split(",")]
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    report = Report(settings=vars(settings))
    report.notes.append("the collector runs inside hotq submit: its peak RSS is the collector's too")
    return run_bench(run, settings, report, "direct_jobs", print_report)


if __name__ == "__main__":
    raise SystemExit(main())

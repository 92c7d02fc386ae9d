"""How fast batches move without a model in the way: bulk publishing, and a batch end to end on the fake backend.

Run from the repository root::

    .venv/bin/python -m bench.bulk_publish [--publish-lines 50000] [--publish-repeats 3]
                                           [--e2e-lines 20000] [--e2e-repeats 2] [--skip-api]

Everything runs on this machine (RabbitMQ at ``--amqp-url``, all HTTP on 127.0.0.1), with
model names unique to the run; their queues (and the batches' results queues) are deleted
at the end, and every process started is stopped.

1. Bulk publish rate of one producer, publisher confirms on, onto a model's batch lane with
   no consumer (each repeat: a fresh batch of ``--publish-lines`` plain chat bodies; the
   queue depth is checked to equal the lines, then the queue is deleted):

   - ``dispatch``: ``producers.bulk.dispatch`` called in this process, as ``hotq submit``
     and the API's batch runner call it, on a job store whose lines are already stored.
     Timed from the call to its return (channel open and declares included); ``steady``
     is the rate after the first chunk's confirms (``PUBLISH_CHUNK`` lines) came back.
   - ``submit --detach``: ``hotq submit FILE --model M --detach`` as a subprocess on a
     JSONL file of the same bodies. ``wall`` is process start to exit (interpreter
     start-up, validating and storing the file, publishing); ``publish`` is from its
     ``job ...`` line on stderr (the job is stored) to exit.

2. A batch end to end (requests/s): the fake backend (``ops.testing.fake_backend``, instant
   answers) behind one ``hotq worker`` (``max_inflight`` ``--max-inflight``, 64; the config's
   default ``reserved_interactive``, 4, so batch work takes 60 slots), ``--e2e-lines`` chat
   requests:

   - ``submit``: ``hotq submit FILE --model M --out OUT`` (plain bodies, custom_id = line
     number), timed from process start to exit (``net``: from the job stored to exit);
     OUT is checked line by line against the fake backend's deterministic answers, and the
     backend's own counter must show each request served exactly once.
   - ``batch-api``: the same requests as OpenAI batch lines through ``hotq serve``'s Batch API
     (official ``openai`` client: upload, ``batches.create``, ``batches.retrieve`` until
     ``completed``, as ``POLLING`` says: every 0.5 s until 90 % of the lines are done, then
     every 0.05 s; then the output file), timed from create to completed.

   One small warm-up run per target (``--e2e-warmup``), then ``--e2e-repeats`` each,
   alternating. Each run records the CPU seconds of every process involved.

The machine has 2 cores shared by RabbitMQ, the backend, hotq and this process: the numbers
are for comparing runs on this machine, not capacity.

Results: a table on stdout and JSON in ``bench/results/bulk_publish-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
import openai

from bench.common import (
    OTHER,
    BatchPolling,
    BenchReport,
    CpuMeter,
    Processes,
    add_shared_options,
    batch_records,
    check_logs,
    children_cpu_s,
    delete_queues,
    fmt,
    machine_busy_s,
    print_cpu_legend,
    print_header,
    print_notes,
    request_queues,
    round_or_none,
    run_bench,
    run_hotq_submit,
    start_api,
    start_fake_backend,
    start_worker,
)
from broker import topology
from broker.connection import connect
from broker.jobstore import AsyncJobStore, JobStore
from broker.logs import configure_logging
from broker.messages import Endpoint, Lane
from ops.testing.fake_backend import reply_text
from ops.testing.jobs import store_submitted_batch
from ops.testing.stack import write_config
from producers import bulk

DEFAULT_PUBLISH_LINES: Final = 50_000
DEFAULT_PUBLISH_REPEATS: Final = 3
DEFAULT_E2E_LINES: Final = 20_000
DEFAULT_E2E_REPEATS: Final = 2
DEFAULT_E2E_WARMUP: Final = 1_000
DEFAULT_MAX_INFLIGHT: Final = 64
ENDPOINT: Final = "/v1/chat/completions"

POLLING: Final = BatchPolling(slow_s=0.5, fast_s=0.05, fast_from=0.9)
RUN_TIMEOUT_S: Final = 600.0


def chat_request(model: str | None, i: int) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": f"bulk request {i} about queues"}]}
    if model is not None:
        body["model"] = model
    return body


def plain_jsonl(path: Path, n: int) -> Path:
    """`n` plain request bodies without a model (`hotq submit --model` fills it in; custom_id = line number)
    at `path`, written once: the repeats reuse it."""
    if not path.exists():
        path.write_bytes("".join(json.dumps(chat_request(None, i)) + "\n" for i in range(n)).encode())
    return path


def batch_jsonl(model: str, n: int) -> bytes:
    """OpenAI batch input lines, custom_id ``r-<i>``."""
    lines = (
        {"custom_id": f"r-{i}", "method": "POST", "url": ENDPOINT, "body": chat_request(model, i)} for i in range(n)
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class RunResult:
    part: str  # "publish" | "e2e"
    target: str  # "dispatch" | "submit --detach" | "submit" | "batch-api"
    kind: str  # "warm-up" | "measured"
    index: int
    lines: int
    ok: int  # publish: lines in the queue afterwards; e2e: correct answers
    errors: dict[str, int]
    wall_s: float
    per_s: float  # lines (publish) or answers (e2e) per second of wall time
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the run, by process
    machine_busy_cores: float | None = None
    unaccounted_cores: float | None = None  # machine busy minus the measured processes: noise, upper bound


@dataclass
class Report(BenchReport):
    runs: list[RunResult] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


class Measured:
    """CPU and machine-busy accounting around one run."""

    def __init__(self, groups: dict[str, int]) -> None:
        self.meter = CpuMeter.of(groups, load_gen="bench (producer/load-gen)")

    def __enter__(self) -> Measured:
        self._before = self.meter.read()
        self._busy = machine_busy_s()
        self._children = children_cpu_s()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self.started
        self.busy_s = machine_busy_s() - self._busy
        self.cpu_s = self.meter.read().since(self._before)
        self.cpu_s.pop(OTHER, None)
        children = children_cpu_s() - self._children  # subprocesses that started and ended within the run
        if children > 0.005:
            self.cpu_s["hotq submit"] = children

    def result(
        self,
        part: str,
        target: str,
        kind: str,
        index: int,
        lines: int,
        ok: int,
        errors: Counter[str],
        extra: dict[str, Any],
        per: int,
        wall_s: float | None = None,
    ) -> RunResult:
        """The run's result with this measurement's CPU seconds and busy cores: `per` (lines published, or
        answers) per second of `wall_s` (by default the measured wall time)."""
        wall = self.wall_s if wall_s is None else wall_s
        per_s = round(per / wall, 1)
        result = RunResult(part, target, kind, index, lines, ok, dict(errors), round(wall, 3), per_s, extra)
        result.cpu_s = {name: round(seconds, 2) for name, seconds in self.cpu_s.items()}
        if result.wall_s > 0:
            result.machine_busy_cores = round(self.busy_s / self.wall_s, 2)
            result.unaccounted_cores = round(max(0.0, self.busy_s - sum(self.cpu_s.values())) / self.wall_s, 2)
        return result


def _show(result: RunResult) -> None:
    unit = "lines/s" if result.part == "publish" else "req/s"
    print(
        f"  {result.kind:<9}{result.index:>2} {result.target:<16}{result.per_s:>10,.0f} {unit}  "
        f"{result.ok}/{result.lines} in {result.wall_s:.2f} s  errors {sum(result.errors.values())}"
        f"  machine busy {fmt(result.machine_busy_cores)} cores",
        flush=True,
    )


# ---------------------------------------------------------------------------
# 1. Bulk publish
# ---------------------------------------------------------------------------


async def publish_dispatch(amqp_url: str, workdir: Path, model: str, lines: int, index: int) -> RunResult:
    """`producers.bulk.dispatch` in this process, lines already in the job store."""
    store = AsyncJobStore(JobStore(workdir / f"dispatch-{index}"))
    batch_id = f"batch_bench_dispatch_{uuid.uuid4().hex[:12]}"
    bodies = [json.dumps(chat_request(model, i)).encode() for i in range(lines)]
    stored_started = time.perf_counter()
    await store.run(lambda db: store_submitted_batch(db, batch_id, model, ENDPOINT, bodies, "bench"))
    stored_s = time.perf_counter() - stored_started
    connection = await connect(amqp_url, "bench-bulk-publish")
    chunks: list[tuple[float, int]] = []
    try:
        with Measured({}) as measured:
            published = await bulk.dispatch(
                connection,
                store,
                batch_id,
                model,
                Endpoint.CHAT,
                time.time() + 3600,
                "bench",
                on_published=lambda n: chunks.append((time.perf_counter(), n)),
            )
        depth = await _depth_then_delete(connection, model, batch_id)
    finally:
        await connection.close()
        await asyncio.to_thread(store.close)
    errors: Counter[str] = Counter()
    if published != lines:
        errors[f"dispatch reported {published} published"] += 1
    if depth != lines:
        errors[f"queue depth {depth} afterwards"] += 1
    steady = None
    if len(chunks) >= 2:
        steady = sum(n for _, n in chunks[1:]) / (chunks[-1][0] - chunks[0][0])
    extra = {
        "store_lines_s": round(stored_s, 3),
        "first_chunk_confirmed_s": round(chunks[0][0] - measured.started, 3) if chunks else None,
        "steady_lines_per_s": round_or_none(steady, 1),
        "chunk": bulk.PUBLISH_CHUNK,
    }
    return measured.result("publish", "dispatch", "measured", index, lines, depth, errors, extra, per=lines)


async def publish_submit_detach(
    amqp_url: str, processes: Processes, workdir: Path, model: str, lines: int, index: int
) -> RunResult:
    """`hotq submit FILE --detach`: validate, store and publish, then exit."""
    own = workdir / f"detach-{index}"  # a job store of its own, like a fresh machine's
    own.mkdir(exist_ok=True)
    config = write_config(own / "hotq.toml", amqp_url, {model: {"backend_url": "http://127.0.0.1:9"}})
    data_dir = own / "data"  # write_config's data_dir
    source = plain_jsonl(workdir / "publish.jsonl", lines)
    job_id = f"batch_bench_detach_{uuid.uuid4().hex[:12]}"
    with Measured({}) as measured:
        submitted = await run_hotq_submit(
            processes, f"submit-detach-{index}", source, config, model, job_id, ["--detach"], RUN_TIMEOUT_S
        )
    connection = await connect(amqp_url, "bench-bulk-publish")
    try:
        depth = await _depth_then_delete(connection, model, job_id)
    finally:
        await connection.close()
    store = JobStore(data_dir)
    try:
        published = store.lines.published_count(job_id)
    finally:
        store.close()
    errors: Counter[str] = Counter()
    if depth != lines:
        errors[f"queue depth {depth} afterwards"] += 1
    if published != lines:
        errors[f"{published} lines marked published"] += 1
    publish_s = submitted.after_stored_s  # connect, publish with confirms, close
    extra = {
        "job_stored_s": round_or_none(submitted.stored_s),
        "publish_s": round_or_none(publish_s),
        "publish_lines_per_s": round(lines / publish_s, 1) if publish_s else None,
    }
    return measured.result(
        "publish", "submit --detach", "measured", index, lines, depth, errors, extra, per=lines, wall_s=submitted.wall_s
    )


async def _depth_then_delete(connection: Any, model: str, batch_id: str) -> int:
    channel = await connection.channel()
    try:
        depth, _ = await topology.queue_depth(channel, model, Lane.BATCH)
        await channel.queue_delete(topology.request_queue_name(model, Lane.BATCH))
        await channel.queue_delete(topology.results_queue_name(batch_id))
    finally:
        await channel.close()
    return depth


# ---------------------------------------------------------------------------
# 2. End to end on the fake backend
# ---------------------------------------------------------------------------


@dataclass
class E2EStack:
    config: Path
    model: str
    backend_url: str
    api_url: str | None  # ends in /v1
    groups: dict[str, int]  # name -> process group, for CPU accounting


async def start_e2e_stack(settings: argparse.Namespace, processes: Processes, workdir: Path, model: str) -> E2EStack:
    backend_url, backend = await start_fake_backend(processes, model)
    config = write_config(
        workdir / "hotq.toml",
        settings.amqp_url,
        {model: {"backend_url": backend_url, "max_inflight": settings.max_inflight}},
    )
    groups = {"fake-backend": backend.pid}
    api_url = None
    if not settings.skip_api:
        api_url, api = await start_api(processes, config)
        groups["hotq-api"] = api.pid
    worker = await start_worker(processes, config, model)
    groups["hotq-worker"] = worker.pid
    return E2EStack(config, model, backend_url, api_url, groups)


def expected_content(i: int) -> str:
    return reply_text(chat_request(None, i)["messages"], None)


def check_answers(records: Sequence[dict[str, Any]], custom_id_of: dict[str, int]) -> tuple[int, Counter[str]]:
    """(correct answers, errors): every input line answered once, 200, with the fake backend's exact reply."""
    errors: Counter[str] = Counter()
    seen: Counter[str | None] = Counter(r.get("custom_id") for r in records)
    if missing := len(set(custom_id_of) - set(seen)):
        errors["missing custom_id"] += missing
    if extra := sum(n - 1 if cid in custom_id_of else n for cid, n in seen.items() if n > 1 or cid not in custom_id_of):
        errors["duplicate or unknown custom_id"] += extra
    ok = 0
    for record in records:
        index = custom_id_of.get(record.get("custom_id"))  # type: ignore[arg-type]
        response = record.get("response") or {}
        if index is None:
            continue
        if record.get("error") is not None or response.get("status_code") != 200:
            errors[f"status {response.get('status_code')} / error {record.get('error')}"[:120]] += 1
            continue
        try:
            content = response["body"]["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            errors["malformed record"] += 1
            continue
        if content != expected_content(index):
            errors["wrong content"] += 1
            continue
        ok += 1
    return ok, errors


async def e2e_submit(
    processes: Processes, stack: E2EStack, workdir: Path, lines: int, kind: str, index: int
) -> RunResult:
    source = plain_jsonl(workdir / f"e2e-plain-{lines}.jsonl", lines)
    out = workdir / f"e2e-{kind}-{index}.out.jsonl"
    job_id = f"batch_bench_e2e_{uuid.uuid4().hex[:12]}"
    httpx.post(stack.backend_url + "/_reset")
    with Measured(stack.groups) as measured:
        submitted = await run_hotq_submit(
            processes,
            f"submit-e2e-{kind}-{index}",
            source,
            stack.config,
            stack.model,
            job_id,
            ["--out", str(out)],
            RUN_TIMEOUT_S,
        )
    served = httpx.get(stack.backend_url + "/_stats").json()["started"]
    records = [json.loads(line) for line in out.read_text().splitlines() if line]
    ok, errors = check_answers(records, {str(n): n - 1 for n in range(1, lines + 1)})
    if [r.get("custom_id") for r in records] != [str(n) for n in range(1, lines + 1)]:
        errors["OUT not in input order"] += 1
    if served != lines:
        errors[f"backend served {served} requests"] += 1
    net_s = submitted.after_stored_s
    extra = {
        "job_id": job_id,
        "job_stored_s": round_or_none(submitted.stored_s),
        "net_s": round_or_none(net_s),
        "net_per_s": round(ok / net_s, 1) if net_s else None,
        "backend_served": served,
    }
    return measured.result("e2e", "submit", kind, index, lines, ok, errors, extra, per=ok, wall_s=submitted.wall_s)


async def e2e_batch_api(
    client: openai.AsyncOpenAI, stack: E2EStack, lines: int, kind: str, index: int, batch_ids: list[str]
) -> RunResult:
    data = batch_jsonl(stack.model, lines)
    upload_started = time.perf_counter()
    upload = await client.files.create(file=("bench.jsonl", data), purpose="batch")
    upload_s = time.perf_counter() - upload_started
    httpx.post(stack.backend_url + "/_reset")
    with Measured(stack.groups) as measured:
        batch = await client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")
        batch_ids.append(batch.id)
        polled = await POLLING.until_completed(client, batch, measured.started, RUN_TIMEOUT_S)
    served = httpx.get(stack.backend_url + "/_stats").json()["started"]
    records = await batch_records(client, polled.batch)
    ok, errors = check_answers(records, {f"r-{i}": i for i in range(lines)})
    if served != lines:
        errors[f"backend served {served} requests"] += 1
    extra = {
        "batch_id": batch.id,
        "upload_s": round(upload_s, 3),
        "all_results_s": round_or_none(polled.all_results_s),
        "backend_served": served,
    }
    return measured.result("e2e", "batch-api", kind, index, lines, ok, errors, extra, per=ok)


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    tag = uuid.uuid4().hex[:8]
    publish_model = f"bench-bulk-publish-{tag}"  # no consumer: the queue depth counts the publishes
    e2e_model = f"bench-bulk-e2e-{tag}"
    report.settings["models"] = {"publish": publish_model, "e2e": e2e_model}
    batch_ids: list[str] = []
    try:
        if settings.publish_repeats:
            print(f"1. bulk publish, one producer, confirms on: {settings.publish_lines:,} lines", flush=True)
            for index in range(1, settings.publish_repeats + 1):
                # alternate which goes first, so a drift of the machine hits both alike
                steps = ("dispatch", "detach") if index % 2 else ("detach", "dispatch")
                for step in steps:
                    if step == "dispatch":
                        result = await publish_dispatch(
                            settings.amqp_url, workdir, publish_model, settings.publish_lines, index
                        )
                    else:
                        result = await publish_submit_detach(
                            settings.amqp_url, processes, workdir, publish_model, settings.publish_lines, index
                        )
                    report.runs.append(result)
                    _show(result)
        if settings.e2e_repeats:
            print(
                f"2. end to end on the fake backend, one worker (max_inflight {settings.max_inflight}): "
                f"{settings.e2e_lines:,} lines",
                flush=True,
            )
            stack = await start_e2e_stack(settings, processes, workdir, e2e_model)
            targets = ["submit"] if stack.api_url is None else ["submit", "batch-api"]
            client = None
            if stack.api_url is not None:
                client = openai.AsyncOpenAI(base_url=stack.api_url, api_key="unused", max_retries=0, timeout=120)

            async def one(target: str, kind: str, index: int, lines: int) -> None:
                if target == "submit":
                    result = await e2e_submit(processes, stack, workdir, lines, kind, index)
                else:
                    assert client is not None
                    result = await e2e_batch_api(client, stack, lines, kind, index, batch_ids)
                report.runs.append(result)
                _show(result)

            if settings.e2e_warmup:
                for target in targets:
                    await one(target, "warm-up", 0, settings.e2e_warmup)
            for index in range(1, settings.e2e_repeats + 1):
                for target in targets if index % 2 else reversed(targets):
                    await one(target, "measured", index, settings.e2e_lines)
            if client is not None:
                await client.close()
            names = ["fake-backend", "hotq-worker", *(["hotq-api"] if stack.api_url else [])]
            names += sorted(p.stem for p in workdir.glob("submit-*.log"))
            check_logs(processes.log_paths(names), report.notes)
    finally:
        processes.stop_all()
        leftovers = request_queues(publish_model, e2e_model) + [topology.results_queue_name(b) for b in batch_ids]
        leftovers += [topology.results_queue_name(r.extra["job_id"]) for r in report.runs if "job_id" in r.extra]
        await delete_queues(settings.amqp_url, leftovers)
    report.summary = summarise(report)
    note_problems(report)


def summarise(report: Report) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for part, target in (
        ("publish", "dispatch"),
        ("publish", "submit --detach"),
        ("e2e", "submit"),
        ("e2e", "batch-api"),
    ):
        runs = [r for r in report.runs if r.part == part and r.target == target and r.kind == "measured"]
        if not runs:
            continue
        entry: dict[str, Any] = {
            "runs": len(runs),
            "mean_per_s": round(statistics.fmean(r.per_s for r in runs), 1),
            "min_per_s": min(r.per_s for r in runs),
            "max_per_s": max(r.per_s for r in runs),
            "errors": sum(sum(r.errors.values()) for r in runs),
        }
        for key in ("steady_lines_per_s", "publish_lines_per_s", "net_per_s"):
            values = [r.extra[key] for r in runs if r.extra.get(key)]
            if values:
                entry[f"mean_{key}"] = round(statistics.fmean(values), 1)
        summary[f"{part}/{target}"] = entry
    return summary


def note_problems(report: Report) -> None:
    for r in report.runs:
        if r.errors or r.ok < r.lines:
            report.notes.append(f"{r.part} {r.target} {r.kind} {r.index}: {r.ok}/{r.lines} ok, errors {r.errors}")


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def print_report(report: Report, json_path: Path) -> None:
    print()
    header = (
        f"{'part':<8}{'target':<17}{'run':<12}{'ok/lines':>13}{'wall s':>8}{'per s':>9}"
        f"{'bench':>7}{'rmq':>6}{'submit':>7}{'api':>6}{'worker':>7}{'backend':>8}{'busy':>6}{'noise':>6}  detail"
    )
    print_header(header)
    for r in report.runs:
        cpu = r.cpu_s
        e = r.extra
        if r.target == "dispatch":
            detail = f"steady {fmt(e.get('steady_lines_per_s'), 0)}/s after the first chunk"
        elif r.target == "submit --detach":
            detail = f"stored at {fmt(e.get('job_stored_s'))} s, publish {fmt(e.get('publish_lines_per_s'), 0)}/s"
        elif r.target == "submit":
            detail = f"stored at {fmt(e.get('job_stored_s'))} s, net {fmt(e.get('net_per_s'), 0)}/s"
        else:
            detail = f"all results counted at {fmt(e.get('all_results_s'))} s"
        print(
            f"{r.part:<8}{r.target:<17}{f'{r.kind} {r.index}':<12}{f'{r.ok}/{r.lines}':>13}{r.wall_s:>8.2f}"
            f"{r.per_s:>9.0f}{fmt(cpu.get('bench (producer/load-gen)'), 1):>7}{fmt(cpu.get('rabbitmq'), 1):>6}"
            f"{fmt(cpu.get('hotq submit'), 1):>7}{fmt(cpu.get('hotq-api'), 1):>6}"
            f"{fmt(cpu.get('hotq-worker'), 1):>7}{fmt(cpu.get('fake-backend'), 1):>8}"
            f"{fmt(r.machine_busy_cores):>6}{fmt(r.unaccounted_cores):>6}  {detail}"
        )
    print_cpu_legend("bench..backend", "run")
    print()
    for name, entry in report.summary.items():
        unit = "lines/s" if name.startswith("publish") else "req/s"
        more = ", ".join(
            f"{k.removeprefix('mean_')} {v:,.0f}/s"
            for k, v in entry.items()
            if k.startswith("mean_") and k != "mean_per_s"
        )
        print(
            f"{name:<24} mean {entry['mean_per_s']:>9,.0f} {unit} (min {entry['min_per_s']:,.0f}, "
            f"max {entry['max_per_s']:,.0f}; {entry['runs']} runs, {entry['errors']} errors)"
            + (f"; {more}" if more else "")
        )
    print_notes(report.notes, json_path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bulk_publish", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--publish-lines", type=int, default=DEFAULT_PUBLISH_LINES, help="lines per publish run [50000]"
    )
    parser.add_argument(
        "--publish-repeats", type=int, default=DEFAULT_PUBLISH_REPEATS, help="publish runs of each kind (0: none) [3]"
    )
    parser.add_argument("--e2e-lines", type=int, default=DEFAULT_E2E_LINES, help="lines per end-to-end run [20000]")
    parser.add_argument(
        "--e2e-repeats", type=int, default=DEFAULT_E2E_REPEATS, help="end-to-end runs of each target (0: none) [2]"
    )
    parser.add_argument(
        "--e2e-warmup", type=int, default=DEFAULT_E2E_WARMUP, help="lines in each target's warm-up run (0: none) [1000]"
    )
    parser.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT, help="the worker's max_inflight [64]")
    parser.add_argument("--skip-api", action="store_true", help="end to end: leave out the Batch API target")
    add_shared_options(parser)
    args = parser.parse_args(argv)
    if min(args.publish_lines, args.e2e_lines, args.max_inflight) < 1:
        parser.error("--publish-lines, --e2e-lines and --max-inflight must be at least 1")
    if min(args.publish_repeats, args.e2e_repeats, args.e2e_warmup) < 0:
        parser.error("--publish-repeats, --e2e-repeats and --e2e-warmup must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging("warning")  # the dispatcher runs in this process: keep its info lines off the table
    report = Report(
        settings={
            "publish_lines": settings.publish_lines,
            "publish_repeats": settings.publish_repeats,
            "publish_chunk": bulk.PUBLISH_CHUNK,
            "e2e_lines": settings.e2e_lines,
            "e2e_repeats": settings.e2e_repeats,
            "e2e_warmup": settings.e2e_warmup,
            "max_inflight": settings.max_inflight,
            "reserved_interactive": 4,  # the config's default
            "skip_api": settings.skip_api,
            "poll_s": POLLING.settings(),
            "amqp_url": settings.amqp_url,
        },
    )
    return run_bench(run, settings, report, "bulk_publish", print_report)


if __name__ == "__main__":
    sys.exit(main())

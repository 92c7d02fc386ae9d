"""What hotq's batch paths cost with a real vLLM: a batch's tokens/s, vs the same requests straight to vLLM.

Run from the repository root::

    .venv/bin/python -m bench.batch_vllm [--requests 500] [--max-tokens 32] [--rounds 3]
                                         [--reserved-interactive 0] [--max-inflight 32] [--skip-submit]

One run, everything on this machine (RabbitMQ at ``--amqp-url``, all HTTP on 127.0.0.1),
the embedded SmolLM2-135M-Instruct model (``ensure_embedded_model()``, cached in
``~/.cache/hotq``), served under a model name unique to the run (``smollm-batch-<hex>``)
whose queues are deleted at the end. ``hotq serve`` and ``hotq agent`` run as in
``bench.agent_vllm`` (a temporary config: ``model_path`` = the converted folder,
``max_inflight`` ``--max-inflight``, by default 32, which is also vLLM's ``--max-num-seqs``,
a large ``idle_ttl_s``).

The workload: ``--requests`` chat requests (fixed distinct prompts, ``max_tokens``
``--max-tokens``, temperature 0, ``ignore_eos`` so each generates exactly ``max_tokens``
tokens; every answer's ``usage.completion_tokens`` is checked), as one OpenAI batch
input file (``custom_id`` ``r-<i>``). Three targets:

(a) ``batch-api``: hotq's Batch API through the official ``openai`` client (async):
    upload the file (``files.create``, purpose ``batch``; not timed), ``batches.create``,
    ``batches.retrieve`` until ``completed`` (``POLLING``: every 1 s while less than 90 % of
    the lines are done, then every 0.05 s: polling costs CPU that vLLM would otherwise use,
    yet the end must be seen promptly), then the output
    file. Wall time: from just before ``create`` to the poll that saw ``completed`` (so it
    includes dispatch, collection, writing the output file and up to one fast poll
    interval). Tokens:
    the output file's ``usage.completion_tokens``. Also reported: when the first result
    and the last result were counted (``request_counts``) and the output-file fetch.
(b) ``direct``: the same request bodies sent straight to the vLLM server the agent started
    (the ``url`` of its ``backend_ready`` event), ``--concurrency`` (64) in flight at a time
    (aiohttp), non-streaming. Wall time: first send to last answer.
(c) ``submit``: ``hotq submit FILE --model M --out OUT`` as a subprocess (the same input
    file; the job store is the API's). Wall time: process start to exit (Python start-up,
    validating and storing the file, publishing, collecting, writing OUT); ``net`` also
    reports the part after the job was stored (its ``job ...`` line on stderr) up to exit.
    Tokens: from OUT. ``--skip-submit`` leaves it out.

One warm-up round per target (``--warmup-requests``), then ``--rounds`` measured rounds,
the targets in a rotating order (odd rounds forward, even rounds reversed), so a slow drift
of the machine hits all alike. tokens/s = completion tokens / wall time; the summary gives
each target's mean over undisturbed rounds and its ratio to ``direct`` (target: 97 %).

Batch work may use ``max_inflight - reserved_interactive`` of the backend's slots (the
rest waits for interactive users). ``--reserved-interactive`` defaults to 0, so the batch
lane may fill all 32 sequences vLLM runs at once, like the direct load does; with the
config's default (4) it runs 28 at a time, and the ratio shows that choice too. With
``max_inflight`` 32 vLLM never holds a request beyond the 32 it runs, whereas the direct
load (64 in flight) leaves 32 waiting inside vLLM, ready the moment a sequence ends;
``--max-inflight 64`` gives the agent the same backlog, to tell that apart from hotq's
own costs.

The machine has 2 cores shared by vLLM, RabbitMQ, hotq and the load generator: the
numbers compare the targets within one run, they are not capacity. Like
``bench.agent_vllm`` the run waits (bounded) while another vLLM server or pytest runs, and
repeats a round during which one appeared (at most twice); each round records the CPU
seconds of vLLM, the hotq API, the agent, RabbitMQ, ``hotq submit`` and this process.

Results: a table on stdout and JSON in ``bench/results/batch_vllm-<timestamp>.json``.
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

import aiohttp
import openai

from bench.agent_vllm import (
    AGENT_READY_TIMEOUT_S,
    DISTURBED_RETRIES,
    DisturbanceWatch,
    Round,
    Stack,
    chat,
    check_stack_logs,
    is_event,
    keep_stack_logs,
    note_round_problems,
    print_shutdown,
    prompts,
    serve_embedded_model,
    start_agent,
    stop_agent,
    stop_stack,
    wait_until_quiet,
)
from bench.common import (
    OTHER,
    BatchPolling,
    BenchReport,
    Processes,
    add_shared_options,
    batch_records,
    children_cpu_s,
    delete_queues,
    error_kind,
    fmt,
    http_session,
    machine_busy_s,
    print_cpu_legend,
    print_header,
    print_notes,
    request_queues,
    round_or_none,
    run_bench,
    run_hotq_submit,
)
from broker import topology

DEFAULT_REQUESTS: Final = 500
DEFAULT_MAX_TOKENS: Final = 32
DEFAULT_CONCURRENCY: Final = 64
DEFAULT_ROUNDS: Final = 3
DEFAULT_WARMUP_REQUESTS: Final = 64
DEFAULT_MAX_INFLIGHT: Final = 32  # the agent's slots; vLLM runs 32 sequences at once (hpc_agents.vllm_command)
TARGET_RATIO: Final = 0.97  # a batch path's tokens/s over direct tokens/s
TARGETS: Final = ("direct", "batch-api", "submit")
ENDPOINT: Final = "/v1/chat/completions"

POLLING: Final = BatchPolling(slow_s=1.0, fast_s=0.05, fast_from=0.9)
REQUEST_TIMEOUT_S: Final = 600.0
ROUND_TIMEOUT_S: Final = 900.0  # a batch (or submit) that has not completed by then fails the run


def batch_lines(model: str, texts: Sequence[str], max_tokens: int) -> list[dict[str, Any]]:
    """One OpenAI batch input line per prompt, custom_id ``r-<i>``."""
    return [
        {
            "custom_id": f"r-{i}",
            "method": "POST",
            "url": ENDPOINT,
            "body": {
                "model": model,
                "messages": [{"role": "user", "content": text}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,  # vLLM's extra parameter: exactly max_tokens tokens every time
            },
        }
        for i, text in enumerate(texts)
    ]


@dataclass(frozen=True)
class Workload:
    """The same requests for every target: batch input lines, their file, and the bare bodies."""

    custom_ids: list[str]
    bodies: list[bytes]  # for direct
    jsonl: bytes  # for batch-api and submit
    path: Path  # `jsonl` on disk, for hotq submit

    @classmethod
    def build(cls, model: str, texts: Sequence[str], max_tokens: int, path: Path) -> Workload:
        lines = batch_lines(model, texts, max_tokens)
        jsonl = "".join(json.dumps(line) + "\n" for line in lines).encode()
        path.write_bytes(jsonl)
        return cls(
            custom_ids=[line["custom_id"] for line in lines],
            bodies=[json.dumps(line["body"]).encode() for line in lines],
            jsonl=jsonl,
            path=path,
        )


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one target produced, before the round's bookkeeping."""

    wall_s: float
    completion_tokens: int
    ok: int
    exact_tokens: int
    errors: Counter[str]
    extra: dict[str, Any] = field(default_factory=dict)  # target-specific timings
    extra_cpu_s: dict[str, float] = field(default_factory=dict)  # processes that lived only during the round


@dataclass
class RoundResult(Round):
    """A round of this benchmark: target "direct" | "batch-api" | "submit", kind "warm-up" | "measured"."""

    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the round, by process
    machine_busy_cores: float | None = None  # all cores, from /proc/stat
    unaccounted_cores: float | None = None  # machine busy minus the measured processes: noise, upper bound
    disturbed_by: list[str] = field(default_factory=list)  # foreign vLLM/pytest seen during the round


@dataclass
class Summary:
    mean_tps: dict[str, float]  # by target, undisturbed measured rounds
    ratio_to_direct: dict[str, float]  # by batch target: its mean / direct's mean
    pair_ratios: dict[str, list[float]]  # by batch target, round by round
    target_ratio: float
    meets_target: dict[str, bool]
    submit_net_mean_tps: float | None  # submit, counted from the job stored to exit
    submit_net_ratio: float | None


@dataclass
class Report(BenchReport):
    startup: dict[str, Any] = field(default_factory=dict)
    rounds: list[RoundResult] = field(default_factory=list)
    summary: Summary | None = None
    shutdown: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# The three targets
# ---------------------------------------------------------------------------


def check_records(records: Sequence[dict[str, Any]], custom_ids: Sequence[str], max_tokens: int) -> Outcome:
    """Check batch output records against the input; wall_s is left 0 for the caller."""
    errors: Counter[str] = Counter()
    seen: Counter[str | None] = Counter(r.get("custom_id") for r in records)
    expected = set(custom_ids)
    if missing := len(expected - set(seen)):
        errors["missing custom_id"] += missing
    if unknown := sum(n for cid, n in seen.items() if cid not in expected):
        errors["unknown custom_id"] += unknown
    if duplicated := sum(n - 1 for cid, n in seen.items() if cid in expected and n > 1):
        errors["duplicate custom_id"] += duplicated
    ok = exact = tokens = 0
    for record in records:
        response = record.get("response") or {}
        if record.get("error") is not None or response.get("status_code") != 200:
            errors[f"status {response.get('status_code')} / error {record.get('error')}"[:120]] += 1
            continue
        try:
            body = response["body"]
            count = int(body["usage"]["completion_tokens"])
            if not body["choices"][0]["message"]["content"]:
                raise ValueError("empty content")
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            errors[f"malformed record: {exc!r}"[:120]] += 1
            continue
        ok += 1
        tokens += count
        exact += count == max_tokens
    return Outcome(0.0, tokens, ok, exact, errors)


async def run_direct(
    session: aiohttp.ClientSession, url: str, bodies: Sequence[bytes], max_tokens: int, concurrency: int
) -> Outcome:
    """`bodies` straight to vLLM, `concurrency` in flight at a time."""
    pending = iter(bodies)
    tokens: list[int] = []
    errors: Counter[str] = Counter()

    async def user() -> None:
        for body in pending:  # a shared iterator: each body is taken once
            try:
                answer = await chat(session, url, body)
            except Exception as exc:  # noqa: BLE001 - every failure is a data point
                errors[error_kind(exc)] += 1
            else:
                tokens.append(answer.completion_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    exact = sum(1 for t in tokens if t == max_tokens)
    return Outcome(wall, sum(tokens), len(tokens), exact, errors, extra={"concurrency": concurrency})


async def run_batch_api(
    client: openai.AsyncOpenAI, workload: Workload, max_tokens: int, batch_ids: list[str]
) -> Outcome:
    """Upload, create, poll until completed, fetch the output file."""
    started_upload = time.perf_counter()
    upload = await client.files.create(file=("bench.jsonl", workload.jsonl), purpose="batch")
    upload_s = time.perf_counter() - started_upload

    started = time.perf_counter()
    batch = await client.batches.create(input_file_id=upload.id, endpoint=ENDPOINT, completion_window="24h")
    created_s = time.perf_counter() - started
    batch_ids.append(batch.id)
    polled = await POLLING.until_completed(client, batch, started, ROUND_TIMEOUT_S)
    wall = time.perf_counter() - started
    batch = polled.batch

    fetch_started = time.perf_counter()
    records = await batch_records(client, batch)
    fetch_s = time.perf_counter() - fetch_started
    outcome = check_records(records, workload.custom_ids, max_tokens)
    outcome.wall_s = wall
    outcome.extra = {
        "batch_id": batch.id,
        "upload_s": round(upload_s, 3),
        "create_call_s": round(created_s, 3),
        "first_result_s": round_or_none(polled.first_result_s),
        "all_results_s": round_or_none(polled.all_results_s),  # every line counted (the batch may still be finalizing)
        "completed_s": round(wall, 3),
        "fetch_output_s": round(fetch_s, 3),
        "polls": polled.polls,
        "request_counts": None if batch.request_counts is None else batch.request_counts.model_dump(),
    }
    return outcome


async def run_submit(
    processes: Processes, config: Path, model: str, workload: Workload, max_tokens: int, workdir: Path, name: str
) -> Outcome:
    """`hotq submit FILE --out OUT` as a subprocess, timed from its start to its exit."""
    job_id = f"batch_bench_{uuid.uuid4().hex[:12]}"
    out = workdir / f"{name}.out.jsonl"
    children_before = children_cpu_s()
    submitted = await run_hotq_submit(
        processes, name, workload.path, config, model, job_id, ["--out", str(out)], ROUND_TIMEOUT_S
    )
    records = [json.loads(line) for line in out.read_text().splitlines() if line]
    outcome = check_records(records, workload.custom_ids, max_tokens)
    outcome.wall_s = submitted.wall_s
    outcome.extra_cpu_s = {"hotq-submit": children_cpu_s() - children_before}
    net = submitted.after_stored_s
    outcome.extra = {
        "job_id": job_id,
        "job_stored_s": round_or_none(submitted.stored_s),  # process start -> "job ...: N requests" on stderr
        "net_wall_s": round_or_none(net),
        "net_tokens_per_s": round(outcome.completion_tokens / net, 1) if net else None,
    }
    return outcome


# ---------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------


@dataclass
class Bench:
    """What a round needs."""

    settings: argparse.Namespace
    processes: Processes
    stack: Stack
    config: Path
    workdir: Path
    session: aiohttp.ClientSession
    client: openai.AsyncOpenAI
    workloads: dict[str, Workload]  # "warm-up" | "measured"
    batch_ids: list[str]  # every batch created, so their results queues can be deleted on failure
    report: Report


async def one_round(bench: Bench, target: str, kind: str, index: int) -> None:
    """One round of `target`; repeated (bounded) when a foreign vLLM or pytest ran meanwhile."""
    settings = bench.settings
    workload = bench.workloads[kind]
    stack = bench.stack
    for _ in range(1 + DISTURBED_RETRIES):
        await wait_until_quiet(stack.own_groups, settings.max_wait_busy, bench.report.notes)
        cpu = stack.cpu_meter()
        async with DisturbanceWatch(stack.own_groups) as watch:
            before = cpu.read()
            busy_before = machine_busy_s()
            if target == "direct":
                outcome = await run_direct(
                    bench.session,
                    stack.direct_url + "/chat/completions",
                    workload.bodies,
                    settings.max_tokens,
                    settings.concurrency,
                )
            elif target == "batch-api":
                outcome = await run_batch_api(bench.client, workload, settings.max_tokens, bench.batch_ids)
            else:
                name = f"hotq-submit-{kind}-{index}-{len(bench.report.rounds)}"
                outcome = await run_submit(
                    bench.processes, bench.config, stack.model, workload, settings.max_tokens, bench.workdir, name
                )
            busy = machine_busy_s() - busy_before
            used = cpu.read().since(before)
        used.pop(OTHER, None)
        used.update(outcome.extra_cpu_s)
        wall = outcome.wall_s
        result = RoundResult(
            target=target,
            kind=kind,
            index=index,
            requests=len(workload.bodies),
            ok=outcome.ok,
            errors=dict(outcome.errors),
            completion_tokens=outcome.completion_tokens,
            exact_tokens=outcome.exact_tokens,
            wall_s=round(wall, 3),
            tokens_per_s=round(outcome.completion_tokens / wall, 1) if wall > 0 else 0.0,
            extra=outcome.extra,
            cpu_s={name: round(seconds, 2) for name, seconds in used.items()},
            machine_busy_cores=round(busy / wall, 2) if wall > 0 else None,
            unaccounted_cores=round(max(0.0, busy - sum(used.values())) / wall, 2) if wall > 0 else None,
            disturbed_by=list(watch.seen),
        )
        bench.report.rounds.append(result)
        print(
            f"  {kind:<9}{index:>2} {target:<10}{result.tokens_per_s:>8.1f} tok/s  {result.completion_tokens} tokens"
            f" in {result.wall_s:.2f} s  exact {result.exact_tokens}/{result.requests}"
            f"  errors {sum(outcome.errors.values())}  machine busy {fmt(result.machine_busy_cores)} cores"
            + (f"  DISTURBED by {len(result.disturbed_by)} foreign process(es): repeating" if watch.seen else ""),
            flush=True,
        )
        if not result.disturbed_by:
            return
    bench.report.notes.append(f"{kind} {index} {target}: disturbed {1 + DISTURBED_RETRIES} times; no clean round")


def order(index: int, targets: Sequence[str]) -> list[str]:
    """Odd rounds forward, even rounds reversed: a slow drift of the machine hits every target alike."""
    return list(targets) if index % 2 else list(reversed(targets))


def summarise(report: Report, targets: Sequence[str]) -> Summary:
    def measured(target: str) -> list[RoundResult]:
        return [r for r in report.rounds if r.target == target and r.kind == "measured" and not r.disturbed_by]

    means = {t: round(statistics.fmean(r.tokens_per_s for r in measured(t)), 1) for t in targets if measured(t)}
    direct = means.get("direct")
    direct_by_index = {r.index: r.tokens_per_s for r in measured("direct")}
    ratios: dict[str, float] = {}
    pairs: dict[str, list[float]] = {}
    for target in targets:
        if target == "direct" or target not in means or not direct:
            continue
        ratios[target] = round(means[target] / direct, 4)
        pairs[target] = [
            round(r.tokens_per_s / direct_by_index[r.index], 4)
            for r in measured(target)
            if direct_by_index.get(r.index)
        ]
    net = [r.extra["net_tokens_per_s"] for r in measured("submit") if r.extra.get("net_tokens_per_s")]
    net_mean = round(statistics.fmean(net), 1) if net else None
    return Summary(
        mean_tps=means,
        ratio_to_direct=ratios,
        pair_ratios=pairs,
        target_ratio=TARGET_RATIO,
        meets_target={t: ratio >= TARGET_RATIO for t, ratio in ratios.items()},
        submit_net_mean_tps=net_mean,
        submit_net_ratio=round(net_mean / direct, 4) if net_mean and direct else None,
    )


# ---------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------


async def start_stack(
    settings: argparse.Namespace, processes: Processes, workdir: Path, model: str, report: Report
) -> tuple[Stack, Path]:
    limits = {"max_inflight": settings.max_inflight, "reserved_interactive": settings.reserved_interactive}
    config, api_url, api = await serve_embedded_model(
        processes, workdir, settings, report, model, limits, request_timeout_s=REQUEST_TIMEOUT_S
    )

    print("hotq agent (starts vLLM)", flush=True)
    started = time.monotonic()
    agent, events = start_agent(processes, config, model)
    await events.wait_for(is_event("backend_started"), agent, AGENT_READY_TIMEOUT_S, "backend_started")
    ready = await events.wait_for(is_event("backend_ready"), agent, AGENT_READY_TIMEOUT_S, "backend_ready")
    await events.wait_for(is_event("agent_state", state="hot"), agent, 60, "agent_state hot")
    hot_s = time.monotonic() - started
    print(f"  hot after {hot_s:.1f} s; vLLM at {ready.fields['url']}", flush=True)
    report.startup = {"agent_hot_s": round(hot_s, 2), "backend_ready_reported_s": ready.fields.get("seconds")}
    return Stack.started(model, api_url, api, agent, events, workdir), config


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"smollm-batch-{uuid.uuid4().hex[:8]}"  # unique: this run's queues are its own
    report.settings["model"] = model
    targets = [t for t in TARGETS if not (t == "submit" and settings.skip_submit)]
    batch_ids: list[str] = []
    stack: Stack | None = None
    try:
        stack, config = await start_stack(settings, processes, workdir, model, report)
        texts = prompts(settings.requests)
        workloads = {
            "warm-up": Workload.build(
                model, texts[: settings.warmup_requests], settings.max_tokens, workdir / "warmup.jsonl"
            ),
            "measured": Workload.build(model, texts, settings.max_tokens, workdir / "measured.jsonl"),
        }
        client = openai.AsyncOpenAI(base_url=stack.api_url, api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        async with http_session(settings.concurrency + 8, REQUEST_TIMEOUT_S) as session:
            bench = Bench(settings, processes, stack, config, workdir, session, client, workloads, batch_ids, report)
            print(
                f"{settings.requests} chat requests, {settings.max_tokens} tokens each; targets {', '.join(targets)}",
                flush=True,
            )
            if settings.warmup_requests:
                for target in targets:
                    await one_round(bench, target, "warm-up", 0)
            for index in range(1, settings.rounds + 1):
                for target in order(index, targets):
                    await one_round(bench, target, "measured", index)
        await client.close()
        submits = {log.stem: log for log in sorted(workdir.glob("hotq-submit-*.log"))}  # Processes: <name>.log
        check_stack_logs(processes, stack, report.notes, more=submits)
        if settings.keep_logs:
            keep_stack_logs(processes, stack, report, "batch_vllm")
        report.shutdown = await stop_stack(processes, stack, report.notes)
    finally:
        await stop_agent(processes, stack)
        # A finished batch deletes its own results queue; an interrupted one leaves it behind.
        leftovers = request_queues(model) + [topology.results_queue_name(b) for b in batch_ids]
        leftovers += [topology.results_queue_name(r.extra["job_id"]) for r in report.rounds if "job_id" in r.extra]
        await delete_queues(settings.amqp_url, leftovers)
    report.summary = summarise(report, targets)
    note_round_problems(report.rounds, settings.max_tokens, report.notes)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def print_report(report: Report, json_path: Path) -> None:
    s = report.settings
    print()
    print(
        f"{s['requests']} chat requests x {s['max_tokens']} tokens; direct at concurrency {s['concurrency']}; "
        f"batch lane {s['max_inflight'] - s['reserved_interactive']} of {s['max_inflight']} slots"
    )
    header = (
        f"{'round':<12}{'target':<11}{'ok/n':>8}{'exact':>6}{'tokens':>7}{'wall s':>8}{'tok/s':>8}"
        f"{'cpu vllm':>9}{'api':>6}{'agent':>6}{'rmq':>6}{'submit':>7}{'gen':>6}{'busy':>6}{'noise':>6}  detail"
    )
    print_header(header)
    for r in report.rounds:
        cpu = r.cpu_s
        detail = ""
        if r.target == "batch-api":
            e = r.extra
            detail = (
                f"first result {fmt(e.get('first_result_s'))} s, all {fmt(e.get('all_results_s'))} s,"
                f" completed {fmt(e.get('completed_s'))} s"
            )
        elif r.target == "submit":
            e = r.extra
            detail = f"job stored at {fmt(e.get('job_stored_s'))} s, net {fmt(e.get('net_tokens_per_s'), 1)} tok/s"
        print(
            f"{f'{r.kind} {r.index}':<12}{r.target:<11}{f'{r.ok}/{r.requests}':>8}{r.exact_tokens:>6}"
            f"{r.completion_tokens:>7}{r.wall_s:>8.2f}{r.tokens_per_s:>8.1f}"
            f"{fmt(cpu.get('vllm'), 1):>9}{fmt(cpu.get('hotq-api'), 1):>6}{fmt(cpu.get('hotq-agent'), 1):>6}"
            f"{fmt(cpu.get('rabbitmq'), 1):>6}{fmt(cpu.get('hotq-submit'), 1):>7}{fmt(cpu.get('load-gen'), 1):>6}"
            f"{fmt(r.machine_busy_cores):>6}{fmt(r.unaccounted_cores):>6}  {detail}"
            + ("  disturbed" if r.disturbed_by else "")
        )
    print_cpu_legend("cpu vllm..gen", "round")
    if report.summary is not None:
        m = report.summary
        print()
        print("mean tokens/s: " + ", ".join(f"{t} {v:.1f}" for t, v in m.mean_tps.items()))
        for target, ratio in m.ratio_to_direct.items():
            verdict = ("meets" if m.meets_target[target] else "BELOW") + f" the {m.target_ratio:.0%} target"
            rounds = ", ".join(f"{p:.1%}" for p in m.pair_ratios.get(target, []))
            print(f"  {target}/direct {ratio:.1%} ({verdict}); round by round {rounds}")
        if m.submit_net_ratio is not None:
            print(
                f"  submit counted from the job stored (no interpreter start-up, no file parse): "
                f"{m.submit_net_mean_tps:.1f} tok/s, {m.submit_net_ratio:.1%} of direct"
            )
        print("(means over undisturbed measured rounds only)")
    print_shutdown(report.shutdown)
    print_notes(report.notes, json_path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_vllm", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS, help="requests per round [500]")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens each request generates [32]")
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="direct: requests in flight at once [64]"
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="measured rounds per target [3]")
    parser.add_argument(
        "--warmup-requests",
        type=int,
        default=DEFAULT_WARMUP_REQUESTS,
        help="requests in each target's warm-up round (0: none) [64]",
    )
    parser.add_argument(
        "--reserved-interactive",
        type=int,
        default=0,
        help="backend slots batch work may not take, of --max-inflight (the config's default is 4) [0]",
    )
    parser.add_argument(
        "--max-inflight",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        help="the agent's max_inflight; vLLM runs at most 32 sequences at once either way [32]",
    )
    parser.add_argument("--skip-submit", action="store_true", help="leave out the `hotq submit` target")
    add_shared_options(parser, max_wait_busy=True, keep_logs="copy the API, agent and vLLM logs next to the JSON")
    args = parser.parse_args(argv)
    if min(args.requests, args.max_tokens, args.concurrency, args.rounds) < 1:
        parser.error("--requests, --max-tokens, --concurrency and --rounds must be at least 1")
    if not 0 <= args.warmup_requests <= args.requests:
        parser.error("--warmup-requests must be between 0 and --requests")
    if args.max_inflight < 1 or not 0 <= args.reserved_interactive < args.max_inflight:
        parser.error("--max-inflight must be at least 1, --reserved-interactive between 0 and --max-inflight - 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    report = Report(
        settings={
            "requests": settings.requests,
            "max_tokens": settings.max_tokens,
            "concurrency": settings.concurrency,
            "rounds": settings.rounds,
            "warmup_requests": settings.warmup_requests,
            "max_inflight": settings.max_inflight,
            "reserved_interactive": settings.reserved_interactive,
            "vllm_max_num_seqs": 32,
            "skip_submit": settings.skip_submit,
            "poll_s": POLLING.settings(),
            "temperature": 0,
            "ignore_eos": True,
            "amqp_url": settings.amqp_url,
        },
    )
    return run_bench(
        run, settings, report, "batch_vllm", print_report, logs=lambda workdir: sorted(workdir.rglob("*.log"))
    )


if __name__ == "__main__":
    sys.exit(main())

"""What `hotq agent` costs with a real vLLM: its start-up split and its throughput.

Run from the repository root::

    .venv/bin/python -m bench.agent_vllm [--concurrency 64] [--max-tokens 64] [--rounds 3]

One run, everything on this machine (RabbitMQ at ``--amqp-url``, all HTTP on 127.0.0.1),
the embedded SmolLM2-135M-Instruct model (``ensure_embedded_model()``, converted once and
cached in ``~/.cache/hotq``), served under a model name unique to the run
(``smollm-bench-<hex>``) whose queues are deleted at the end:

1. Start-up. ``hotq serve`` starts first (and is ready); then, at t0, ``hotq agent`` starts
   (a temporary config: ``model_path`` = the converted folder, ``max_inflight`` 32, a large
   ``idle_ttl_s``, ``data_dir`` in a temporary directory) and at the same moment one chat
   request is sent through the API, where it waits in the model's queue. The agent's JSON
   log lines (``backend_started``, ``backend_ready``, ``worker_started``, ``agent_state``
   ``hot``) give the split; the request's answer gives "first answer". The request's own
   generation time is estimated from identical requests sent afterwards, straight to vLLM
   (and, for comparison, through hotq), median of a few. Reported:

   - backend start: agent process start -> backend process started -> backend ready;
   - broker overhead: ready -> hot, and hot (resp. ready) -> first answer minus the
     generation time; note that the first answer also carries vLLM's own first-request
     warm-up, which this subtraction cannot separate from the broker's cost;
   - total: t0 -> first answer.

2. Throughput. ``--concurrency`` chat requests at once (fixed distinct prompts,
   ``max_tokens`` ``--max-tokens``, temperature 0, ``ignore_eos`` so every request generates
   exactly ``max_tokens`` tokens; each answer's ``usage.completion_tokens`` is checked),
   non-streaming, (a) ``direct`` to the vLLM server the agent started (the ``url`` of its
   ``backend_ready`` event) and (b) ``hotq`` through hotq's API. One warm-up round each,
   then ``--rounds`` rounds each, alternating a/b (ABBA order, so a slow drift of the
   machine hits both alike). tokens/s = completion tokens of the round / its wall time.
   Then ``--stream-rounds`` streaming rounds each (default 1; ``stream_options.include_usage``,
   tokens from usage; also time to first token). Each round also records the CPU seconds
   of vLLM, the hotq API, the agent, RabbitMQ and this load generator, and how many cores
   the whole machine kept busy (/proc/stat), so noise from other processes shows.

The machine has 2 cores shared by vLLM, RabbitMQ, hotq and the load generator: the
numbers compare direct vs hotq within one run, they are not capacity. The run waits
(bounded, ``--max-wait-busy``) while another vLLM server or pytest runs, since either
would skew it; a round during which one appears is marked disturbed, left out of the
means and repeated (at most twice). Check the notes too: a test suite that force-closes
RabbitMQ connections (some of hotq's tests do) makes the API and agent reconnect.

Results: a table on stdout and JSON in ``bench/results/agent_vllm-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench.common import (
    HOTQ_CLI,
    LOG_POLL_S,
    OTHER,
    ROOT,
    BadAnswer,
    BenchReport,
    CpuMeter,
    Processes,
    add_shared_options,
    check_logs,
    child_env,
    delete_queues,
    error_kind,
    fmt,
    foreign_heavy_processes,
    http_session,
    keep_logs,
    machine_busy_s,
    print_cpu_legend,
    print_header,
    print_notes,
    request_queues,
    round_or_none,
    run_bench,
    sse_data,
    start_api,
)
from hpc_agents.embedded_model import ensure_embedded_model
from ops.processes import pid_alive, signal_group
from ops.testing.stack import write_config

DEFAULT_CONCURRENCY: Final = 64
DEFAULT_MAX_TOKENS: Final = 64
DEFAULT_ROUNDS: Final = 3
MAX_INFLIGHT: Final = 32  # the agent's prefetch; vLLM runs 32 sequences at once (hpc_agents.vllm_command)
TARGET_RATIO: Final = 0.97  # hotq tokens/s over direct tokens/s

FIRST_PROMPT: Final = "List three primary colours."
FIRST_MAX_TOKENS: Final = 16  # short: its generation time is subtracted, the shorter the less error
GENERATION_SAMPLES: Final = 5  # identical requests per target to estimate that generation time

AGENT_READY_TIMEOUT_S: Final = 900.0  # the config's start_timeout_s is 600; leave the agent time to say so
REQUEST_TIMEOUT_S: Final = 900.0  # the first request waits in the queue while vLLM loads
QUEUE_WAIT_S: Final = 600.0  # hotq's max_queue_wait_s: the first request must outlive the start-up
AGENT_STOP_TIMEOUT_S: Final = 150.0  # drain (in-flight is 0 by then) + vLLM's stop (20 s, then SIGKILL)
BUSY_POLL_S: Final = 10.0
DISTURBANCE_POLL_S: Final = 1.0
DISTURBED_RETRIES: Final = 2  # a round disturbed by a foreign vLLM/pytest is repeated up to this often

TOPICS: Final = (
    "the ocean",
    "mountains",
    "a busy city",
    "the night sky",
    "an old library",
    "a rainy day",
    "a garden",
    "a train journey",
    "the desert",
    "a winter morning",
    "a lighthouse",
    "a market",
    "a river",
    "a forest",
    "a small village",
    "the moon",
)
FORMS: Final = ("Write a short story about", "Describe", "Write a poem about", "Explain why people love")


def prompts(n: int) -> list[str]:
    """`n` fixed, distinct prompts (the same in every run)."""
    return [f"Request {i}: {FORMS[i % len(FORMS)]} {TOPICS[(i // len(FORMS)) % len(TOPICS)]}." for i in range(n)]


def chat_body(model: str, prompt: str, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM's extra parameter: exactly max_tokens tokens every time
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


# ---------------------------------------------------------------------------
# Other heavy work on the machine: wait for it to finish before measuring
# ---------------------------------------------------------------------------


class DisturbanceWatch:
    """Polls for foreign vLLM servers and pytest runs while a round runs."""

    def __init__(self, own_groups: set[int]) -> None:
        self.own_groups = own_groups
        self.seen: dict[str, None] = {}  # ordered set of command lines
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DisturbanceWatch:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._scan()  # one last look: a run that started and ended in between is missed anyway

    async def _watch(self) -> None:
        while True:
            self._scan()
            await asyncio.sleep(DISTURBANCE_POLL_S)

    def _scan(self) -> None:
        for found in foreign_heavy_processes(self.own_groups):
            self.seen[found] = None


async def wait_until_quiet(own_groups: set[int], max_wait_s: float, notes: list[str]) -> None:
    deadline = time.monotonic() + max_wait_s
    waited = False
    while found := foreign_heavy_processes(own_groups):
        if time.monotonic() > deadline:
            notes.append(f"measured while other heavy processes ran (waited {max_wait_s:g} s): {found}")
            print(f"  still busy after {max_wait_s:g} s; measuring anyway: {found}", flush=True)
            return
        if not waited:
            print(f"  waiting for other heavy processes to finish: {found}", flush=True)
            waited = True
        await asyncio.sleep(BUSY_POLL_S)
    if waited:
        print("  machine quiet again", flush=True)


# ---------------------------------------------------------------------------
# The agent's JSON log lines, as they appear
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LogEvent:
    fields: dict[str, Any]
    logged_at: float | None  # wall clock, from the line's own timestamp
    seen_at: float  # time.monotonic() when this process read it


class EventTail:
    """Follows a JSON-lines log file (a process's stderr) in the background."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[LogEvent] = []
        self._offset = 0
        self._partial = b""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.poll()

    async def _follow(self) -> None:
        while True:
            if self.poll():
                self._changed.set()
            await asyncio.sleep(LOG_POLL_S)

    def poll(self) -> bool:
        try:
            with open(self.path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:
            return False
        if not data:
            return False
        seen = time.monotonic()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                fields = json.loads(line)
            except ValueError:
                continue
            if isinstance(fields, dict) and "event" in fields:
                self.events.append(LogEvent(fields, _parse_timestamp(fields.get("timestamp")), seen))
        return True

    def find(self, match: Callable[[dict[str, Any]], bool]) -> LogEvent | None:
        return next((e for e in self.events if match(e.fields)), None)

    async def wait_for(
        self, match: Callable[[dict[str, Any]], bool], process: subprocess.Popen[bytes], timeout: float, what: str
    ) -> LogEvent:
        deadline = time.monotonic() + timeout
        while (found := self.find(match)) is None:
            if process.poll() is not None:
                self.poll()
                if (found := self.find(match)) is not None:
                    return found
                raise RuntimeError(f"the agent exited with {process.returncode} before logging {what}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the agent did not log {what} within {timeout:g} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=0.5)
            except TimeoutError:
                pass
        return found


def _parse_timestamp(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def is_event(name: str, **expected: object) -> Callable[[dict[str, Any]], bool]:
    return lambda fields: fields.get("event") == name and all(fields.get(k) == v for k, v in expected.items())


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    latency_s: float
    completion_tokens: int
    ttft_s: float | None = None  # streams only: until the first content


async def chat(session: aiohttp.ClientSession, url: str, body: bytes) -> Answer:
    """One non-streaming chat completion; its latency and usage.completion_tokens."""
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        raw = await response.read()
        if response.status != 200:
            raise BadAnswer(f"HTTP {response.status}: {raw[:200]!r}")
    latency = time.perf_counter() - started
    try:
        answer = json.loads(raw)
        tokens = int(answer["usage"]["completion_tokens"])
        answer["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise BadAnswer(f"malformed body: {raw[:200]!r}") from None
    return Answer(latency, tokens)


async def chat_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> Answer:
    """One streamed chat completion; tokens from the usage event (stream_options.include_usage)."""
    started = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] | None = None
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        if response.status != 200:
            raise BadAnswer(f"HTTP {response.status}: {(await response.read())[:200]!r}")
        async for data in sse_data(response):
            if "error" in data:
                raise BadAnswer(f"stream error: {str(data['error'])[:200]}")
            choices = data.get("choices") or []
            if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter()
            if data.get("usage"):
                usage = data["usage"]
    finished = time.perf_counter()
    if usage is None:
        raise BadAnswer("no usage event")
    return Answer(finished - started, int(usage["completion_tokens"]), None if first is None else first - started)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class StartupResult:
    # seconds after t0 (the agent process start), from the agent's own log timestamps
    backend_started_s: float
    backend_ready_s: float
    backend_ready_reported_s: float  # the event's own "seconds": backend Popen -> /health and /v1/models OK
    worker_started_s: float
    hot_s: float
    first_answer_s: float  # when this process got the first request's answer (monotonic clock)
    first_answer_tokens: int
    # the first request's generation time, estimated from identical requests afterwards
    generation_direct_s: list[float]
    generation_hotq_s: list[float]
    generation_s: float  # the median straight to vLLM
    hotq_warm_added_s: float  # median through hotq minus median direct, with everything warm
    # the split
    agent_boot_s: float  # t0 -> backend process started (imports, AMQP connect, registry)
    backend_start_s: float  # backend process started -> ready
    ready_to_worker_s: float
    ready_to_hot_s: float
    hot_to_first_answer_s: float
    hot_to_first_answer_minus_generation_s: float
    ready_to_first_answer_minus_generation_s: float
    total_s: float  # t0 -> first answer


@dataclass
class Round:
    """One round of chat requests to one target: how many were answered well, their tokens, how fast."""

    target: str
    kind: str  # "warm-up" | "measured" | ...
    index: int
    requests: int
    ok: int
    errors: dict[str, int]
    completion_tokens: int
    exact_tokens: int  # answers with exactly max_tokens completion tokens
    wall_s: float
    tokens_per_s: float


@dataclass
class RoundResult(Round):
    """A round of this benchmark: target "direct" | "hotq", kind "warm-up" | "measured" | "stream"."""

    latency_p50_s: float | None
    latency_max_s: float | None
    ttft_p50_s: float | None  # streams only
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds during the round, by process
    other_cpu_cores: float | None = None  # cores busy with unrelated processes (noise)
    machine_busy_cores: float | None = None  # all cores, from /proc/stat (short-lived processes included)
    unaccounted_cores: float | None = None  # machine busy minus the measured processes: noise, upper bound
    disturbed_by: list[str] = field(default_factory=list)  # foreign vLLM/pytest seen during the round


@dataclass
class ThroughputSummary:
    direct_mean_tps: float | None
    hotq_mean_tps: float | None
    ratio: float | None  # hotq mean / direct mean
    pair_ratios: list[float]  # round by round
    target_ratio: float
    meets_target: bool | None
    stream_direct_mean_tps: float | None
    stream_hotq_mean_tps: float | None
    stream_ratio: float | None  # hotq mean / direct mean, streaming rounds


@dataclass
class Report(BenchReport):
    startup: StartupResult | None = None
    rounds: list[RoundResult] = field(default_factory=list)
    summary: ThroughputSummary | None = None
    shutdown: dict[str, Any] = field(default_factory=dict)


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


@dataclass
class Stack:
    """What the run started, for measuring and for stopping."""

    model: str
    api_url: str  # ends in /v1
    direct_url: str  # ends in /v1
    api: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    backend_pid: int
    backend_log: Path
    events: EventTail

    @classmethod
    def started(
        cls,
        model: str,
        api_url: str,
        api: subprocess.Popen[bytes],
        agent: subprocess.Popen[bytes],
        events: EventTail,
        workdir: Path,
    ) -> Stack:
        """The stack once the agent has logged backend_started and backend_ready."""
        backend = events.find(is_event("backend_started"))
        ready = events.find(is_event("backend_ready"))
        assert backend is not None and ready is not None
        return cls(
            model=model,
            api_url=api_url,
            direct_url=str(ready.fields["url"]).rstrip("/") + "/v1",
            api=api,
            agent=agent,
            backend_pid=int(backend.fields["pid"]),
            backend_log=Path(str(backend.fields.get("log", workdir / "backend.log"))),
            events=events,
        )

    def cpu_meter(self) -> CpuMeter:
        # each started with its own session: process group == pid
        return CpuMeter.of({"vllm": self.backend_pid, "hotq-api": self.api.pid, "hotq-agent": self.agent.pid})

    @property
    def own_groups(self) -> set[int]:
        return {self.api.pid, self.agent.pid, self.backend_pid}


async def serve_embedded_model(
    processes: Processes,
    workdir: Path,
    settings: argparse.Namespace,
    report: BenchReport,
    model: str,
    limits: dict[str, int],
    **options: object,
) -> tuple[Path, str, subprocess.Popen[bytes]]:
    """`hotq serve` with a config serving the embedded model (converted once, then cached) as `model`, with
    `limits` (``max_inflight``, ...) and the top-level `options`; ready once the machine is quiet too.
    Returns the config, the API's URL (ending in /v1) and its process."""
    print("embedded model", flush=True)
    model_path = await asyncio.to_thread(ensure_embedded_model)
    report.settings["model_path"] = str(model_path)
    table: dict[str, object] = {
        "model_path": str(model_path),
        **limits,
        "idle_ttl_s": 86400,
        "start_timeout_s": 600,
        "max_restarts": 0,  # a backend that fails to start fails the run, visibly
    }
    config = write_config(workdir / "hotq.toml", settings.amqp_url, {model: table}, None, **options)
    print("hotq serve", flush=True)
    api_url, api = await start_api(processes, config)
    await wait_until_quiet({api.pid}, settings.max_wait_busy, report.notes)
    return config, api_url, api


def start_agent(processes: Processes, config: Path, model: str) -> tuple[subprocess.Popen[bytes], EventTail]:
    """`hotq agent` for `model` as "hotq-agent" (it starts vLLM), its JSON log followed from the start."""
    agent = processes.start(
        "hotq-agent", [*HOTQ_CLI, "agent", "--config", str(config), "--model", model], env=child_env()
    )
    events = EventTail(processes.log_path("hotq-agent"))
    events.start()
    return agent, events


async def measure_startup(
    processes: Processes, config: Path, model: str, api_url: str, api: subprocess.Popen[bytes], workdir: Path
) -> tuple[Stack, StartupResult]:
    first_body = chat_body(model, FIRST_PROMPT, FIRST_MAX_TOKENS)
    async with http_session(4, REQUEST_TIMEOUT_S) as session:
        t0_wall = time.time()
        t0 = time.monotonic()
        agent, events = start_agent(processes, config, model)
        first = asyncio.create_task(chat(session, api_url + "/chat/completions", first_body))  # waits in the queue
        try:
            started = await events.wait_for(
                is_event("backend_started"), agent, AGENT_READY_TIMEOUT_S, "backend_started"
            )
            print(f"  backend started (pid {started.fields['pid']}), loading vLLM", flush=True)
            ready = await events.wait_for(is_event("backend_ready"), agent, AGENT_READY_TIMEOUT_S, "backend_ready")
            print(f"  backend ready after {ready.fields['seconds']} s at {ready.fields['url']}", flush=True)
            worker = await events.wait_for(is_event("worker_started"), agent, 60, "worker_started")
            hot = await events.wait_for(is_event("agent_state", state="hot"), agent, 60, "agent_state hot")
            answer = await first
        except BaseException:
            first.cancel()
            await asyncio.gather(first, return_exceptions=True)
            raise
        answered_at = time.monotonic() - t0
        print(f"  first answer {answered_at:.2f} s after the agent started", flush=True)
        stack = Stack.started(model, api_url, api, agent, events, workdir)

        # The first request's own generation time: identical requests, now that all is warm.
        generation_direct: list[float] = []
        generation_hotq: list[float] = []
        for _ in range(GENERATION_SAMPLES):
            generation_direct.append(
                (await chat(session, stack.direct_url + "/chat/completions", first_body)).latency_s
            )
            generation_hotq.append((await chat(session, api_url + "/chat/completions", first_body)).latency_s)

    def at(event: LogEvent) -> float:
        # The agent's log timestamps (wall clock) are exact to the microsecond; when one
        # is missing, when this process read the line (~LOG_POLL_S later) stands in.
        return event.logged_at - t0_wall if event.logged_at is not None else event.seen_at - t0

    generation = statistics.median(generation_direct)
    result = StartupResult(
        backend_started_s=round(at(started), 3),
        backend_ready_s=round(at(ready), 3),
        backend_ready_reported_s=float(ready.fields["seconds"]),
        worker_started_s=round(at(worker), 3),
        hot_s=round(at(hot), 3),
        first_answer_s=round(answered_at, 3),
        first_answer_tokens=answer.completion_tokens,
        generation_direct_s=[round(s, 4) for s in generation_direct],
        generation_hotq_s=[round(s, 4) for s in generation_hotq],
        generation_s=round(generation, 4),
        hotq_warm_added_s=round(statistics.median(generation_hotq) - generation, 4),
        agent_boot_s=round(at(started), 3),
        backend_start_s=round(at(ready) - at(started), 3),
        ready_to_worker_s=round(at(worker) - at(ready), 3),
        ready_to_hot_s=round(at(hot) - at(ready), 3),
        hot_to_first_answer_s=round(answered_at - at(hot), 3),
        hot_to_first_answer_minus_generation_s=round(answered_at - at(hot) - generation, 3),
        ready_to_first_answer_minus_generation_s=round(answered_at - at(ready) - generation, 3),
        total_s=round(answered_at, 3),
    )
    return stack, result


async def load_round(
    session: aiohttp.ClientSession,
    target: str,
    base_url: str,
    bodies: Sequence[bytes],
    max_tokens: int,
    stream: bool,
    kind: str,
    index: int,
    cpu: CpuMeter,
    own_groups: set[int],
) -> RoundResult:
    """All `bodies` at once; the round's wall time is from the first send to the last answer."""
    url = base_url + "/chat/completions"
    call = chat_stream if stream else chat
    async with DisturbanceWatch(own_groups) as watch:
        before = cpu.read()
        busy_before = machine_busy_s()
        started = time.perf_counter()
        outcomes = await asyncio.gather(*(call(session, url, body) for body in bodies), return_exceptions=True)
        wall = time.perf_counter() - started
        busy = machine_busy_s() - busy_before
        used = cpu.read().since(before)
    answers = [o for o in outcomes if isinstance(o, Answer)]
    errors: Counter[str] = Counter()
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            errors[error_kind(outcome)] += 1
    tokens = sum(a.completion_tokens for a in answers)
    other = used.pop(OTHER, None)
    measured = sum(used.values())
    result = RoundResult(
        target=target,
        kind=kind,
        index=index,
        requests=len(bodies),
        ok=len(answers),
        errors=dict(errors),
        completion_tokens=tokens,
        exact_tokens=sum(1 for a in answers if a.completion_tokens == max_tokens),
        wall_s=round(wall, 3),
        tokens_per_s=round(tokens / wall, 1) if wall > 0 else 0.0,
        latency_p50_s=round_or_none(_median([a.latency_s for a in answers])),
        latency_max_s=round_or_none(max((a.latency_s for a in answers), default=None)),
        ttft_p50_s=round_or_none(_median([a.ttft_s for a in answers if a.ttft_s is not None])) if stream else None,
        cpu_s={name: round(seconds, 2) for name, seconds in used.items()},
        other_cpu_cores=round(other / wall, 2) if other is not None and wall > 0 else None,
        machine_busy_cores=round(busy / wall, 2) if wall > 0 else None,
        unaccounted_cores=round(max(0.0, busy - measured) / wall, 2) if wall > 0 else None,
        disturbed_by=list(watch.seen),
    )
    print(
        f"  {kind:<9}{index:>2} {target:<7} {result.tokens_per_s:>8.1f} tok/s  {result.completion_tokens} tokens "
        f"in {result.wall_s:.2f} s  exact {result.exact_tokens}/{result.requests}  errors {sum(errors.values())}"
        f"  machine busy {fmt(result.machine_busy_cores)} cores"
        + (f"  DISTURBED by {len(result.disturbed_by)} foreign process(es): repeating" if result.disturbed_by else ""),
        flush=True,
    )
    return result


async def measure_throughput(stack: Stack, settings: argparse.Namespace, report: Report) -> None:
    texts = prompts(settings.concurrency)
    bodies = {
        stream: [chat_body(stack.model, t, settings.max_tokens, stream) for t in texts] for stream in (False, True)
    }
    urls = {"direct": stack.direct_url, "hotq": stack.api_url}
    cpu = stack.cpu_meter()
    async with http_session(settings.concurrency + 8, REQUEST_TIMEOUT_S) as session:

        async def one(target: str, kind: str, index: int, stream: bool = False) -> None:
            """One round; repeated (bounded) when a foreign vLLM or pytest ran meanwhile."""
            for _ in range(1 + DISTURBED_RETRIES):
                await wait_until_quiet(stack.own_groups, settings.max_wait_busy, report.notes)
                result = await load_round(
                    session,
                    target,
                    urls[target],
                    bodies[stream],
                    settings.max_tokens,
                    stream,
                    kind,
                    index,
                    cpu,
                    stack.own_groups,
                )
                report.rounds.append(result)
                if not result.disturbed_by:
                    return
            report.notes.append(f"{kind} {index} {target}: disturbed {1 + DISTURBED_RETRIES} times; no clean round")

        await one("direct", "warm-up", 0)
        await one("hotq", "warm-up", 0)
        for index in range(1, settings.rounds + 1):
            for target in abba(index):
                await one(target, "measured", index)
        for index in range(1, settings.stream_rounds + 1):
            for target in abba(index):
                await one(target, "stream", index, stream=True)


def abba(index: int) -> tuple[str, str]:
    """Round 1 direct first, round 2 hotq first, ...: a slow drift of the machine hits both alike."""
    return ("direct", "hotq") if index % 2 else ("hotq", "direct")


def summarise(report: Report) -> ThroughputSummary:
    def rounds(target: str, kind: str) -> list[RoundResult]:
        return [r for r in report.rounds if r.target == target and r.kind == kind and not r.disturbed_by]

    direct, hotq = rounds("direct", "measured"), rounds("hotq", "measured")
    direct_mean = statistics.fmean(r.tokens_per_s for r in direct) if direct else None
    hotq_mean = statistics.fmean(r.tokens_per_s for r in hotq) if hotq else None
    ratio = hotq_mean / direct_mean if direct_mean and hotq_mean is not None else None
    direct_by_index = {r.index: r.tokens_per_s for r in direct}
    pairs = [round(h.tokens_per_s / direct_by_index[h.index], 4) for h in hotq if direct_by_index.get(h.index)]
    stream_direct, stream_hotq = rounds("direct", "stream"), rounds("hotq", "stream")
    stream_direct_mean = statistics.fmean(r.tokens_per_s for r in stream_direct) if stream_direct else None
    stream_hotq_mean = statistics.fmean(r.tokens_per_s for r in stream_hotq) if stream_hotq else None
    stream_ratio = (
        stream_hotq_mean / stream_direct_mean if stream_direct_mean and stream_hotq_mean is not None else None
    )
    return ThroughputSummary(
        direct_mean_tps=round_or_none(direct_mean, 1),
        hotq_mean_tps=round_or_none(hotq_mean, 1),
        ratio=round_or_none(ratio, 4),
        pair_ratios=pairs,
        target_ratio=TARGET_RATIO,
        meets_target=None if ratio is None else ratio >= TARGET_RATIO,
        stream_direct_mean_tps=round_or_none(stream_direct_mean, 1),
        stream_hotq_mean_tps=round_or_none(stream_hotq_mean, 1),
        stream_ratio=round_or_none(stream_ratio, 4),
    )


def note_problems(report: Report, max_tokens: int) -> None:
    note_round_problems(report.rounds, max_tokens, report.notes)
    if report.startup is not None and report.startup.first_answer_tokens != FIRST_MAX_TOKENS:
        report.notes.append(f"the first answer had {report.startup.first_answer_tokens} tokens, not {FIRST_MAX_TOKENS}")


def note_round_problems(rounds: Iterable[Round], max_tokens: int, notes: list[str]) -> None:
    """Note the rounds with failed requests or answers of another length than `max_tokens`."""
    for r in rounds:
        if r.errors or r.ok < r.requests:
            notes.append(f"{r.kind} {r.index} {r.target}: {r.ok}/{r.requests} ok, errors {r.errors}")
        if r.exact_tokens < r.ok:
            notes.append(
                f"{r.kind} {r.index} {r.target}: only {r.exact_tokens}/{r.ok} answers had exactly {max_tokens} tokens"
            )


def check_stack_logs(processes: Processes, stack: Stack, notes: list[str], more: Mapping[str, Path] = {}) -> None:
    """Note error lines the API, the agent, vLLM (and `more` logs) logged, and RabbitMQ connections they lost."""
    logs = {**processes.log_paths(["hotq-api", "hotq-agent"]), "vllm": stack.backend_log, **more}
    check_logs(logs, notes, lost_connections=True)


def keep_stack_logs(processes: Processes, stack: Stack, report: BenchReport, name: str) -> None:
    """Copy the API, agent and vLLM logs next to the JSON (``--keep-logs``); the settings say where."""
    logs = [processes.log_path("hotq-api"), processes.log_path("hotq-agent"), stack.backend_log]
    report.settings["logs"] = str(keep_logs(report, name, logs).relative_to(ROOT))


async def stop_stack(processes: Processes, stack: Stack, notes: list[str]) -> dict[str, Any]:
    """SIGTERM the agent (it drains and stops vLLM), then the API; check that vLLM is gone. Returns how it went."""
    print("stopping: SIGTERM to the agent (drains, stops vLLM), then the API", flush=True)
    started = time.monotonic()
    returncode = await asyncio.to_thread(processes.stop, "hotq-agent", AGENT_STOP_TIMEOUT_S)
    agent_stop_s = time.monotonic() - started
    await stack.events.stop()
    exit_event = stack.events.find(is_event("agent_exit"))
    stopped_event = stack.events.find(is_event("backend_stopped"))
    backend_alive = pid_alive(stack.backend_pid)
    if backend_alive:
        notes.append(f"vLLM (pid {stack.backend_pid}) outlived its agent: killed its process group")
        signal_group(stack.backend_pid, signal.SIGKILL)
    api_returncode = processes.stop("hotq-api")
    leftover = subprocess.run(["pgrep", "-af", "vllm.entrypoints"], capture_output=True, text=True).stdout.strip()
    if leftover:
        notes.append(f"vLLM processes still running after the stop: {leftover}")
    if returncode not in (0, None):
        notes.append(f"the agent exited with {returncode}")
    return {
        "agent_returncode": returncode,
        "agent_stop_s": round(agent_stop_s, 2),
        "agent_exit": exit_event.fields if exit_event else None,
        "backend_stopped": stopped_event.fields if stopped_event else None,
        "backend_outlived_agent": backend_alive,
        "api_returncode": api_returncode,
        "pgrep_vllm_entrypoints": leftover.splitlines(),
    }


async def stop_agent(processes: Processes, stack: Stack | None) -> None:
    """Stop the agent (it stops vLLM), then make sure vLLM is gone: also after an interrupted or failed run."""
    backend_pid = stack.backend_pid if stack is not None else _logged_backend_pid(processes.log_path("hotq-agent"))
    await asyncio.to_thread(processes.stop, "hotq-agent", AGENT_STOP_TIMEOUT_S)
    if backend_pid is not None and pid_alive(backend_pid):
        signal_group(backend_pid, signal.SIGKILL)


def _logged_backend_pid(agent_log: Path) -> int | None:
    tail = EventTail(agent_log)
    tail.poll()
    started = tail.find(is_event("backend_started"))
    return int(started.fields["pid"]) if started is not None else None


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"smollm-bench-{uuid.uuid4().hex[:8]}"  # unique: this run's queues are its own
    report.settings["model"] = model
    stack: Stack | None = None
    try:
        config, api_url, api = await serve_embedded_model(
            processes,
            workdir,
            settings,
            report,
            model,
            {"max_inflight": MAX_INFLIGHT},
            max_queue_wait_s=QUEUE_WAIT_S,  # the first request waits while vLLM loads
            request_timeout_s=REQUEST_TIMEOUT_S,
        )
        report.environment["loadavg_before_agent"] = os.getloadavg()

        print("start-up: hotq agent + one request waiting in the queue", flush=True)
        stack, report.startup = await measure_startup(processes, config, model, api_url, api, workdir)

        print(f"throughput: {settings.concurrency} concurrent, {settings.max_tokens} tokens each", flush=True)
        await measure_throughput(stack, settings, report)
        check_stack_logs(processes, stack, report.notes)
        if settings.keep_logs:
            keep_stack_logs(processes, stack, report, "agent_vllm")
        report.shutdown = await stop_stack(processes, stack, report.notes)
    finally:
        await stop_agent(processes, stack)
        await delete_queues(settings.amqp_url, request_queues(model))
    report.summary = summarise(report)
    note_problems(report, settings.max_tokens)


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def print_report(report: Report, json_path: Path) -> None:
    s = report.startup
    if s is not None:
        print()
        print("Start-up (t0 = `hotq agent` process start; one request already waiting in the queue)")
        rows = [
            ("t0 -> backend process started (agent boot)", s.agent_boot_s),
            ("backend process started -> ready (vLLM)", s.backend_start_s),
            ("  (the agent's own backend_ready 'seconds')", s.backend_ready_reported_s),
            ("t0 -> backend ready", s.backend_ready_s),
            ("ready -> worker consuming", s.ready_to_worker_s),
            ("ready -> hot", s.ready_to_hot_s),
            ("hot -> first answer", s.hot_to_first_answer_s),
            (f"first request's generation ({FIRST_MAX_TOKENS} tokens, direct, warm, median)", s.generation_s),
            ("hot -> first answer - generation", s.hot_to_first_answer_minus_generation_s),
            (
                "ready -> first answer - generation (broker + vLLM first-request warm-up)",
                s.ready_to_first_answer_minus_generation_s,
            ),
            ("hotq's added latency on the same request, warm (median)", s.hotq_warm_added_s),
            ("total: t0 -> first answer", s.total_s),
        ]
        width = max(len(label) for label, _ in rows) + 2
        for label, value in rows:
            print(f"  {label:<{width}}{value:>8.3f} s")
    if report.rounds:
        print()
        print(
            f"Throughput: {report.settings['concurrency']} concurrent chat requests, "
            f"{report.settings['max_tokens']} tokens each"
        )
        header = (
            f"{'round':<12}{'target':<8}{'ok/n':>7}{'exact':>7}{'tokens':>8}{'wall s':>8}{'tok/s':>9}"
            f"{'p50 s':>8}{'max s':>8}"
            f"{'ttft s':>8}{'cpu vllm':>9}{'api':>6}{'agent':>6}{'rmq':>6}{'gen':>6}{'busy':>6}{'noise':>6}"
        )
        print_header(header)
        for r in report.rounds:
            cpu = r.cpu_s
            print(
                f"{f'{r.kind} {r.index}':<12}{r.target:<8}{f'{r.ok}/{r.requests}':>7}{r.exact_tokens:>7}"
                f"{r.completion_tokens:>8}"
                f"{r.wall_s:>8.2f}{r.tokens_per_s:>9.1f}{fmt(r.latency_p50_s):>8}{fmt(r.latency_max_s):>8}{fmt(r.ttft_p50_s):>8}"
                f"{fmt(cpu.get('vllm'), 1):>9}{fmt(cpu.get('hotq-api'), 1):>6}{fmt(cpu.get('hotq-agent'), 1):>6}"
                f"{fmt(cpu.get('rabbitmq'), 1):>6}{fmt(cpu.get('load-gen'), 1):>6}"
                f"{fmt(r.machine_busy_cores):>6}{fmt(r.unaccounted_cores):>6}"
                + ("  disturbed" if r.disturbed_by else "")
            )
        print_cpu_legend("cpu vllm..gen", "round")
    if report.summary is not None:
        m = report.summary
        print()
        ratio = "-" if m.ratio is None else f"{m.ratio:.1%}"
        verdict = (
            ""
            if m.meets_target is None
            else ("meets" if m.meets_target else "BELOW") + f" the {m.target_ratio:.0%} target"
        )
        print(
            f"mean tokens/s: direct {fmt(m.direct_mean_tps, 1)}, hotq {fmt(m.hotq_mean_tps, 1)}; "
            f"hotq/direct {ratio} ({verdict})"
        )
        print("round by round hotq/direct: " + ", ".join(f"{p:.1%}" for p in m.pair_ratios))
        if m.stream_ratio is not None:
            print(
                f"streaming mean tokens/s: direct {fmt(m.stream_direct_mean_tps, 1)}, "
                f"hotq {fmt(m.stream_hotq_mean_tps, 1)}; hotq/direct {m.stream_ratio:.1%}"
            )
        print("(means over undisturbed rounds only)")
    print_shutdown(report.shutdown)
    print_notes(report.notes, json_path)


def print_shutdown(shutdown: dict[str, Any]) -> None:
    """How the stack stopped (`stop_stack`), if it got that far."""
    if shutdown:
        print()
        print(
            f"shutdown: agent exit code {shutdown.get('agent_returncode')} after {shutdown.get('agent_stop_s')} s, "
            f"vLLM stopped: {shutdown.get('backend_stopped') is not None}, "
            f"pgrep vllm.entrypoints: {shutdown.get('pgrep_vllm_entrypoints') or 'nothing'}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.agent_vllm", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="requests per round, all at once [64]"
    )
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="tokens each request generates [64]")
    parser.add_argument(
        "--rounds", type=int, default=DEFAULT_ROUNDS, help="measured rounds per target, after a warm-up [3]"
    )
    parser.add_argument(
        "--stream-rounds", type=int, default=1, help="streaming rounds per target after the others (0: none) [1]"
    )
    add_shared_options(parser, max_wait_busy=True, keep_logs="copy the API, agent and vLLM logs next to the JSON")
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_tokens < 1 or args.rounds < 1 or args.stream_rounds < 0:
        parser.error("--concurrency, --max-tokens and --rounds must be at least 1, --stream-rounds at least 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    report = Report(
        settings={
            "concurrency": settings.concurrency,
            "max_tokens": settings.max_tokens,
            "rounds": settings.rounds,
            "stream_rounds": settings.stream_rounds,
            "max_inflight": MAX_INFLIGHT,
            "first_prompt": FIRST_PROMPT,
            "first_max_tokens": FIRST_MAX_TOKENS,
            "amqp_url": settings.amqp_url,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    return run_bench(
        run, settings, report, "agent_vllm", print_report, logs=lambda workdir: sorted(workdir.rglob("*.log"))
    )


if __name__ == "__main__":
    sys.exit(main())

"""What hotq's core path costs: throughput and latency it adds on top of the backend.

Run from the repository root::

    .venv/bin/python -m bench.core_path [--requests N] [--quick] [--profile] [--skip-litellm]

Everything runs on this machine (RabbitMQ at ``--amqp-url``, all HTTP on 127.0.0.1).
One run measures non-streaming chat completions (a small fixed prompt, ``max_tokens``
16) at concurrency 1 and 50 against:

(a) ``direct``: the deterministic fake backend (``ops.testing.fake_backend``) over HTTP;
(b) ``hotq``: the same backend behind ``hotq serve`` + one ``hotq worker`` (subprocesses,
    a temporary config with ``max_inflight`` 64 and the default ``stream_flush_ms``, a model
    name unique to the run; its queues are deleted at the end);
(c) ``litellm``: the same backend behind LiteLLM's proxy (``litellm[proxy]`` lives in its own
    venv, ``bench/.venv-litellm`` by default, created on first use), one uvicorn worker,
    started as ``litellm --config C --host 127.0.0.1 --port P --num_workers 1`` with a
    master key (it refuses to start without one), ``LITELLM_LOCAL_MODEL_COST_MAP=True`` (no
    cost-map download) and ``LITELLM_LOG=WARNING`` (no per-request access log, like hotq);
(d) ``amqp-rpc``: a bare aio-pika request/reply round trip to a separate echo process
    (``bench.amqp_echo``), no HTTP at all: the RabbitMQ floor. Two variants: ``minimal``
    (transient, no confirms, no acks) and ``hotq-like`` (quorum queue, persistent, confirms,
    acks, two replies per request like hotq's Started + Final).

For each case: requests/s and latency p50/p99 (ms) over N requests after discarded
warm-up requests, and the latency a proxy adds: its p50/p99 minus direct's at the same
concurrency. One load generator for all cases: this process, under uvloop, with one
aiohttp ClientSession (keep-alive, connection limit = concurrency) per case; every
answer is checked (HTTP 200 and the exact expected content). Each case also reports the
CPU time per request of every process involved (load generator, backend, proxy, RabbitMQ)
read from /proc, and how busy unrelated processes kept the machine meanwhile (noise).

Streaming: one fast stream (a 2500-word prompt, ``max_tokens`` 2000, no delay), repeated
a few times, direct vs through hotq (and LiteLLM): time to first token, total time and
tokens/s (median over the repeats).

``--profile`` additionally samples the hotq API and worker processes with py-spy while a
separate c=50 load runs (after the measured cases, so the profiler does not disturb
them), writes speedscope files and prints the hottest functions of each process.

The machine has 2 cores shared by the load generator, RabbitMQ, the backend and the
proxy under test: absolute numbers are for comparing cases within one run, not capacity.

Results: a table on stdout and JSON in ``bench/results/core_path-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from bench import amqp_echo
from bench.common import (
    OTHER,
    RESULTS_DIR,
    ROOT,
    STARTUP_TIMEOUT_S,
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
    http_session,
    nearest_rank,
    print_header,
    print_notes,
    request_queues,
    run_bench,
    sse_data,
    start_api,
    start_fake_backend,
    start_worker,
    wait_for_line,
    wait_http_ok,
)
from ops.processes import free_port
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import write_config

DEFAULT_LITELLM_VENV: Final = ROOT / "bench" / ".venv-litellm"

CONCURRENCIES: Final = (1, 50)
PROMPT: Final = "Say hello to the benchmark"
MAX_TOKENS: Final = 16
STREAM_PROMPT_WORDS: Final = 2500
STREAM_MAX_TOKENS: Final = 2000
HOTQ_MAX_INFLIGHT: Final = 64  # >= the highest concurrency, so the worker's prefetch never throttles
LITELLM_MASTER_KEY: Final = "sk-bench-" + "0" * 32  # LiteLLM refuses to start without one

REQUEST_TIMEOUT_S: Final = 30.0
CASE_TIME_LIMIT_S: Final = 120.0  # a case stops early (and says so) past this
LITELLM_STARTUP_TIMEOUT_S: Final = 180.0

Call = Callable[[], Awaitable[None]]  # one request; raises if the answer is not the expected one


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    requests: dict[int, int]  # concurrency -> measured requests
    warmup: dict[int, int]  # concurrency -> discarded requests
    stream_repeats: int
    profile_s: float | None
    amqp_url: str
    litellm_venv: Path | None  # None: skip LiteLLM

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        if args.quick:
            requests = {1: 100, 50: 400}
            warmup = {1: 10, 50: 100}
            repeats = 2
            profile_s = 5.0
        else:
            requests = {1: 500, 50: 2000}
            warmup = {1: 50, 50: 200}
            repeats = 5
            profile_s = 20.0
        if args.requests is not None:
            requests = {1: max(20, args.requests // 4), 50: args.requests}
        return cls(
            requests=requests,
            warmup=warmup,
            stream_repeats=repeats,
            profile_s=(args.profile_seconds or profile_s) if args.profile else None,
            amqp_url=args.amqp_url,
            litellm_venv=None if args.skip_litellm else Path(args.litellm_venv),
        )


# ---------------------------------------------------------------------------
# CPU accounting: what each process spends per request (CpuMeter is in bench.common)
# ---------------------------------------------------------------------------

CPU_COLUMNS: Final = ("load-gen", "backend", "hotq-api", "hotq-worker", "amqp-echo", "litellm", "rabbitmq")

# ---------------------------------------------------------------------------
# The load generator
# ---------------------------------------------------------------------------


@dataclass
class LoadRun:
    latencies_s: list[float]
    errors: Counter[str]
    wall_s: float
    stopped_early: bool


async def run_load(call: Call, total: int, concurrency: int, time_limit_s: float = CASE_TIME_LIMIT_S) -> LoadRun:
    """`total` calls, `concurrency` at a time, each timed; failures counted by kind."""
    remaining = total
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    stop_at = time.monotonic() + time_limit_s

    async def user() -> None:
        nonlocal remaining
        while remaining > 0 and time.monotonic() < stop_at:
            remaining -= 1
            started = time.perf_counter()
            try:
                await call()
            except Exception as exc:  # noqa: BLE001 - every failure is a data point
                errors[error_kind(exc)] += 1
            else:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(concurrency)))
    return LoadRun(latencies, errors, time.perf_counter() - started, stopped_early=remaining > 0)


def chat_body(model: str, text: str, max_tokens: int, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def expected_content(text: str, max_tokens: int) -> str:
    return "".join(expected_chat_tokens(text, max_tokens)[0])


def http_chat_call(
    session: aiohttp.ClientSession, url: str, body: bytes, expected: str, headers: dict[str, str]
) -> Call:
    async def call() -> None:
        async with session.post(url, data=body, headers=headers) as response:
            raw = await response.read()
            if response.status != 200:
                raise BadAnswer(f"HTTP {response.status}")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise BadAnswer("malformed body") from None
        if content != expected:
            raise BadAnswer("wrong content")

    return call


async def chat_load_round(url: str, body: bytes, expected: str, concurrency: int, total: int) -> dict[str, Any]:
    """`total` chats at `concurrency` on `url` (an OpenAI base URL), after a warm-up that opens the
    connections: requests/s, p50 and p99 latency, errors by kind."""
    headers = {"Content-Type": "application/json"}
    async with http_session(concurrency, 60) as session:
        call = http_chat_call(session, url + "/chat/completions", body, expected, headers)
        await run_load(call, min(total, 100), concurrency)
        load = await run_load(call, total, concurrency)
    ordered = sorted(load.latencies_s)
    return {
        "requests_per_s": len(ordered) / load.wall_s,
        "p50_ms": percentile_ms(ordered, 50),
        "p99_ms": percentile_ms(ordered, 99),
        "errors": dict(load.errors),
    }


class AmqpRpcClient:
    """The client half of the bare aio-pika request/reply round trip (see `bench.amqp_echo`)."""

    def __init__(self, channel: AbstractChannel, request_queue: str, reply_queue: AbstractQueue, mode: str) -> None:
        self._channel = channel
        self._request_queue = request_queue
        self._reply_queue = reply_queue
        self._durable = amqp_echo.is_durable(mode)
        self._waiting: dict[str, asyncio.Future[bytes]] = {}

    @classmethod
    async def open(cls, connection: aio_pika.abc.AbstractConnection, request_queue: str, mode: str) -> AmqpRpcClient:
        durable = amqp_echo.is_durable(mode)
        channel = await connection.channel(publisher_confirms=durable, on_return_raises=durable)
        await amqp_echo.declare_request_queue(channel, request_queue, mode)
        reply_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        client = cls(channel, request_queue, reply_queue, mode)
        await reply_queue.consume(client._on_reply, no_ack=True)
        return client

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        if message.type != amqp_echo.ANSWER_TYPE or message.correlation_id is None:
            return  # the "started" frame of hotq-like mode: nothing to wait for
        waiter = self._waiting.pop(message.correlation_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message.body)

    def call_with(self, body: bytes) -> Call:
        exchange = self._channel.default_exchange
        delivery_mode = aio_pika.DeliveryMode.PERSISTENT if self._durable else aio_pika.DeliveryMode.NOT_PERSISTENT
        loop = asyncio.get_running_loop()

        async def call() -> None:
            correlation_id = uuid.uuid4().hex
            waiter: asyncio.Future[bytes] = loop.create_future()
            self._waiting[correlation_id] = waiter
            try:
                message = aio_pika.Message(
                    body, correlation_id=correlation_id, reply_to=self._reply_queue.name, delivery_mode=delivery_mode
                )
                await exchange.publish(message, routing_key=self._request_queue, mandatory=self._durable)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    answer = await waiter
            finally:
                self._waiting.pop(correlation_id, None)
            if answer != amqp_echo.ANSWER_BODY:
                raise BadAnswer("wrong content")

        return call


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def percentile_ms(sorted_s: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile, in milliseconds."""
    seconds = nearest_rank(sorted_s, q)
    return None if seconds is None else seconds * 1000


@dataclass
class CaseResult:
    target: str
    concurrency: int
    requests: int
    ok: int
    errors: dict[str, int]
    warmup_errors: dict[str, int]
    stopped_early: bool
    wall_s: float
    rps: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    max_ms: float | None
    cpu_ms_per_request: dict[str, float] = field(default_factory=dict)  # by process
    other_cpu_cores: float | None = None  # cores busy with unrelated processes meanwhile (noise)
    added_p50_ms: float | None = None  # vs. direct at the same concurrency
    added_p99_ms: float | None = None

    @classmethod
    def from_run(
        cls,
        target: str,
        concurrency: int,
        requests: int,
        run: LoadRun,
        warmup: LoadRun,
        cpu_s: dict[str, float] | None = None,
    ) -> CaseResult:
        ordered = sorted(run.latencies_s)
        cpu_s = dict(cpu_s or {})
        other_s = cpu_s.pop(OTHER, None)
        per_request = (
            {name: round(1000 * seconds / len(ordered), 3) for name, seconds in cpu_s.items()} if ordered else {}
        )
        return cls(
            target=target,
            concurrency=concurrency,
            requests=requests,
            ok=len(ordered),
            errors=dict(run.errors),
            warmup_errors=dict(warmup.errors),
            stopped_early=run.stopped_early,
            wall_s=round(run.wall_s, 3),
            rps=round(len(ordered) / run.wall_s, 1) if run.wall_s > 0 else 0.0,
            p50_ms=percentile_ms(ordered, 50),
            p90_ms=percentile_ms(ordered, 90),
            p99_ms=percentile_ms(ordered, 99),
            mean_ms=statistics.fmean(ordered) * 1000 if ordered else None,
            max_ms=ordered[-1] * 1000 if ordered else None,
            cpu_ms_per_request=per_request,
            other_cpu_cores=round(other_s / run.wall_s, 2) if other_s is not None and run.wall_s > 0 else None,
        )


@dataclass
class StreamResult:
    target: str
    repeats: int
    tokens: int
    ok: int
    errors: dict[str, int]
    ttft_ms: float | None  # medians over the repeats
    total_ms: float | None
    tokens_per_s: float | None
    events: int | None  # SSE data events carrying content (last repeat)


@dataclass
class ProfileResult:
    process: str
    speedscope_file: str
    seconds: float
    rate_hz: int
    samples: int  # samples with the process on CPU (py-spy drops idle ones)
    busy_fraction: float  # on-CPU time / wall time: the process's share of one core
    top_self: list[tuple[str, float]]  # (function, % of samples) where the sample was taken
    top_total: list[tuple[str, float]]  # (function, % of samples) anywhere on the stack
    top_hotq: list[tuple[str, float]]  # the same, for hotq's own functions only
    by_component: list[tuple[str, float]]  # self time grouped by library / hotq package
    load: CaseResult | None = None


@dataclass
class Report(BenchReport):
    cases: list[CaseResult] = field(default_factory=list)
    streams: list[StreamResult] = field(default_factory=list)
    profiles: list[ProfileResult] = field(default_factory=list)


# ---------------------------------------------------------------------------
# Measuring one target
# ---------------------------------------------------------------------------


async def bench_call(target: str, concurrency: int, settings: Settings, call: Call, cpu: CpuMeter) -> CaseResult:
    requests = settings.requests[concurrency]
    warmup = await run_load(call, settings.warmup[concurrency], concurrency)
    before = cpu.read()
    run = await run_load(call, requests, concurrency)
    used = cpu.read().since(before)
    result = CaseResult.from_run(target, concurrency, requests, run, warmup, used)
    print(
        f"  {target:<22} c={concurrency:<3} {result.rps:>8.1f} req/s  p50 {fmt(result.p50_ms)} ms  "
        f"p99 {fmt(result.p99_ms)} ms  errors {sum(result.errors.values())}",
        flush=True,
    )
    return result


async def bench_http(
    target: str, base_url: str, model: str, settings: Settings, cpu: CpuMeter, headers: dict[str, str] | None = None
) -> list[CaseResult]:
    """Non-streaming chat completions against `base_url` (which ends in /v1) at each concurrency."""
    body = chat_body(model, PROMPT, MAX_TOKENS)
    expected = expected_content(PROMPT, MAX_TOKENS)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    results = []
    for concurrency in CONCURRENCIES:
        async with http_session(concurrency, REQUEST_TIMEOUT_S) as session:
            call = http_chat_call(session, base_url + "/chat/completions", body, expected, all_headers)
            results.append(await bench_call(target, concurrency, settings, call, cpu))
    return results


async def bench_stream(
    target: str, base_url: str, model: str, repeats: int, headers: dict[str, str] | None = None
) -> StreamResult:
    """One long, fast stream at a time: time to first token, total time, tokens/s."""
    text = " ".join(f"w{i}" for i in range(STREAM_PROMPT_WORDS))
    tokens, _ = expected_chat_tokens(text, STREAM_MAX_TOKENS)
    expected = "".join(tokens)
    body = chat_body(model, text, STREAM_MAX_TOKENS, stream=True)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    ttfts, totals = [], []
    errors: Counter[str] = Counter()
    events = None
    async with http_session(1, REQUEST_TIMEOUT_S) as session:
        for attempt in range(repeats + 1):  # the first one warms up
            try:
                ttft, total, content, events = await _one_stream(
                    session, base_url + "/chat/completions", body, all_headers
                )
                if content != expected:
                    raise BadAnswer("wrong content")
            except Exception as exc:  # noqa: BLE001
                errors[error_kind(exc)] += 1
                continue
            if attempt > 0:
                ttfts.append(ttft)
                totals.append(total)
    total_ms = statistics.median(totals) * 1000 if totals else None
    result = StreamResult(
        target=target,
        repeats=repeats,
        tokens=len(tokens),
        ok=len(totals),
        errors=dict(errors),
        ttft_ms=statistics.median(ttfts) * 1000 if ttfts else None,
        total_ms=total_ms,
        tokens_per_s=round(len(tokens) / (total_ms / 1000), 1) if total_ms else None,
        events=events,
    )
    print(
        f"  stream {target:<15} ttft {fmt(result.ttft_ms)} ms  total {fmt(result.total_ms)} ms  "
        f"{result.tokens_per_s} tok/s  errors {sum(errors.values())}",
        flush=True,
    )
    return result


async def _one_stream(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[float, float, str, int]:
    started = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    events = 0
    async with session.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise BadAnswer(f"HTTP {response.status}")
        async for data in sse_data(response):
            choices = data.get("choices") or [{}]
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                if first is None:
                    first = time.perf_counter()
                parts.append(content)
                events += 1
    finished = time.perf_counter()
    if first is None:
        raise BadAnswer("no content")
    return first - started, finished - started, "".join(parts), events


async def bench_amqp(
    mode: str, settings: Settings, processes: Processes, cpu: CpuMeter, queues: list[str]
) -> list[CaseResult]:
    """The bare aio-pika request/reply round trip to a separate echo process."""
    queue = f"bench.core-path.rpc.{mode}.{uuid.uuid4().hex[:8]}"
    queues.append(queue)
    name = f"amqp-echo-{mode}"
    process = processes.start(
        name,
        [sys.executable, "-m", "bench.amqp_echo", "--url", settings.amqp_url, "--queue", queue, "--mode", mode],
        env=child_env(),
    )
    try:
        await wait_for_line(processes.log_path(name), amqp_echo.READY_LINE, process, STARTUP_TIMEOUT_S)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            client = await AmqpRpcClient.open(connection, queue, mode)
            call = client.call_with(chat_body("bench-model", PROMPT, MAX_TOKENS))
            cpu = cpu.plus({"amqp-echo": process.pid})
            return [await bench_call(f"amqp-rpc ({mode})", c, settings, call, cpu) for c in CONCURRENCIES]
    finally:
        processes.stop(name)


# ---------------------------------------------------------------------------
# hotq and LiteLLM as subprocesses
# ---------------------------------------------------------------------------


async def start_hotq(
    processes: Processes, workdir: Path, amqp_url: str, model: str, backend_url: str
) -> tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    config = write_config(
        workdir / "hotq.toml", amqp_url, {model: {"backend_url": backend_url, "max_inflight": HOTQ_MAX_INFLIGHT}}
    )
    url, api = await start_api(processes, config)
    worker = await start_worker(processes, config, model)
    return url, api, worker


def ensure_litellm_venv(venv: Path) -> Path:
    """The `litellm` executable of `venv`, creating the venv and installing litellm[proxy] if needed."""
    executable = venv / "bin" / "litellm"
    if executable.exists():
        return executable
    print(f"  creating {venv} and installing litellm[proxy] (once; takes a minute or two)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"], check=True)
    return executable


def litellm_version(venv: Path) -> str | None:
    try:
        found = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


async def start_litellm(
    processes: Processes, workdir: Path, venv: Path, model: str, backend_url: str
) -> tuple[str, subprocess.Popen[bytes]]:
    executable = ensure_litellm_venv(venv)
    config = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {"model": f"openai/{model}", "api_base": backend_url + "/v1", "api_key": "dummy"},
            }
        ],
        "general_settings": {"master_key": LITELLM_MASTER_KEY},
    }
    config_path = workdir / "litellm.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML
    port = free_port()
    env = child_env(
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the model cost map at start-up
        LITELLM_LOG="WARNING",  # also turns off uvicorn's per-request access log, like hotq's
    )
    env.pop("DATABASE_URL", None)
    process = processes.start(
        "litellm",
        [
            str(executable),
            "--config",
            str(config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env=env,
        cwd=workdir,  # keeps it from reading a .env in the repository
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(url + "/health/liveliness", process, LITELLM_STARTUP_TIMEOUT_S)
    return url + "/v1", process


# ---------------------------------------------------------------------------
# Profiling with py-spy
# ---------------------------------------------------------------------------

PROFILE_RATE_HZ: Final = 100
HOTQ_PACKAGES: Final = ("api", "broker", "consumers", "producers", "ops")
COMPONENTS: Final = (
    # (component, path fragment); the first match wins
    ("aio_pika", "/aio_pika/"),
    ("aiormq", "/aiormq/"),
    ("pamqp", "/pamqp/"),
    ("starlette", "/starlette/"),
    ("uvicorn", "/uvicorn/"),
    ("aiohttp", "/aiohttp/"),
    ("yarl/multidict", "/yarl/"),
    ("yarl/multidict", "/multidict/"),
    ("structlog", "/structlog/"),
    ("msgspec", "/msgspec/"),
    ("msgpack", "/msgpack/"),
    ("asyncio", "/asyncio/"),
)


def _component(file: str) -> str:
    for package in HOTQ_PACKAGES:
        if file.startswith(str(ROOT / package) + os.sep) or file.startswith(package + "/"):
            return f"hotq {package}/"
    for component, fragment in COMPONENTS:
        if fragment in file:
            return component
    if "site-packages" in file:
        return "other libraries"
    return "stdlib/other"


def _frame_label(frame: dict[str, Any]) -> str:
    """``function (path)``, the path cut down to what follows site-packages, the repo or the stdlib."""
    file = str(frame.get("file") or "?")
    for marker in ("site-packages/", str(ROOT) + "/"):
        if marker in file:
            return f"{frame.get('name', '?')} ({file.split(marker, 1)[1]})"
    if "/lib/python3." in file:
        return f"{frame.get('name', '?')} ({file.split('/lib/python3.', 1)[1].split('/', 1)[-1]})"
    return f"{frame.get('name', '?')} ({file})"


def _labelled(frame: dict[str, Any]) -> tuple[str, bool]:
    """The frame's label and whether it is hotq's own code."""
    return _frame_label(frame), _component(str(frame.get("file") or "")).startswith("hotq ")


def _self_component(frame: dict[str, Any]) -> str:
    if frame.get("name") == "Runner.run" and str(frame.get("file", "")).endswith("asyncio/runners.py"):
        # The bottom Python frame under uvloop: its self time is C code (the uvloop loop,
        # socket I/O, httptools parsing) running between Python callbacks.
        return "event loop C code (uvloop, sockets, httptools)"
    return _component(str(frame.get("file") or ""))


@dataclass
class ProfileSummary:
    samples: int
    on_cpu_s: float
    top_self: list[tuple[str, float]]
    top_total: list[tuple[str, float]]
    top_hotq: list[tuple[str, float]]
    by_component: list[tuple[str, float]]


def summarise_speedscope(path: Path, top: int = 20) -> ProfileSummary:
    """Where a py-spy speedscope profile's samples fall: by function (self and inclusive) and by component.

    Percentages are of the on-CPU samples (py-spy leaves out idle ones). Inclusive lists
    skip the frames on (nearly) every stack: the process's entry point.
    """
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    hotq_counts: Counter[str] = Counter()
    components: Counter[str] = Counter()
    samples = 0
    weight_sum = 0.0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"]):
            if not stack:
                continue
            samples += 1
            weight_sum += weight
            leaf = frames[stack[-1]]
            self_counts[_frame_label(leaf)] += 1
            components[_self_component(leaf)] += 1
            for label, is_hotq in {_labelled(frames[index]) for index in stack}:
                total_counts[label] += 1
                if is_hotq:
                    hotq_counts[label] += 1
    if samples == 0:
        return ProfileSummary(0, 0.0, [], [], [], [])

    def pct(count: int) -> float:
        return round(100 * count / samples, 1)

    inclusive = [(label, pct(count)) for label, count in total_counts.most_common() if count < 0.99 * samples]
    return ProfileSummary(
        samples=samples,
        on_cpu_s=round(weight_sum, 2),
        top_self=[(label, pct(count)) for label, count in self_counts.most_common(top)],
        top_total=inclusive[:top],
        top_hotq=[(label, pct(count)) for label, count in hotq_counts.most_common() if count < 0.99 * samples][:top],
        by_component=[(label, pct(count)) for label, count in components.most_common()],
    )


def py_spy_executable() -> Path | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return candidate if candidate.exists() else None


async def profile_hotq(
    processes: Processes, settings: Settings, base_url: str, model: str, targets: dict[str, int], out_dir: Path
) -> list[ProfileResult]:
    """Sample the given processes with py-spy while a c=50 load runs against hotq."""
    py_spy = py_spy_executable()
    assert settings.profile_s is not None
    if py_spy is None:
        print("  py-spy not found next to this Python: skipping the profile (pip install py-spy)", flush=True)
        return []
    seconds = settings.profile_s
    concurrency = max(CONCURRENCIES)
    body = chat_body(model, PROMPT, MAX_TOKENS)
    expected = expected_content(PROMPT, MAX_TOKENS)
    async with http_session(concurrency, REQUEST_TIMEOUT_S) as session:
        call = http_chat_call(
            session, base_url + "/chat/completions", body, expected, {"Content-Type": "application/json"}
        )
        warmup = await run_load(call, settings.warmup[concurrency], concurrency)
        # Bounded by time: the load outlasts the sampling a little on both ends.
        load = asyncio.create_task(run_load(call, 1_000_000, concurrency, time_limit_s=seconds + 2.0))
        await asyncio.sleep(0.5)
        outputs = {}
        for name, pid in targets.items():
            outputs[name] = out_dir / f"{name}.speedscope.json"
            processes.start(
                f"py-spy-{name}",
                [
                    str(py_spy),
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(PROFILE_RATE_HZ),
                    "--duration",
                    str(int(seconds)),
                    "--format",
                    "speedscope",
                    "--output",
                    str(outputs[name]),
                ],
            )
        run = await load
        for name in targets:
            await processes.wait(f"py-spy-{name}", timeout=seconds + 30)
    attempted = len(run.latencies_s) + sum(run.errors.values())
    case = CaseResult.from_run("hotq (under py-spy)", concurrency, attempted, run, warmup)
    results = []
    for name, path in outputs.items():
        if not path.exists():
            print(f"  py-spy wrote no profile for {name}:\n{processes.log_tail(f'py-spy-{name}')}", flush=True)
            continue
        summary = summarise_speedscope(path)
        results.append(
            ProfileResult(
                process=name,
                speedscope_file=str(path.relative_to(ROOT)),
                seconds=seconds,
                rate_hz=PROFILE_RATE_HZ,
                samples=summary.samples,
                busy_fraction=round(summary.on_cpu_s / seconds, 3),
                top_self=summary.top_self,
                top_total=summary.top_total,
                top_hotq=summary.top_hotq,
                by_component=summary.by_component,
                load=case,
            )
        )
    return results


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


async def run(settings: Settings, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"bench-core-{uuid.uuid4().hex[:8]}"  # unique: this run's queues are its own
    rpc_queues: list[str] = []
    report.settings["model"] = model
    try:
        print("fake backend", flush=True)
        backend_url, backend = await start_fake_backend(processes, model)
        cpu = CpuMeter.of({"backend": backend.pid})

        print("(a) direct", flush=True)
        report.cases += await bench_http("direct", backend_url + "/v1", model, settings, cpu)
        report.streams.append(await bench_stream("direct", backend_url + "/v1", model, settings.stream_repeats))

        print("(d) bare aio-pika request/reply", flush=True)
        for mode in amqp_echo.MODES:
            report.cases += await bench_amqp(mode, settings, processes, cpu, rpc_queues)

        print("(b) hotq", flush=True)
        hotq_url, api, worker = await start_hotq(processes, workdir, settings.amqp_url, model, backend_url)
        hotq_cpu = cpu.plus({"hotq-api": api.pid, "hotq-worker": worker.pid})
        report.cases += await bench_http("hotq", hotq_url, model, settings, hotq_cpu)
        report.streams.append(await bench_stream("hotq", hotq_url, model, settings.stream_repeats))
        if settings.profile_s is not None:
            print(
                f"profiling the hotq API and worker for {settings.profile_s:g} s at c={max(CONCURRENCIES)}", flush=True
            )
            out_dir = RESULTS_DIR / f"profile-{report.started_at}"
            out_dir.mkdir(parents=True, exist_ok=True)
            report.profiles += await profile_hotq(
                processes, settings, hotq_url, model, {"hotq-api": api.pid, "hotq-worker": worker.pid}, out_dir
            )
        check_logs(processes.log_paths(["hotq-api", "hotq-worker"]), report.notes)
        processes.stop("hotq-worker")
        processes.stop("hotq-api")

        if settings.litellm_venv is not None:
            print("(c) LiteLLM proxy", flush=True)
            report.environment["litellm"] = None
            litellm_url, litellm = await start_litellm(processes, workdir, settings.litellm_venv, model, backend_url)
            report.environment["litellm"] = litellm_version(settings.litellm_venv)
            auth = {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"}
            report.cases += await bench_http(
                "litellm", litellm_url, model, settings, cpu.plus({"litellm": litellm.pid}), auth
            )
            report.streams.append(await bench_stream("litellm", litellm_url, model, settings.stream_repeats, auth))
            check_logs(processes.log_paths(["litellm"]), report.notes)
            processes.stop("litellm")
        check_logs(processes.log_paths(["fake-backend"]), report.notes)
    finally:
        await delete_queues(settings.amqp_url, [*request_queues(model), *rpc_queues])
    add_overheads(report.cases)
    note_failures(report)


def note_failures(report: Report) -> None:
    for c in report.cases:
        if c.errors or c.warmup_errors or c.stopped_early:
            report.notes.append(
                f"{c.target} c={c.concurrency}: errors {c.errors}, warm-up errors {c.warmup_errors}"
                + (", stopped at the time limit" if c.stopped_early else "")
            )
    for s in report.streams:
        if s.errors:
            report.notes.append(f"stream {s.target}: errors {s.errors}")


def add_overheads(cases: list[CaseResult]) -> None:
    direct = {case.concurrency: case for case in cases if case.target == "direct"}
    for case in cases:
        base = direct.get(case.concurrency)
        if case.target == "direct" or base is None:
            continue
        if case.p50_ms is not None and base.p50_ms is not None:
            case.added_p50_ms = case.p50_ms - base.p50_ms
        if case.p99_ms is not None and base.p99_ms is not None:
            case.added_p99_ms = case.p99_ms - base.p99_ms


def print_report(report: Report, json_path: Path) -> None:
    order = {"direct": 0, "hotq": 1, "litellm": 2}
    cases = sorted(report.cases, key=lambda c: (c.concurrency, order.get(c.target, 3), c.target))
    print()
    print("Non-streaming chat completions (latency in ms; 'added' = minus direct at the same concurrency)")
    header = (
        f"{'target':<24}{'conc':>5}{'ok/n':>11}{'err':>5}{'req/s':>9}"
        f"{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'added p50':>11}{'added p99':>11}"
    )
    print_header(header)
    for c in cases:
        print(
            f"{c.target:<24}{c.concurrency:>5}{f'{c.ok}/{c.requests}':>11}{sum(c.errors.values()):>5}{c.rps:>9.1f}"
            f"{fmt(c.p50_ms):>8}{fmt(c.p90_ms):>8}{fmt(c.p99_ms):>8}{fmt(c.max_ms):>8}"
            f"{fmt(c.added_p50_ms):>11}{fmt(c.added_p99_ms):>11}"
        )
    print()
    print("CPU time per request (ms; user + system) by process")
    header = (
        f"{'target':<24}{'conc':>5}"
        + "".join(f"{name:>12}" for name in CPU_COLUMNS)
        + f"{'total':>9}{'other cores':>13}"
    )
    print_header(header)
    for c in cases:
        used = c.cpu_ms_per_request
        print(
            f"{c.target:<24}{c.concurrency:>5}"
            + "".join(f"{fmt(used.get(name)):>12}" for name in CPU_COLUMNS)
            + f"{fmt(sum(used.values()) if used else None):>9}{fmt(c.other_cpu_cores):>13}"
        )
    if report.streams:
        print()
        print(f"One stream ({STREAM_MAX_TOKENS} tokens, no delay; median of {report.streams[0].repeats})")
        header = f"{'target':<24}{'ok':>4}{'ttft ms':>10}{'total ms':>10}{'tokens/s':>11}{'events':>8}"
        print_header(header)
        for s in report.streams:
            print(
                f"{s.target:<24}{s.ok:>4}{fmt(s.ttft_ms):>10}{fmt(s.total_ms):>10}"
                f"{fmt(s.tokens_per_s, 0):>11}{s.events or '-':>8}"
            )
    for p in report.profiles:
        print()
        load = f"{p.load.rps:.0f} req/s, p50 {fmt(p.load.p50_ms)} ms" if p.load else "?"
        print(
            f"py-spy {p.process}: {p.samples} on-CPU samples in {p.seconds:g} s at {p.rate_hz} Hz "
            f"(busy ~{p.busy_fraction:.0%}) under c={max(CONCURRENCIES)} load ({load}); {p.speedscope_file}"
        )
        print("  self time by component: " + ", ".join(f"{name} {pct}%" for name, pct in p.by_component[:10]))
        print("  top self:")
        for label, pct in p.top_self[:12]:
            print(f"    {pct:5.1f}%  {label}")
        print("  top inclusive:")
        for label, pct in p.top_total[:15]:
            print(f"    {pct:5.1f}%  {label}")
        print("  hotq's own functions, inclusive:")
        for label, pct in p.top_hotq[:12]:
            print(f"    {pct:5.1f}%  {label}")
    if report.notes:
        print()
    print_notes(report.notes, json_path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.core_path", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=None, help="measured requests at c=50 (c=1 gets a quarter) [2000]"
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and repeats (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="also profile the hotq API and worker with py-spy")
    parser.add_argument("--profile-seconds", type=float, default=None, help="how long to sample [20, 5 with --quick]")
    parser.add_argument("--skip-litellm", action="store_true", help="leave out the LiteLLM proxy")
    parser.add_argument(
        "--litellm-venv", default=str(DEFAULT_LITELLM_VENV), help="venv with litellm[proxy] (created if missing)"
    )
    add_shared_options(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(parse_args(argv))
    report = Report(settings=_settings_json(settings))
    return run_bench(run, settings, report, "core_path", print_report, unreadable="(no log)")


def _settings_json(settings: Settings) -> dict[str, Any]:
    values = asdict(settings)
    values["litellm_venv"] = str(settings.litellm_venv) if settings.litellm_venv else None
    values.update(
        concurrencies=list(CONCURRENCIES),
        prompt=PROMPT,
        max_tokens=MAX_TOKENS,
        stream_prompt_words=STREAM_PROMPT_WORDS,
        stream_max_tokens=STREAM_MAX_TOKENS,
        hotq_max_inflight=HOTQ_MAX_INFLIGHT,
        request_timeout_s=REQUEST_TIMEOUT_S,
    )
    return values


if __name__ == "__main__":
    sys.exit(main())

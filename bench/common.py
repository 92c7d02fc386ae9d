"""Helpers the benchmarks share: subprocesses, waiting, requests, CPU from /proc, the JSON report.

Every benchmark in ``bench/`` starts its stack (RabbitMQ is already running; the API, workers,
agents and backends are subprocesses in their own process groups), measures, stops everything and
writes one JSON file to ``bench/results``. What they all need for that lives here.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final, TypeVar

import aio_pika
import aiohttp
import uvloop

from broker import topology
from broker.messages import Lane
from ops.processes import Child, Children, free_port, wait_until_async

if TYPE_CHECKING:
    import openai
    from openai.types import Batch

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = ROOT / "bench" / "results"
DEFAULT_AMQP_URL: Final = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
HOTQ_CLI: Final = (sys.executable, "-m", "ops.cli")  # `hotq`, run by this Python from the work tree
STOP_TIMEOUT_S: Final = 15.0
STARTUP_TIMEOUT_S: Final = 60.0  # a process that is not ready by then fails the run
LOG_POLL_S: Final = 0.02  # how often a log is read for the line a benchmark waits for


# ---------------------------------------------------------------------------
# Subprocesses: each in its own process group, all killed on the way out
# ---------------------------------------------------------------------------


class Processes(Children):
    """The benchmark's children (`ops.processes`): run from the repository, stopped after STOP_TIMEOUT_S."""

    def __init__(self, log_dir: Path) -> None:
        super().__init__(log_dir, STOP_TIMEOUT_S)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = ROOT,
        own_log: bool = True,
        pass_fds: Sequence[int] = (),
    ) -> Child:
        return super().start(name, argv, env=env, cwd=cwd, own_log=own_log, pass_fds=pass_fds)

    async def wait(self, name: str, timeout: float) -> None:
        """Wait for a process that ends by itself, then make sure its group is gone."""
        child = self[name]
        try:
            await wait_until_async(lambda: child.poll() is not None, timeout, f"{name} to end")
        except TimeoutError:
            pass  # stopped below
        self.stop(name)

    def log_paths(self, names: Iterable[str]) -> dict[str, Path]:
        return {name: self.log_path(name) for name in names}

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


async def wait_http_ok(url: str, process: Child, timeout: float) -> None:
    """Poll `url` until it answers 200; fail if `process` exits first or `timeout` passes."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:

        async def answers_200() -> bool:
            try:
                async with session.get(url) as response:
                    return response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await wait_until_async(answers_200, timeout, f"200 from {url}", process, poll_s=0.1)


async def wait_for_line(path: Path, needle: str, process: Child, timeout: float) -> None:
    """Wait until the log at `path` contains `needle`; fail if `process` exits first or `timeout` passes."""
    await wait_until_async(
        lambda: needle in path.read_text(errors="replace"), timeout, f"{needle!r} in {path}", process
    )


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a subprocess: no proxy for localhost, the repository importable, plus `extra`."""
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


async def start_fake_backend(processes: Processes, model: str) -> tuple[str, Child]:
    """The deterministic fake backend (`ops.testing.fake_backend`) as "fake-backend", once healthy: its URL and
    process."""
    port = free_port()
    backend = processes.start(
        "fake-backend",
        [sys.executable, "-m", "ops.testing.fake_backend", "--port", str(port), "--model", model],
        env=child_env(),
    )
    url = f"http://127.0.0.1:{port}"
    await wait_http_ok(url + "/health", backend, STARTUP_TIMEOUT_S)
    return url, backend


async def start_api(processes: Processes, config: Path) -> tuple[str, Child]:
    """`hotq serve` as "hotq-api" on a free port, once it lists its models: its URL (ending in /v1) and process."""
    port = free_port()
    api = processes.start(
        "hotq-api", [*HOTQ_CLI, "serve", "--config", str(config), "--port", str(port)], env=child_env()
    )
    url = f"http://127.0.0.1:{port}/v1"
    await wait_http_ok(url + "/models", api, STARTUP_TIMEOUT_S)
    return url, api


async def start_worker(processes: Processes, config: Path, model: str) -> Child:
    """`hotq worker` for `model` as "hotq-worker", once it consumes."""
    worker = processes.start(
        "hotq-worker", [*HOTQ_CLI, "worker", "--config", str(config), "--model", model], env=child_env()
    )
    await wait_for_line(processes.log_path("hotq-worker"), "worker_started", worker, STARTUP_TIMEOUT_S)
    return worker


@dataclass(frozen=True)
class Submitted:
    wall_s: float  # process start -> exit
    stored_s: float | None  # process start -> its "job <id>: N requests" line (the job is stored)

    @property
    def after_stored_s(self) -> float | None:
        """The job stored -> exit: the part after starting Python, validating and storing the file."""
        return None if self.stored_s is None else self.wall_s - self.stored_s


async def run_hotq_submit(
    processes: Processes,
    name: str,
    jsonl: Path,
    config: Path,
    model: str,
    job_id: str,
    options: Sequence[str],
    timeout_s: float,
) -> Submitted:
    """`hotq submit JSONL --model M OPTIONS` as job `job_id`, a subprocess timed from its start to its exit."""
    argv = [*HOTQ_CLI, "submit", str(jsonl), "--config", str(config), "--model", model, *options, "--job-id", job_id]
    log_path = processes.log_path(name)
    started = time.perf_counter()
    process = processes.start(name, argv, env=child_env())
    stored_s: float | None = None
    while process.poll() is None:
        if stored_s is None and f"job {job_id}:" in log_path.read_text(errors="replace"):
            stored_s = time.perf_counter() - started
        if time.perf_counter() - started > timeout_s:
            processes.stop(name)
            raise TimeoutError(f"{name} did not finish within {timeout_s:g} s")
        await asyncio.sleep(LOG_POLL_S)
    wall = time.perf_counter() - started
    if stored_s is None and f"job {job_id}:" in log_path.read_text(errors="replace"):
        stored_s = wall  # (logged in the last poll interval)
    processes.stop(name)  # reaps it (and anything it left in its group)
    if process.returncode != 0:
        raise RuntimeError(f"{name} exited with {process.returncode}:\n{processes.log_tail(name)}")
    return Submitted(wall, stored_s)


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's children that have exited and been reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def request_queues(*models: str) -> list[str]:
    """The request queues (every lane) of these models."""
    return [topology.request_queue_name(model, lane) for model in models for lane in Lane]


async def delete_queues(amqp_url: str, names: Sequence[str]) -> None:
    """Delete these queues if they exist; a failure is printed, not raised: cleanup must not hide the real error."""
    try:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            for name in names:
                channel = await connection.channel()  # a failed delete closes its channel
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.AMQPError:
                    pass
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the real error
        print(f"could not delete the queues {list(names)}: {exc!r}", file=sys.stderr)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


class BadAnswer(Exception):
    """An answer that is not the expected one: an HTTP error, a malformed body, the wrong content."""


def error_kind(exc: BaseException) -> str:
    """How a failed request is counted: a bad answer by what was wrong, anything else by its type."""
    return str(exc)[:120] if isinstance(exc, BadAnswer) else type(exc).__name__


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each ``data:`` event of a server-sent event stream, as it arrives."""
    buffer = bytearray()
    async for piece in response.content.iter_any():
        buffer += piece
        while (end := buffer.find(b"\n\n")) >= 0:
            event = bytes(buffer[:end])
            del buffer[: end + 2]
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue  # keep-alive comments, the end marker
            yield json.loads(event[6:])


@dataclass(frozen=True)
class PolledBatch:
    batch: Batch  # completed
    first_result_s: float | None  # since the start: the first poll that counted a finished line ...
    all_results_s: float | None  # ... and the first that counted them all (the batch may still be finalizing)
    polls: int


@dataclass(frozen=True)
class BatchPolling:
    """How a batch is watched: every `slow_s` while less than `fast_from` of its lines are done (polling
    costs CPU the work would otherwise use), then every `fast_s` (the end must be seen promptly)."""

    slow_s: float
    fast_s: float
    fast_from: float

    def settings(self) -> dict[str, float]:
        return {"slow": self.slow_s, "fast": self.fast_s, "fast_from_done": self.fast_from}

    async def until_completed(
        self, client: openai.AsyncOpenAI, batch: Batch, started: float, timeout_s: float
    ) -> PolledBatch:
        """Retrieve `batch` until it is completed; fail if it ends otherwise or is still running `timeout_s`
        after `started` (a `time.perf_counter()`)."""
        first_result_s: float | None = None
        all_results_s: float | None = None
        polls = 0
        while batch.status != "completed":
            if batch.status not in ("validating", "in_progress", "finalizing"):
                raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch}")
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"batch {batch.id} still {batch.status} after {timeout_s:g} s: {batch}")
            counts = batch.request_counts
            done = 0 if counts is None else counts.completed + counts.failed
            nearly = counts is not None and done >= self.fast_from * counts.total
            await asyncio.sleep(self.fast_s if nearly else self.slow_s)
            batch = await client.batches.retrieve(batch.id)
            polls += 1
            now = time.perf_counter() - started
            counts = batch.request_counts
            done = 0 if counts is None else counts.completed + counts.failed
            if first_result_s is None and done > 0:
                first_result_s = now
            if all_results_s is None and counts is not None and done >= counts.total:
                all_results_s = now
        return PolledBatch(batch, first_result_s, all_results_s, polls)


async def batch_records(client: openai.AsyncOpenAI, batch: Batch) -> list[dict[str, Any]]:
    """The lines of a finished batch's output and error files."""
    records: list[dict[str, Any]] = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            text = (await client.files.content(file_id)).text
            records += [json.loads(line) for line in text.splitlines() if line]
    return records


# ---------------------------------------------------------------------------
# CPU accounting from /proc
# ---------------------------------------------------------------------------

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
OTHER: Final = "other"  # every process not measured: noise from whatever else runs on the machine


@dataclass(frozen=True)
class CpuMeter:
    """CPU seconds (user + system) used so far by named processes (by pid) or process groups (by pgid)."""

    pids: dict[str, int]
    groups: dict[str, int]

    @classmethod
    def of(cls, groups: dict[str, int], load_gen: str = "load-gen") -> CpuMeter:
        """This process (named `load_gen`), a local RabbitMQ if there is one, and these process groups."""
        pids = {load_gen: os.getpid()}
        if (broker := find_process("beam.smp")) is not None:
            pids["rabbitmq"] = broker  # a local RabbitMQ: its CPU counts too (all its traffic)
        return cls(pids, groups)

    def plus(self, groups: dict[str, int]) -> CpuMeter:
        return CpuMeter(self.pids, {**self.groups, **groups})

    def read(self) -> CpuReading:
        totals = dict.fromkeys([*self.pids, *self.groups], 0.0)
        others: dict[int, float] = {}
        names_by_pid = {pid: name for name, pid in self.pids.items()}
        names_by_group = {pgid: name for name, pgid in self.groups.items()}
        for pid, pgrp, cpu_s in all_processes():
            name = names_by_pid.get(pid) or names_by_group.get(pgrp)
            if name is not None:
                totals[name] += cpu_s
            else:
                others[pid] = cpu_s
        return CpuReading(totals, others)


@dataclass(frozen=True)
class CpuReading:
    """One reading of a `CpuMeter`: CPU seconds so far, by name and of every other process."""

    by_name: dict[str, float]  # CPU seconds so far of the measured processes
    others: dict[int, float]  # ... and of every other process, by pid

    def since(self, before: CpuReading) -> dict[str, float]:
        """CPU seconds used since `before`, by name and (under `OTHER`) by all other processes.

        Other processes are compared pid by pid, so one that exits meanwhile does not make
        the sum negative (its last CPU time is lost, so `OTHER` is a lower bound).
        """
        used = {name: seconds - before.by_name.get(name, 0.0) for name, seconds in self.by_name.items()}
        used[OTHER] = sum(seconds - before.others.get(pid, 0.0) for pid, seconds in self.others.items())
        return used


def all_processes() -> list[tuple[int, int, float]]:
    """(pid, process group, CPU seconds) of every process, from /proc."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ... utime stime
        found.append((int(entry.name), int(fields[2]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS))
    return found


def find_process(command: str) -> int | None:
    """The pid of a process whose command name (/proc/PID/comm) is `command`, if any."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().strip() == command:
                    return int(entry.name)
            except OSError:
                continue
    return None


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat), short-lived processes included."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()  # "cpu user nice system idle iowait irq softirq steal ..."
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


# ---------------------------------------------------------------------------
# Other heavy work on the machine
# ---------------------------------------------------------------------------


def _is_heavy(argv: Sequence[str]) -> bool:
    """A vLLM server, or a pytest run (not merely a command that mentions pytest, like pip installing it)."""
    if any("vllm.entrypoints" in arg for arg in argv):
        return True
    names = [Path(arg).name for arg in argv[:2]]  # `pytest ...` or `python /venv/bin/pytest ...`
    if any(name in ("pytest", "py.test") for name in names):
        return True
    return any(argv[i] == "-m" and argv[i + 1] == "pytest" for i in range(len(argv) - 1))


def foreign_heavy_processes(own_groups: set[int]) -> list[str]:
    """Command lines of vLLM servers and pytest runs that are not ours (ours: by process group)."""
    found = []
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().decode(errors="replace").split("\0")
            pgrp = int(Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, ValueError, IndexError):
            continue
        if pgrp in own_groups or not _is_heavy([arg for arg in argv if arg]):
            continue
        found.append(f"{entry.name} {' '.join(argv)[:160]}")
    return found


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Python, platform, CPUs, load, git commit and uncommitted changes, package versions."""
    versions: dict[str, str | None] = {}
    for package in (
        "aio-pika",
        "aiormq",
        "aiohttp",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "msgpack",
        "msgspec",
        "structlog",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except OSError:
        commit, status = "", ""
    changed = [line[3:] for line in status.splitlines() if not line[3:].startswith("bench/")]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "git_commit": commit,
        "uncommitted_changes": changed,  # the code measured is the work tree, not the commit
        "versions": versions,
    }


@dataclass
class BenchReport:
    """What every benchmark's JSON starts with; each benchmark's report adds its results."""

    started_at: str = field(default_factory=lambda: time.strftime("%Y%m%d-%H%M%S"))
    settings: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=environment)
    notes: list[str] = field(default_factory=list)  # what a reader must know about how it was measured


def keep_logs(report: BenchReport, name: str, logs: Iterable[Path]) -> Path:
    """Copy the logs that exist to ``bench/results/<name>-<started_at>-logs``: the work dir goes with the run."""
    kept = RESULTS_DIR / f"{name}-{report.started_at}-logs"
    kept.mkdir(parents=True, exist_ok=True)
    for path in logs:
        if path.exists():
            shutil.copy(path, kept / path.name)
    return kept


BAD_LOG_WORDS: Final = ("Traceback", '"level": "error"', "ERROR", '"level": "warning"')


def bad_log_lines(lines: Iterable[str]) -> list[str]:
    """The lines that show an error or a warning (the processes under test should log none)."""
    return [line for line in lines if any(word in line for word in BAD_LOG_WORDS)]


def check_logs(logs: Mapping[str, Path], notes: list[str], lost_connections: bool = False) -> None:
    """Note the error and warning lines in each named log (the processes under test should log none), and
    with `lost_connections` each RabbitMQ connection a process lost (a test suite may force-close them)."""
    for name, path in logs.items():
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad = bad_log_lines(lines)
        if bad:
            notes.append(f"{name} logged {len(bad)} error/warning line(s), first: {bad[0][:300]}")
        if lost_connections and (
            lost := [line for line in lines if "Unexpected connection close" in line or "CONNECTION_FORCED" in line]
        ):
            notes.append(
                f"{name} lost its RabbitMQ connection {len(lost)} time(s) (someone closed it; it reconnected): "
                f"{lost[0][:200]}"
            )


def print_header(header: str) -> None:
    """A table's header line, underlined."""
    print(header)
    print("-" * len(header))


def print_cpu_legend(columns: str, during: str) -> None:
    """What the CPU columns (`columns`, e.g. "bench..backend"), busy and noise of a table mean."""
    print(
        f"  ({columns}: CPU seconds during the {during}; busy: cores the whole machine kept busy;"
        " noise: busy cores not used by the measured processes)"
    )


def print_notes(notes: Sequence[str], json_path: Path) -> None:
    """The closing lines of every printed report: the notes, then where the JSON went."""
    for note in notes:
        print(f"note: {note}")
    print()
    print(f"JSON: {json_path}")


def fmt(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals, or "-" for None (for the printed tables)."""
    return "-" if value is None else f"{value:.{digits}f}"


def round_or_none(value: float | None, digits: int = 3) -> float | None:
    """`value` rounded to `digits`, None stays None (for the JSON)."""
    return None if value is None else round(value, digits)


def nearest_rank(ordered: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (nearest rank) of the sorted values `ordered`; None when there are none."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# ---------------------------------------------------------------------------
# Running a benchmark
# ---------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds like Ctrl-C, so every finally runs


def print_log_tails(logs: Iterable[Path], lines: int = 25, unreadable: str = "(unreadable)") -> None:
    """The last `lines` lines of each log, to stderr, each under a ``--- name`` header."""
    for log in logs:
        try:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            tail = unreadable
        print(f"--- {log.name}\n{tail}", file=sys.stderr)


def add_shared_options(
    parser: argparse.ArgumentParser, *, max_wait_busy: bool = False, keep_logs: str | None = None
) -> None:
    """The options several benchmarks take, after their own: ``--max-wait-busy`` (if it waits for a quiet
    machine), ``--keep-logs`` (if given: its help, which logs), ``--amqp-url``."""
    if max_wait_busy:
        parser.add_argument(
            "--max-wait-busy",
            type=float,
            default=1800.0,
            help="how long to wait for another vLLM or pytest to finish before measuring anyway [1800 s]",
        )
    if keep_logs is not None:
        parser.add_argument("--keep-logs", action="store_true", help=keep_logs)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)


AnySettings = TypeVar("AnySettings")
AnyReport = TypeVar("AnyReport", bound=BenchReport)


def run_bench(
    run: Callable[[AnySettings, Processes, Path, AnyReport], Coroutine[Any, Any, None]],
    settings: AnySettings,
    report: AnyReport,
    name: str,
    print_report: Callable[[AnyReport, Path], None],
    logs: Callable[[Path], Iterable[Path]] = lambda workdir: sorted(workdir.glob("*.log")),
    tail_lines: int = 25,
    unreadable: str = "(unreadable)",
    cleanup: Callable[[Path], None] | None = None,
) -> int:
    """The benchmark `name`: ``run(settings, processes, workdir, report)`` under uvloop in a fresh temporary
    directory, then the report as JSON (``bench/results/<name>-<started_at>.json``) and printed.

    SIGTERM and SIGINT unwind like Ctrl-C. Every process started through ``processes`` is
    stopped on the way out, then ``cleanup(workdir)`` runs (if given), while the directory
    still exists. On a failure the tails of ``logs(workdir)`` go to stderr and the exception
    propagates. Returns 0 when the benchmark completed, 130 when it was interrupted.
    """
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    with tempfile.TemporaryDirectory(prefix=f"hotq-bench-{name}-") as tmp:
        workdir = Path(tmp)
        processes = Processes(workdir)
        try:
            uvloop.run(run(settings, processes, workdir, report))
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        except Exception:
            print("\nfailed; the last lines of each log:", file=sys.stderr)
            print_log_tails(logs(workdir), tail_lines, unreadable)
            raise
        finally:
            processes.stop_all()
            if cleanup is not None:
                cleanup(workdir)
    report.environment["loadavg_at_end"] = os.getloadavg()
    json_path = RESULTS_DIR / f"{name}-{report.started_at}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")  # what JSON lacks: as its str
    print_report(report, json_path)
    return 0


# Below the 5 s after which uvicorn (hotq's API, vLLM) closes an idle connection: a pooled
# connection reused just as the server closes it fails the request (ClientOSError), which
# showed up as lost requests in the first round after a pause.
KEEPALIVE_S: Final = 3.0


def http_session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """The load generator's session: up to `connections` kept-alive connections."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))

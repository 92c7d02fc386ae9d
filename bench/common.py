"""Helpers the benchmarks share: subprocesses, waiting, CPU from /proc, the JSON report.

Every benchmark in ``bench/`` starts its stack (RabbitMQ is already running; the API, workers,
agents and backends are subprocesses in their own process groups), measures, stops everything and
writes one JSON file to ``bench/results``. What they all need for that lives here.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final

import aio_pika
import aiohttp
import uvloop

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS_DIR: Final = ROOT / "bench" / "results"
DEFAULT_AMQP_URL: Final = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
STOP_TIMEOUT_S: Final = 15.0


# ---------------------------------------------------------------------------
# Subprocesses: each in its own process group, all killed on the way out
# ---------------------------------------------------------------------------


class Processes:
    """Starts subprocesses in their own sessions (process groups), logs to files, stops them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._running: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, argv: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT
    ) -> subprocess.Popen[bytes]:
        with open(self.log_path(name), "wb") as log:
            process = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: no stray children survive us
            )
        self._running[name] = process
        return process

    async def wait(self, name: str, timeout: float) -> None:
        """Wait for a process that ends by itself, then make sure its group is gone."""
        process = self._running.get(name)
        deadline = time.monotonic() + timeout
        while process is not None and process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.stop(name)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path(name).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, name: str, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the process group, SIGKILL it if it outlives `timeout`; return the exit code."""
        process = self._running.pop(name, None)
        if process is None:
            return None
        _signal_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(process, signal.SIGKILL)
            process.wait()
        _signal_group(process, signal.SIGKILL)  # anything it started and left behind
        return process.returncode

    def stop_all(self) -> None:
        for name in reversed(list(self._running)):
            self.stop(name)


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    try:
        os.killpg(process.pid, signum)  # pgid == pid thanks to start_new_session
    except (ProcessLookupError, PermissionError):
        pass


async def wait_http_ok(url: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Poll `url` until it answers 200; fail if `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode} before {url} answered")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:.0f} s")


async def wait_for_line(path: Path, needle: str, process: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until the log at `path` contains `needle`; fail if `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before logging {needle!r}")
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{needle!r} not logged in {path} within {timeout:.0f} s")


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a subprocess: no proxy for localhost, the repository importable, plus `extra`."""
    env = dict(os.environ)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


async def delete_queues(amqp_url: str, names: Sequence[str]) -> None:
    """Delete these queues if they exist (each delete on a fresh channel: a failed one closes it)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        for name in names:
            channel = await connection.channel()  # a failed delete closes its channel
            try:
                await channel.queue_delete(name)
            except aio_pika.exceptions.AMQPError:
                pass


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
    def base(cls, backend_pgid: int) -> CpuMeter:
        pids = {"load-gen": os.getpid()}
        if (broker := find_process("beam.smp")) is not None:
            pids["rabbitmq"] = broker  # a local RabbitMQ: its CPU counts too (all its traffic)
        return cls(pids, {"backend": backend_pgid})

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


BAD_LOG_WORDS: Final = ("Traceback", '"level": "error"', "ERROR", '"level": "warning"')


def bad_log_lines(lines: Iterable[str]) -> list[str]:
    """The lines that show an error or a warning (the processes under test should log none)."""
    return [line for line in lines if any(word in line for word in BAD_LOG_WORDS)]


def print_notes(notes: Sequence[str], json_path: Path) -> None:
    """The closing lines of every printed report: the notes, then where the JSON went."""
    for note in notes:
        print(f"note: {note}")
    print()
    print(f"JSON: {json_path}")


def write_json(report: Any, path: Path) -> None:
    """Write a report dataclass to `path` as indented JSON (anything else as its str)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2, default=str) + "\n")


def fmt(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals, or "-" for None (for the printed tables)."""
    return "-" if value is None else f"{value:.{digits}f}"


def round_or_none(value: float | None, digits: int = 3) -> float | None:
    """`value` rounded to `digits`, None stays None (for the JSON)."""
    return None if value is None else round(value, digits)


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


def run_bench(
    bench: Callable[[Processes, Path], Coroutine[Any, Any, None]],
    tmp_prefix: str,
    logs: Callable[[Path], Iterable[Path]] = lambda workdir: sorted(workdir.glob("*.log")),
    tail_lines: int = 25,
    unreadable: str = "(unreadable)",
    cleanup: Callable[[Path], None] | None = None,
) -> int:
    """Run ``bench(processes, workdir)`` under uvloop in a fresh temporary directory.

    SIGTERM and SIGINT unwind like Ctrl-C. Every process started through ``processes`` is
    stopped on the way out, then ``cleanup(workdir)`` runs (if given), while the directory
    still exists. On a failure the tails of ``logs(workdir)`` go to stderr and the exception
    propagates. Returns 0 when the benchmark completed, 130 when it was interrupted.
    """
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    with tempfile.TemporaryDirectory(prefix=tmp_prefix) as tmp:
        workdir = Path(tmp)
        processes = Processes(workdir)
        try:
            uvloop.run(bench(processes, workdir))
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
    return 0


# Below the 5 s after which uvicorn (hotq's API, vLLM) closes an idle connection: a pooled
# connection reused just as the server closes it fails the request (ClientOSError), which
# showed up as lost requests in the first round after a pause.
KEEPALIVE_S: Final = 3.0


def http_session(connections: int, timeout_s: float) -> aiohttp.ClientSession:
    """The load generator's session: up to `connections` kept-alive connections."""
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s))

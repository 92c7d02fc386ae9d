"""How the scaler follows a bursty queue: launch latency, cold start, idle exits, overshoot.

Run from the repository root::

    .venv/bin/python -m bench.scaler_burst [--burst1 300] [--burst2 100] [--trickle-s 10] [--keep-logs]

One run, everything on this machine (RabbitMQ at ``--amqp-url``, all HTTP on 127.0.0.1):
``hotq serve`` as a subprocess, and a `Scaler` driven in-process exactly like ``hotq scale``
does it (``Scaler.run``: a tick, then ``--tick-s`` of waiting; the first tick after
``heartbeat_s`` + 0.5 s) with one `LocalLauncher` (cluster "local", ``max_nodes`` =
``max_agents``). Agents run the deterministic fake backend
(``ops.testing.fake_backend.FAKE_BACKEND_COMMAND``) and
every request asks it for ``fake_delay_ms`` (100 ms) per answer, so agents have real work.
The model (``bench-burst-<hex>``, unique to the run; its queues are deleted at the end) has
``max_inflight`` 4, ``max_agents`` 4, ``min_hot`` 0, ``target_drain_s`` 5, ``idle_ttl_s`` 3,
and the config ``heartbeat_s`` 0.5.

The scripted profile (each burst and the trickle end only once every request is answered
and every agent has left, plus ``--settle-s`` in which a launch would be churn)::

    idle 3 s -> burst-1: 300 requests at once -> idle until the agents exit
             -> burst-2: 100 requests at once -> idle until the agents exit
             -> trickle: 1 request/s for 10 s -> idle until the agent exits

Measured (monotonic clocks, all in this process; times in seconds):

- launch decision lag: the first request of a phase sent -> the scaler's first launch in
  it (`Launch.launched_at`), split into the wait for the tick that launched and that tick
  until the launch, and how many ticks started in between without launching (they probed
  the queue before the API had published the burst);
- cold start: launch -> the agent's ``hot`` announcement, and launch -> its first served
  request;
- idle exit accuracy: per agent, its last served request -> its ``draining`` announcement
  (the idle decision; should be ``idle_ttl_s`` plus at most the agent's 0.25 s supervise
  interval) and -> its process exit, vs ``idle_ttl_s``;
- overshoot: agents launched per phase vs the number the backlog needed, i.e. the scaler's
  own formula ``ceil(backlog / (rps * target_drain_s))`` with ``rps`` the per-agent
  throughput measured in this run (served requests / busy seconds over the burst agents),
  also with the cold start taken off the drain budget, and vs ``max_agents``; agents that
  served nothing; launches after a phase's last answer (churn);
- every answer checked (HTTP 200 and the exact expected content); per phase the completion
  time (first request sent -> last answer) and latency percentiles.

Per-request attribution: the API does not say which agent served a request, so each agent's
first and last served request come from polling its fake backend's ``/_stats`` (the
``completed`` counter) every ``--poll-s`` (0.1 s) once the agent is hot: the time is the
midpoint between the poll that saw the counter change and the one before (the window's
width, in the JSON, is the resolution). The agent's own count (its exit summary) is
reported alongside.

Notes flag what a shared machine can do to a run: agents that did not leave idle (with the
last line of their log: a crash loop shows here), error lines in any log, Python files of
the work tree that changed during the run (each agent imports the tree when it starts),
other models' agents announcing the same cluster name on the shared events exchange (the
scaler's directory counts them against ``max_nodes``), and reconnects of this process's
RabbitMQ connection (some test suites force-close connections).

Machine load: the 1-minute load average (sampled every second) and, per phase, the cores
kept busy by the whole machine (/proc/stat), by this benchmark's process tree (this process,
the API, agents and backends, including exited children), by RabbitMQ, and by everything
else (other people's tests: ``other``), plus any foreign pytest/vLLM seen. The machine has
2 cores: cold starts and throughput here are timing numbers under that load, not capacity.

Results: tables on stdout and JSON in ``bench/results/scaler_burst-<timestamp>.json``
(``--keep-logs`` also keeps the API, agent and backend logs next to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from bench.common import (
    CLOCK_TICKS,
    ROOT,
    BenchReport,
    Processes,
    add_shared_options,
    bad_log_lines,
    delete_queues,
    find_process,
    foreign_heavy_processes,
    keep_logs,
    machine_busy_s,
    nearest_rank,
    print_header,
    print_notes,
    request_queues,
    round_or_none,
    run_bench,
    start_api,
)
from broker import messages, topology
from broker.config import Config, load_config
from broker.connection import connect
from broker.errors import WireError
from broker.logs import configure_logging
from broker.messages import AgentState, AgentStatus, Lane
from hpc_agents.decisions import Decision, DecisionLog
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers import Launch
from hpc_agents.launchers.local import LocalLauncher
from hpc_agents.scaler import Scaler
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, expected_chat_tokens
from ops.testing.stack import write_config

CLUSTER: Final = "local"
SUPERVISE_INTERVAL_S: Final = 0.25  # hpc_agents.agent: how often an agent checks whether it is idle

REQUEST_TIMEOUT_S: Final = 150.0
QUEUE_WAIT_S: Final = 120.0  # the API's max_queue_wait_s: requests outlive the agents' cold start
AGENTS_GONE_TIMEOUT_S: Final = 120.0  # per phase: answers in and agents gone, else the run stops
STATS_TIMEOUT_S: Final = 1.0
SAMPLE_S: Final = 1.0  # load average and foreign-process scan


# ---------------------------------------------------------------------------
# Settings and the profile
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    name: str
    kind: Literal["idle", "burst", "trickle"]
    requests: int = 0
    seconds: float = 0.0  # idle: its length; trickle: how long requests keep coming


@dataclass(frozen=True)
class Settings:
    amqp_url: str
    tick_s: float
    fake_delay_ms: int
    max_inflight: int
    max_agents: int
    target_drain_s: float
    idle_ttl_s: float
    heartbeat_s: float
    poll_s: float
    settle_s: float
    phases: tuple[Phase, ...]
    keep_logs: bool

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Settings:
        trickle = max(1, round(args.trickle_s * args.trickle_rps))
        phases = (
            Phase("idle", "idle", seconds=args.idle_s),
            Phase("burst-1", "burst", requests=args.burst1),
            Phase("burst-2", "burst", requests=args.burst2),
            Phase("trickle", "trickle", requests=trickle, seconds=args.trickle_s),
        )
        return cls(
            amqp_url=args.amqp_url,
            tick_s=args.tick_s,
            fake_delay_ms=args.fake_delay_ms,
            max_inflight=args.max_inflight,
            max_agents=args.max_agents,
            target_drain_s=args.target_drain_s,
            idle_ttl_s=args.idle_ttl_s,
            heartbeat_s=args.heartbeat_s,
            poll_s=args.poll_s,
            settle_s=args.settle_s,
            phases=tuple(p for p in phases if p.kind == "idle" or p.requests > 0),
            keep_logs=args.keep_logs,
        )


# ---------------------------------------------------------------------------
# What happens to each agent, as seen from this process
# ---------------------------------------------------------------------------


@dataclass
class AgentTrack:
    """One agent's life in monotonic seconds (None: not seen)."""

    agent_id: str
    launched_at: float | None = None
    state_at: dict[str, float] = field(default_factory=dict)  # first announcement of each state
    exited_at: float | None = None  # its process ended (the launch's future resolved)
    summary: dict[str, Any] | None = None
    backend_url: str = ""
    heartbeats: int = 0
    heartbeat_served: int = 0  # the last heartbeat's count
    completed: int = 0  # the backend's /_stats count, last poll
    last_poll_at: float | None = None
    first_served: tuple[float, float] | None = None  # (previous poll, poll that saw it)
    last_served: tuple[float, float] | None = None
    poll_errors: int = 0


class Observer:
    """Collects launches (from the launcher's threads), announcements and backend stats."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.tracks: dict[str, AgentTrack] = {}
        self._lock = threading.Lock()
        self.foreign: dict[str, None] = {}
        self.foreign_agents: dict[str, str] = {}  # other models' agents announced meanwhile: id -> "model@cluster"
        self.reconnects: list[float] = []  # this process's RabbitMQ connection came back
        self.loadavg: list[tuple[float, float]] = []  # (monotonic, 1-minute load average)

    def track(self, agent_id: str) -> AgentTrack:
        with self._lock:
            found = self.tracks.get(agent_id)
            if found is None:
                found = self.tracks[agent_id] = AgentTrack(agent_id)
            return found

    def all(self) -> list[AgentTrack]:
        with self._lock:
            return list(self.tracks.values())

    # -- launches (called on the scaler's launch thread) --

    def on_launch(self, launch: Launch) -> None:
        track = self.track(launch.agent_id)
        track.launched_at = launch.launched_at

        def exited(future: Any) -> None:
            track.exited_at = time.monotonic()
            error = future.exception()
            track.summary = {"exit_reason": "launch_failed", "error": repr(error)} if error else future.result()

        launch.future.add_done_callback(exited)

    def launched_and_alive(self) -> list[AgentTrack]:
        return [t for t in self.all() if t.launched_at is not None and t.exited_at is None]

    # -- announcements on the events exchange --

    async def subscribe(self, connection: AbstractRobustConnection) -> None:
        await topology.consume_agent_events(connection, self._on_status)

    async def _on_status(self, message: AbstractIncomingMessage) -> None:
        received = time.monotonic()
        try:
            status = messages.decode_as(message.body, AgentStatus)
        except WireError:
            return
        if status.model != self.model:
            # Other people's agents, on the same events exchange: the scaler's directory sees them too.
            self.foreign_agents.setdefault(status.agent_id, f"{status.model}@{status.cluster}")
            return
        track = self.track(status.agent_id)
        if status.backend:
            track.backend_url = status.backend
        if status.heartbeat:
            track.heartbeats += 1
            track.heartbeat_served = status.served
        else:
            track.state_at.setdefault(status.state.value, received)

    # -- the backends' request counters --

    async def poll_backends(self, poll_s: float, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=STATS_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not stop.is_set():
                watched = [
                    t
                    for t in self.all()
                    if t.backend_url
                    and AgentState.HOT.value in t.state_at
                    and AgentState.DRAINING.value not in t.state_at
                    and t.exited_at is None
                ]
                await asyncio.gather(*(self._poll(session, t) for t in watched))
                try:
                    await asyncio.wait_for(stop.wait(), poll_s)
                except TimeoutError:
                    pass

    async def _poll(self, session: aiohttp.ClientSession, track: AgentTrack) -> None:
        try:
            async with session.get(track.backend_url + "/_stats") as response:
                stats = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            track.poll_errors += 1
            return
        seen = time.monotonic()
        before = track.last_poll_at if track.last_poll_at is not None else track.state_at[AgentState.HOT.value]
        completed = int(stats.get("completed", 0))
        if completed > track.completed:
            if track.first_served is None:
                track.first_served = (before, seen)
            track.last_served = (before, seen)
            track.completed = completed
        track.last_poll_at = seen

    # -- the machine --

    async def sample_machine(self, stop: asyncio.Event) -> None:
        own_groups = {os.getpgrp()}
        while not stop.is_set():
            self.loadavg.append((time.monotonic(), os.getloadavg()[0]))
            for found in await asyncio.to_thread(foreign_heavy_processes, own_groups):
                self.foreign[found] = None
            try:
                await asyncio.wait_for(stop.wait(), SAMPLE_S)
            except TimeoutError:
                pass


class RecordingLauncher(LocalLauncher):
    """The local launcher, telling the observer about every launch the moment it is made."""

    def __init__(self, observer: Observer, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._observer = observer

    def launch(self, model: str) -> Launch:
        launch = super().launch(model)
        self._observer.on_launch(launch)
        return launch

    @property
    def workdir(self) -> Path:
        return self._workdir  # the per-agent config files; LocalLauncher leaves them behind


class TimedScaler(Scaler):
    """The scaler, with the start and end of every tick recorded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ticks: list[tuple[float, float]] = []

    async def tick(self, channel: AbstractChannel) -> list[Decision]:
        started = time.monotonic()
        try:
            return await super().tick(channel)
        finally:
            self.ticks.append((started, time.monotonic()))


class TimedDecisionLog(DecisionLog):
    """The decision log `hotq scale` keeps (sqlite), plus when each decision was made."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.timed: list[tuple[float, Decision]] = []

    def record(self, decision: Decision) -> None:
        self.timed.append((time.monotonic(), decision))
        super().record(decision)


# ---------------------------------------------------------------------------
# CPU accounting: the machine, this benchmark's process tree, RabbitMQ
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuSnapshot:
    at: float
    machine_s: float
    ours_s: float
    rabbitmq_s: float


def tree_cpu_s(root: int) -> float:
    """CPU seconds of `root` and its live descendants, each with its reaped children's."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(entry.name)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1]: ppid
        cpu[pid] = sum(int(v) for v in fields[11:15]) / CLOCK_TICKS  # utime stime cutime cstime
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo.extend(children.get(pid, []))
    return total


def process_cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_snapshot(rabbitmq_pid: int | None) -> CpuSnapshot:
    return CpuSnapshot(time.monotonic(), machine_busy_s(), tree_cpu_s(os.getpid()), process_cpu_s(rabbitmq_pid))


def cpu_cores(before: CpuSnapshot, after: CpuSnapshot) -> dict[str, float]:
    wall = after.at - before.at
    if wall <= 0:
        return {}
    machine = (after.machine_s - before.machine_s) / wall
    ours = (after.ours_s - before.ours_s) / wall
    rabbit = (after.rabbitmq_s - before.rabbitmq_s) / wall
    return {
        "machine": round(machine, 2),
        "ours": round(ours, 2),
        "rabbitmq": round(rabbit, 2),
        "other": round(max(0.0, machine - ours - rabbit), 2),
    }


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


@dataclass
class RequestResult:
    sent: float
    done: float
    error: str | None  # None: answered with the expected content


async def chat(session: aiohttp.ClientSession, url: str, model: str, text: str, delay_ms: int) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": text}], "fake_delay_ms": delay_ms}
    expected = "".join(expected_chat_tokens(text, None)[0])
    sent = time.monotonic()
    error: str | None = None
    try:
        async with session.post(url, json=body) as response:
            raw = await response.read()
            if response.status != 200:
                error = f"HTTP {response.status}"
            else:
                try:
                    content = json.loads(raw)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    content = None
                    error = "malformed body"
                if error is None and content != expected:
                    error = "wrong content"
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = type(exc).__name__
    return RequestResult(sent, time.monotonic(), error)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass
class PhaseRun:
    phase: Phase
    started: float
    ended: float = 0.0
    answered: float | None = None  # the last answer
    requests: list[RequestResult] = field(default_factory=list)
    gone_timeout: bool = False
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class AgentResult:
    agent_id: str
    phase: str  # the phase it was launched in
    launched_s: float | None  # since the run's start
    hot_s: float | None
    first_served_s: float | None
    last_served_s: float | None
    draining_s: float | None
    exited_s: float | None
    launch_to_hot_s: float | None
    launch_to_first_served_s: float | None
    served: int | None  # the agent's own count (its exit summary)
    backend_completed: int  # the fake backend's count (polled)
    heartbeat_served: int
    exit_reason: str | None
    backend_ready_s: float | None  # the agent's own measure: backend start -> ready
    idle_s: float | None  # last served (or hot, if it served nothing) -> draining: the idle decision
    idle_error_s: float | None  # idle_s - idle_ttl_s
    last_served_to_exit_s: float | None  # ... -> its process ended
    served_window_s: float | None  # resolution of last_served_s (poll window width)
    busy_rps: float | None  # served / (last served - first request started)
    error: str | None = None  # an agent that did not leave idle: the last line of its log


@dataclass
class PhaseResult:
    name: str
    kind: str
    started_s: float
    ended_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    completion_s: float | None  # first request sent -> last answer
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_max_s: float | None
    launch_lag_s: float | None  # first request sent -> first launch in this phase
    launch_tick_wait_s: float | None  # ... of which waiting for the next tick to start
    launch_tick_s: float | None  # ... of which the tick itself until the launch
    launch_ticks_missed: int | None  # ticks that started after the first request was sent but did not launch
    launch_missed_tick_offsets_s: list[float]  # when those started, after the first request was sent
    launched: int
    launched_after_last_answer: int  # churn: launches with nothing left to serve
    agents_served_nothing: int
    peak_alive: int  # agents launched and not yet exited, at most at once
    needed: int | None  # ceil(requests / (measured per-agent rps * target_drain_s))
    needed_with_cold_start: int | None  # the same with the cold start off the drain budget
    overshoot: int | None  # launched - needed
    first_decision: dict[str, Any] | None
    cpu_cores: dict[str, float]
    loadavg_1m_max: float | None


@dataclass
class Report(BenchReport):
    phases: list[PhaseResult] = field(default_factory=list)
    agents: list[AgentResult] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def _mid(window: tuple[float, float] | None) -> float | None:
    return None if window is None else (window[0] + window[1]) / 2


def _since(t0: float, value: float | None) -> float | None:
    return None if value is None else round(value - t0, 3)


def _diff(later: float | None, earlier: float | None) -> float | None:
    return None if later is None or earlier is None else round(later - earlier, 3)


def _phase_of(runs: list[PhaseRun], at: float | None) -> PhaseRun | None:
    if at is None:
        return None
    for run in runs:
        if run.started <= at < (run.ended or math.inf):
            return run
    return runs[-1] if runs and at >= runs[-1].started else None


def last_log_line(path: Path) -> str | None:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return None
    return lines[-1][:300] if lines else None


def agent_results(
    t0: float, runs: list[PhaseRun], observer: Observer, settings: Settings, log_dir: Path
) -> list[AgentResult]:
    results = []
    tracks = sorted(observer.all(), key=lambda t: t.launched_at if t.launched_at is not None else math.inf)
    for t in tracks:
        phase = _phase_of(runs, t.launched_at)
        hot = t.state_at.get(AgentState.HOT.value)
        draining = t.state_at.get(AgentState.DRAINING.value)
        first, last = _mid(t.first_served), _mid(t.last_served)
        served = int(t.summary["served"]) if t.summary and "served" in t.summary else None
        reason = str(t.summary.get("exit_reason")) if t.summary else None
        idle_from = last if last is not None else hot
        idle = _diff(draining, idle_from) if reason == "idle" else None
        busy = None
        if first is not None and last is not None and served:
            busy_s = last - first + settings.fake_delay_ms / 1000  # from when its first request started
            busy = round(served / busy_s, 2) if busy_s > 0 else None
        results.append(
            AgentResult(
                agent_id=t.agent_id,
                phase=phase.phase.name if phase else "?",
                launched_s=_since(t0, t.launched_at),
                hot_s=_since(t0, hot),
                first_served_s=_since(t0, first),
                last_served_s=_since(t0, last),
                draining_s=_since(t0, draining),
                exited_s=_since(t0, t.exited_at),
                launch_to_hot_s=_diff(hot, t.launched_at),
                launch_to_first_served_s=_diff(first, t.launched_at),
                served=served,
                backend_completed=t.completed,
                heartbeat_served=t.heartbeat_served,
                exit_reason=reason,
                backend_ready_s=t.summary.get("backend_ready_s") if t.summary else None,
                idle_s=idle,
                idle_error_s=round_or_none(idle - settings.idle_ttl_s) if idle is not None else None,
                last_served_to_exit_s=_diff(t.exited_at, idle_from) if reason == "idle" else None,
                served_window_s=round_or_none(t.last_served[1] - t.last_served[0]) if t.last_served else None,
                busy_rps=busy,
                error=None if reason == "idle" else last_log_line(log_dir / f"agent-{t.agent_id}.log"),
            )
        )
    return results


def measured_agent_rps(agents: list[AgentResult]) -> float | None:
    """Per-agent throughput while busy: served / busy seconds, over agents that served in bursts."""
    busy = [
        (a.served, a.served / a.busy_rps)
        for a in agents
        if a.phase.startswith("burst") and a.busy_rps and a.served and a.served >= 4
    ]
    if not busy:
        return None
    return sum(s for s, _ in busy) / sum(b for _, b in busy)


def peak_alive(tracks: list[AgentTrack], start: float, end: float) -> int:
    events: list[tuple[float, int]] = []
    for t in tracks:
        if t.launched_at is None:
            continue
        gone = t.exited_at if t.exited_at is not None else math.inf
        if t.launched_at < end and gone > start:
            events.append((max(t.launched_at, start), 1))
            events.append((gone, -1))
    alive = best = 0
    for _, change in sorted(events, key=lambda e: (e[0], e[1])):
        alive += change
        best = max(best, alive)
    return best


def phase_results(
    t0: float,
    runs: list[PhaseRun],
    observer: Observer,
    scaler: TimedScaler,
    decisions: TimedDecisionLog,
    agents: list[AgentResult],
    settings: Settings,
    rps: float | None,
    cold_start_s: float | None,
) -> list[PhaseResult]:
    results = []
    tracks = observer.all()
    for run in runs:
        in_phase = sorted(
            (t for t in tracks if t.launched_at is not None and run.started <= t.launched_at < run.ended),
            key=lambda t: t.launched_at or 0.0,
        )
        ids = {t.agent_id for t in in_phase}
        first_sent = min((r.sent for r in run.requests), default=None)
        latencies = sorted(r.done - r.sent for r in run.requests if r.error is None)
        errors = Counter(r.error for r in run.requests if r.error is not None)
        lag = tick_wait = tick = missed = None
        missed_at: list[float] = []
        if first_sent is not None and in_phase:
            launched = in_phase[0].launched_at
            assert launched is not None
            lag = launched - first_sent
            ticks = [s for s, e in scaler.ticks if s <= launched <= e + 1e-3]
            if ticks:
                tick_wait, tick = ticks[-1] - first_sent, launched - ticks[-1]
                missed_at = [round(s - first_sent, 3) for s, _ in scaler.ticks if first_sent <= s < ticks[-1]]
                missed = len(missed_at)
        first_decision = next(
            (
                asdict(d) | {"at_s": round(at - t0, 3)}
                for at, d in decisions.timed
                if d.launched and at >= run.started and at < run.ended
            ),
            None,
        )
        needed = needed_cold = overshoot = None
        if run.phase.requests and rps:
            needed = max(1, math.ceil(run.phase.requests / (rps * settings.target_drain_s)))
            if run.phase.kind == "trickle":
                needed = 1  # at most a request or two waits at a time: one agent is plenty
            budget = settings.target_drain_s - (cold_start_s or 0.0)
            if run.phase.kind == "trickle":
                needed_cold = 1
            elif budget > 0:
                needed_cold = max(1, math.ceil(run.phase.requests / (rps * budget)))
            overshoot = len(in_phase) - needed
        loads = [load for at, load in observer.loadavg if run.started <= at <= run.ended]
        results.append(
            PhaseResult(
                name=run.phase.name,
                kind=run.phase.kind,
                started_s=round(run.started - t0, 3),
                ended_s=round(run.ended - t0, 3),
                requests=len(run.requests),
                ok=len(latencies),
                errors=dict(errors),
                completion_s=_diff(run.answered, first_sent) if run.requests else None,
                latency_p50_s=round_or_none(nearest_rank(latencies, 50)),
                latency_p90_s=round_or_none(nearest_rank(latencies, 90)),
                latency_max_s=round_or_none(max(latencies, default=None)),
                launch_lag_s=round_or_none(lag),
                launch_tick_wait_s=round_or_none(tick_wait),
                launch_tick_s=round_or_none(tick),
                launch_ticks_missed=missed,
                launch_missed_tick_offsets_s=missed_at,
                launched=len(in_phase),
                launched_after_last_answer=sum(
                    1 for t in in_phase if run.answered is not None and (t.launched_at or 0.0) > run.answered
                ),
                agents_served_nothing=sum(1 for a in agents if a.agent_id in ids and not a.served),
                peak_alive=peak_alive(tracks, run.started, run.ended),
                needed=needed,
                needed_with_cold_start=needed_cold,
                overshoot=overshoot,
                first_decision=first_decision,
                cpu_cores=run.cpu,
                loadavg_1m_max=max(loads, default=None),
            )
        )
    return results


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------


class RunFailed(Exception):
    pass


async def wait_agents_gone(observer: Observer, timeout: float) -> bool:
    """True once every launched agent has exited; False at the timeout."""
    deadline = time.monotonic() + timeout
    while observer.launched_and_alive():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def run_phase(
    phase: Phase,
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    observer: Observer,
    settings: Settings,
    rabbitmq_pid: int | None,
) -> PhaseRun:
    run = PhaseRun(phase, started=time.monotonic())
    before = cpu_snapshot(rabbitmq_pid)
    print(f"  {phase.name}: ", end="", flush=True)
    tasks: list[asyncio.Task[RequestResult]] = []
    if phase.kind == "idle":
        await asyncio.sleep(phase.seconds)
    elif phase.kind == "burst":
        tasks = [
            asyncio.create_task(chat(session, url, model, f"{phase.name} request {i}", settings.fake_delay_ms))
            for i in range(phase.requests)
        ]
    else:
        interval = phase.seconds / phase.requests
        for i in range(phase.requests):
            await asyncio.sleep(max(0.0, run.started + i * interval - time.monotonic()))
            tasks.append(
                asyncio.create_task(chat(session, url, model, f"{phase.name} request {i}", settings.fake_delay_ms))
            )
    if tasks:
        run.requests = list(await asyncio.gather(*tasks))
        run.answered = max(r.done for r in run.requests)
        ok = sum(1 for r in run.requests if r.error is None)
        print(f"{ok}/{len(tasks)} answered in {run.answered - min(r.sent for r in run.requests):.2f} s; ", end="")
    # Idle until the agents have left, then a little longer: a launch now would be churn.
    while phase.kind != "idle":
        if not await wait_agents_gone(observer, AGENTS_GONE_TIMEOUT_S):
            run.gone_timeout = True
            break
        await asyncio.sleep(settings.settle_s)
        if not observer.launched_and_alive():
            break
    run.ended = time.monotonic()
    run.cpu = cpu_cores(before, cpu_snapshot(rabbitmq_pid))
    launched = sum(1 for t in observer.all() if t.launched_at is not None and run.started <= t.launched_at)
    print(f"{launched} agent(s) launched; phase took {run.ended - run.started:.1f} s", flush=True)
    if run.gone_timeout:
        raise RunFailed(f"{phase.name}: agents still running {AGENTS_GONE_TIMEOUT_S:g} s after the last answer")
    return run


async def scale(scaler: TimedScaler, channel: AbstractChannel, stop: asyncio.Event, heartbeat_s: float) -> None:
    """What `run_scaler` (``hotq scale``) does once connected: hear running agents, then tick."""
    try:
        await asyncio.wait_for(stop.wait(), heartbeat_s + 0.5)
    except TimeoutError:
        pass
    await scaler.run(channel, stop)


def source_mtimes() -> dict[str, float]:
    """Modification times of the repository's Python files: a fresh agent imports the work tree."""
    found = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0].startswith(".") or relative.parts[:2] == ("bench", "results"):
            continue
        try:
            found[str(relative)] = path.stat().st_mtime
        except OSError:
            continue
    return found


def changed_sources(before: dict[str, float]) -> list[str]:
    after = source_mtimes()
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def model_queues(model: str) -> list[str]:
    # the cluster's own interactive queue too: the scaler probes it
    return [*request_queues(model), topology.request_queue_name(model, Lane.INTERACTIVE, CLUSTER)]


async def run(settings: Settings, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"bench-burst-{uuid.uuid4().hex[:8]}"
    report.settings["model"] = model
    table = {
        "command": FAKE_BACKEND_COMMAND,
        "max_inflight": settings.max_inflight,
        "max_agents": settings.max_agents,
        "min_hot": 0,
        "target_drain_s": settings.target_drain_s,
        "idle_ttl_s": settings.idle_ttl_s,
    }
    config_path = write_config(
        workdir / "hotq.toml",
        settings.amqp_url,
        {model: table},
        heartbeat_s=settings.heartbeat_s,
        max_queue_wait_s=QUEUE_WAIT_S,
    )
    config: Config = load_config(config_path)
    observer = Observer(model)
    launcher = RecordingLauncher(observer, CLUSTER, config, max_nodes=settings.max_agents, log_dir=workdir / "logs")
    rabbitmq_pid = find_process("beam.smp")
    stop = asyncio.Event()
    background: list[asyncio.Task[None]] = []
    connection: AbstractRobustConnection | None = None
    runs: list[PhaseRun] = []
    try:
        print("hotq serve", flush=True)
        api_url, _ = await start_api(processes, config_path)

        connection = await connect(settings.amqp_url, "bench-scaler-burst")
        connection.reconnect_callbacks.add(lambda *_: observer.reconnects.append(time.monotonic()))
        await observer.subscribe(connection)
        directory = AgentDirectory(config.heartbeat_s)
        await directory.subscribe(connection)
        channel = await connection.channel()
        await topology.declare_model_queues(channel, [model])
        decisions = TimedDecisionLog(workdir / "data" / "scaler.db")
        scaler = TimedScaler(config, {CLUSTER: launcher}, directory, decisions, tick_s=settings.tick_s)

        background = [
            asyncio.create_task(scale(scaler, channel, stop, config.heartbeat_s)),
            asyncio.create_task(observer.poll_backends(settings.poll_s, stop)),
            asyncio.create_task(observer.sample_machine(stop)),
        ]
        connector = aiohttp.TCPConnector(limit=0)  # a burst is all its requests at once
        client_timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        print("profile", flush=True)
        sources = source_mtimes()
        t0 = time.monotonic()
        report.environment["loadavg_at_profile_start"] = os.getloadavg()
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            for phase in settings.phases:
                runs.append(
                    await run_phase(
                        phase, session, api_url + "/chat/completions", model, observer, settings, rabbitmq_pid
                    )
                )
                for task in background:
                    if task.done() and task.exception() is not None:
                        raise RunFailed(f"a background task failed: {task.exception()!r}")
        stop.set()
        await asyncio.gather(*background)
        report.environment["sources_changed_during_run"] = changed_sources(sources)
        record_environment(report, observer)
        summarise(report, t0, runs, observer, scaler, decisions, settings, workdir / "logs")
        _check_logs(workdir, processes, report)
    finally:
        stop.set()
        for task in background:
            if not task.done():
                task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await asyncio.to_thread(launcher.shutdown)  # agents still running drain and stop
        shutil.rmtree(launcher.workdir, ignore_errors=True)
        if connection is not None:
            await connection.close()
        processes.stop_all()
        await delete_queues(settings.amqp_url, model_queues(model))
        record_environment(report, observer)


def record_environment(report: Report, observer: Observer) -> None:
    """What else went on meanwhile: other heavy processes, other agents, reconnects, the load average."""
    report.environment["foreign_heavy_processes_seen"] = list(observer.foreign)
    report.environment["foreign_agents_seen"] = dict(observer.foreign_agents)
    report.environment["amqp_reconnects"] = len(observer.reconnects)
    report.environment["loadavg_1m_samples"] = [round(load, 2) for _, load in observer.loadavg]


def summarise(
    report: Report,
    t0: float,
    runs: list[PhaseRun],
    observer: Observer,
    scaler: TimedScaler,
    decisions: TimedDecisionLog,
    settings: Settings,
    log_dir: Path,
) -> None:
    agents = agent_results(t0, runs, observer, settings, log_dir)
    rps = measured_agent_rps(agents)
    cold = [a.launch_to_first_served_s for a in agents if a.launch_to_first_served_s is not None]
    cold_start = statistics.median(cold) if cold else None
    report.agents = agents
    report.phases = phase_results(t0, runs, observer, scaler, decisions, agents, settings, rps, cold_start)
    report.decisions = [asdict(d) | {"at_s": round(at - t0, 3)} for at, d in decisions.timed]
    ticks = [end - start for start, end in scaler.ticks]
    idle = [a.idle_s for a in agents if a.idle_s is not None]
    to_exit = [a.last_served_to_exit_s for a in agents if a.last_served_to_exit_s is not None]
    hot = [a.launch_to_hot_s for a in agents if a.launch_to_hot_s is not None]
    lags = [p.launch_lag_s for p in report.phases if p.launch_lag_s is not None]
    loads = [load for _, load in observer.loadavg]
    report.summary = {
        "requests": sum(p.requests for p in report.phases),
        "answered_ok": sum(p.ok for p in report.phases),
        "agents_launched": len(agents),
        "max_agents": settings.max_agents,
        "peak_alive": max((p.peak_alive for p in report.phases), default=0),
        "measured_agent_rps": round_or_none(rps, 2),
        "nominal_agent_rps": round(settings.max_inflight / (settings.fake_delay_ms / 1000), 1),
        "launch_lag_s": lags,
        "launch_to_hot_s_median": round_or_none(statistics.median(hot)) if hot else None,
        "launch_to_hot_s_max": round_or_none(max(hot, default=None)),
        "launch_to_first_served_s_median": round_or_none(cold_start),
        "launch_to_first_served_s_max": round_or_none(max(cold, default=None)),
        "idle_s_median": round_or_none(statistics.median(idle)) if idle else None,
        "idle_s_min": round_or_none(min(idle, default=None)),
        "idle_s_max": round_or_none(max(idle, default=None)),
        "idle_ttl_s": settings.idle_ttl_s,
        "last_served_to_exit_s_median": round_or_none(statistics.median(to_exit)) if to_exit else None,
        "last_served_to_exit_s_max": round_or_none(max(to_exit, default=None)),
        "served_window_s_max": round_or_none(max((a.served_window_s or 0.0 for a in agents), default=None)),
        "ticks": len(ticks),
        "tick_s_mean": round_or_none(statistics.fmean(ticks)) if ticks else None,
        "tick_s_max": round_or_none(max(ticks, default=None)),
        "loadavg_1m_min": min(loads, default=None),
        "loadavg_1m_mean": round_or_none(statistics.fmean(loads), 2) if loads else None,
        "loadavg_1m_max": max(loads, default=None),
        "total_s": round(runs[-1].ended - t0, 1) if runs else None,
    }
    note_oddities(report, settings)


def note_oddities(report: Report, settings: Settings) -> None:
    notes = report.notes
    for p in report.phases:
        if p.errors:
            notes.append(f"{p.name}: {sum(p.errors.values())} request(s) failed: {p.errors}")
        if p.launched > settings.max_agents or p.peak_alive > settings.max_agents:
            notes.append(f"{p.name}: {p.launched} launched / {p.peak_alive} alive at once, over max_agents")
        if p.overshoot:
            notes.append(
                f"{p.name}: launched {p.launched} agent(s) where {p.needed} would have drained {p.requests} "
                f"request(s) within target_drain_s at the measured per-agent rate"
            )
        if p.launched_after_last_answer:
            notes.append(f"{p.name}: {p.launched_after_last_answer} launch(es) after the last answer (churn)")
        if p.agents_served_nothing:
            notes.append(f"{p.name}: {p.agents_served_nothing} agent(s) launched that served nothing")
        if p.kind == "idle" and p.launched:
            notes.append(f"{p.name}: {p.launched} launch(es) with no requests at all")
    not_idle: dict[tuple[str | None, str | None], list[str]] = {}
    for a in report.agents:
        if a.exit_reason != "idle":
            not_idle.setdefault((a.exit_reason, a.error), []).append(a.agent_id)
        if a.served is not None and a.served != a.backend_completed:
            notes.append(f"agent {a.agent_id}: served {a.served} but its backend completed {a.backend_completed}")
        if a.idle_error_s is not None and not -0.05 <= a.idle_error_s <= SUPERVISE_INTERVAL_S + 0.25:
            notes.append(f"agent {a.agent_id}: idle exit after {a.idle_s} s (idle_ttl_s {settings.idle_ttl_s:g})")
    for (reason, error), ids in not_idle.items():
        notes.append(f"{len(ids)} agent(s) left with exit_reason {reason} (e.g. {ids[0]}); last log line: {error}")
    if report.environment.get("sources_changed_during_run"):
        notes.append(
            "the work tree changed during the run (agents started meanwhile imported it): "
            f"{report.environment['sources_changed_during_run']}"
        )
    foreign = report.environment.get("foreign_agents_seen") or {}
    same_cluster = sorted(i for i, where in foreign.items() if where.endswith(f"@{CLUSTER}"))
    if same_cluster:
        notes.append(
            f"{len(same_cluster)} agent(s) of other models announced cluster {CLUSTER!r} on the shared events "
            f"exchange meanwhile (e.g. {foreign[same_cluster[0]]}); the scaler's directory counts them against "
            "this launcher's max_nodes"
        )
    if report.environment.get("amqp_reconnects"):
        notes.append(
            f"this process's RabbitMQ connection was closed and came back {report.environment['amqp_reconnects']} "
            "time(s) (a test suite force-closing connections?)"
        )
    if report.environment.get("foreign_heavy_processes_seen"):
        notes.append(f"foreign pytest/vLLM ran meanwhile: {report.environment['foreign_heavy_processes_seen']}")


def _what_went_wrong(lines: list[str], first_bad: str) -> str:
    """The exception a traceback ends with (its first unindented line after the frames), else the bad line."""
    if not first_bad.startswith("Traceback"):
        return first_bad
    start = lines.index(first_bad)
    for line in lines[start + 1 :]:
        if not line.startswith((" ", "\t")) and not line.startswith("Traceback"):
            return line
    return first_bad


def _check_logs(workdir: Path, processes: Processes, report: Report) -> None:
    """Note error and warning lines of the API, agents and backends (they should log none)."""
    paths = [
        processes.log_path("hotq-api"),
        *sorted(workdir.glob("logs/*.log")),
        *sorted(workdir.glob("data/logs/*.log")),
    ]
    found: dict[str, list[str]] = {}  # what went wrong (the exception, or the first bad line) -> log files
    for path in paths:
        try:
            lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            continue
        bad = bad_log_lines(lines)
        if bad:
            found.setdefault(_what_went_wrong(lines, bad[0])[:300], []).append(path.name)
    for what, names in found.items():
        report.notes.append(f"{len(names)} log file(s) (e.g. {names[0]}) logged errors/warnings: {what}")


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def print_report(report: Report, json_path: Path) -> None:
    s = report.summary
    print()
    print("Phases (seconds; 'lag' = first request sent -> first launch = wait for a tick + the tick)")
    header = (
        f"{'phase':<9}{'ok/n':>9}{'done in':>9}{'p50':>7}{'max':>7}{'lag':>7}{'wait':>6}{'tick':>6}"
        f"{'miss':>5}{'launched':>10}{'needed':>8}{'+cold':>7}{'peak':>6}{'idle0':>7}{'churn':>7}"
        f"{'machine':>9}{'ours':>6}{'rmq':>6}{'other':>7}{'load':>6}"
    )
    print_header(header)
    for p in report.phases:
        cpu = p.cpu_cores
        print(
            f"{p.name:<9}{f'{p.ok}/{p.requests}':>9}{_fmt(p.completion_s):>9}{_fmt(p.latency_p50_s):>7}"
            f"{_fmt(p.latency_max_s):>7}{_fmt(p.launch_lag_s):>7}{_fmt(p.launch_tick_wait_s):>6}"
            f"{_fmt(p.launch_tick_s):>6}{_fmt(p.launch_ticks_missed):>5}{p.launched:>10}{_fmt(p.needed):>8}"
            f"{_fmt(p.needed_with_cold_start):>7}"
            f"{p.peak_alive:>6}{p.agents_served_nothing:>7}{p.launched_after_last_answer:>7}"
            f"{_fmt(cpu.get('machine')):>9}{_fmt(cpu.get('ours')):>6}{_fmt(cpu.get('rabbitmq')):>6}"
            f"{_fmt(cpu.get('other')):>7}{_fmt(p.loadavg_1m_max):>6}"
        )
    print(
        "  miss = ticks that started after the first request was sent and still saw no backlog (not yet published);\n"
        "  needed = ceil(requests / (measured per-agent rps * target_drain_s)); +cold = with the median cold start "
        "off the budget;\n  peak = agents alive at once; idle0 = agents that served nothing; churn = launches after "
        "the last answer;\n  machine/ours/rmq/other = cores busy (whole machine, this run's processes, RabbitMQ, the "
        "rest); load = max 1-min load average"
    )
    print()
    print(f"Agents (seconds since the profile started; idle_ttl_s {s['idle_ttl_s']:g})")
    header = (
        f"{'agent':<30}{'phase':<9}{'launch':>8}{'->hot':>7}{'->1st':>7}{'served':>8}{'rps':>7}"
        f"{'last':>8}{'->drain':>9}{'err':>7}{'->exit':>8}{'exit':>7}"
    )
    print_header(header)
    never_hot = [a for a in report.agents if a.hot_s is None]
    for a in report.agents:
        if a.hot_s is None and len(never_hot) > 8:
            continue  # a crash loop: summarised below the table
        print(
            f"{a.agent_id:<30}{a.phase:<9}{_fmt(a.launched_s):>8}{_fmt(a.launch_to_hot_s):>7}"
            f"{_fmt(a.launch_to_first_served_s):>7}{_fmt(a.served):>8}{_fmt(a.busy_rps, 1):>7}"
            f"{_fmt(a.last_served_s):>8}{_fmt(a.idle_s):>9}{_fmt(a.idle_error_s):>7}"
            f"{_fmt(a.last_served_to_exit_s):>8}{a.exit_reason or '-':>7}"
        )
    if len(never_hot) > 8:
        reasons = Counter(a.exit_reason for a in never_hot)
        print(
            f"  ... and {len(never_hot)} agent(s) that never got hot, launched between {never_hot[0].launched_s} s "
            f"and {never_hot[-1].launched_s} s: {dict(reasons)} (all in the JSON)"
        )
    print(
        "  ->hot, ->1st: from launch; last: last served request (backend poll midpoint); ->drain: last served (or hot) "
        "-> draining\n  (the idle decision), err = that - idle_ttl_s; ->exit: -> process exit"
    )
    print()
    print("Scaler decisions (t in s since the profile started)")
    header = f"{'t':>7}{'backlog':>9}{'rps':>7}{'desired':>9}{'launched':>10}{'hot':>5}{'start':>7}{'pend':>6}"
    print_header(header)
    for d in report.decisions:
        print(
            f"{d['at_s']:>7.2f}{d['backlog']:>9}{d['throughput_rps']:>7.2f}{d['desired']:>9}{d['launched']:>10}"
            f"{d['agents_hot']:>5}{d['agents_starting']:>7}{d['launches_pending']:>6}"
        )
    print()
    print(
        f"answered {s['answered_ok']}/{s['requests']}; {s['agents_launched']} agent launches (max_agents "
        f"{s['max_agents']}, peak alive {s['peak_alive']}); per-agent rps measured {_fmt(s['measured_agent_rps'])} "
        f"(nominal {s['nominal_agent_rps']:g}); launch lag {s['launch_lag_s']}"
    )
    print(
        f"launch -> hot median {_fmt(s['launch_to_hot_s_median'])} max {_fmt(s['launch_to_hot_s_max'])}; "
        f"launch -> first served median {_fmt(s['launch_to_first_served_s_median'])} "
        f"max {_fmt(s['launch_to_first_served_s_max'])}"
    )
    print(
        f"idle exit: last served -> draining median {_fmt(s['idle_s_median'])} (min {_fmt(s['idle_s_min'])}, "
        f"max {_fmt(s['idle_s_max'])}) vs idle_ttl_s {s['idle_ttl_s']:g}; -> process exit median "
        f"{_fmt(s['last_served_to_exit_s_median'])} max {_fmt(s['last_served_to_exit_s_max'])}; "
        f"poll resolution <= {_fmt(s['served_window_s_max'])}"
    )
    print(
        f"scaler ticks {s['ticks']} (mean {_fmt(s['tick_s_mean'], 3)} s, max {_fmt(s['tick_s_max'], 3)} s); "
        f"1-min load average min/mean/max {_fmt(s['loadavg_1m_min'])}/{_fmt(s['loadavg_1m_mean'])}/"
        f"{_fmt(s['loadavg_1m_max'])} on {report.environment.get('cpus')} cores; profile took {s['total_s']} s"
    )
    print_notes(report.notes, json_path)


# ---------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scaler_burst", description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=3.0, help="idle before the first burst [3]")
    parser.add_argument("--burst1", type=int, default=300, help="requests in the first burst [300]")
    parser.add_argument("--burst2", type=int, default=100, help="requests in the second burst [100]")
    parser.add_argument("--trickle-s", type=float, default=10.0, help="how long the trickle lasts [10]")
    parser.add_argument("--trickle-rps", type=float, default=1.0, help="trickle requests per second [1]")
    parser.add_argument("--fake-delay-ms", type=int, default=100, help="the fake backend's time per answer [100]")
    parser.add_argument("--max-inflight", type=int, default=4)
    parser.add_argument("--max-agents", type=int, default=4)
    parser.add_argument("--target-drain-s", type=float, default=5.0)
    parser.add_argument("--idle-ttl-s", type=float, default=3.0)
    parser.add_argument("--heartbeat-s", type=float, default=0.5)
    parser.add_argument("--tick-s", type=float, default=1.0, help="the scaler's tick, as `hotq scale` [1]")
    parser.add_argument("--poll-s", type=float, default=0.1, help="backend /_stats polling interval [0.1]")
    parser.add_argument("--settle-s", type=float, default=2.0, help="idle after the agents left, per phase [2]")
    add_shared_options(parser, keep_logs="keep the API/agent/backend logs in bench/results")
    return parser.parse_args(argv)


def kill_leftovers(timeout: float = 10.0) -> list[int]:
    """SIGTERM, then SIGKILL, any descendant of this process still alive (by pid); return their pids."""

    def descendants() -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                except (OSError, IndexError):
                    continue
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry.name))
        found, todo = [], [os.getpid()]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    left = descendants()
    for pid in left:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while descendants() and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in descendants():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _logs(workdir: Path) -> list[Path]:
    return [*workdir.glob("*.log"), *workdir.glob("logs/*.log"), *workdir.glob("data/logs/*.log")]


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(parse_args(argv))
    configure_logging("warning", force_json=True)  # the in-process scaler logs every decision at info
    report = Report(
        settings=asdict(settings) | {"fake_command": FAKE_BACKEND_COMMAND, "max_queue_wait_s": QUEUE_WAIT_S}
    )

    def cleanup(workdir: Path) -> None:
        leftovers = kill_leftovers()
        if leftovers:
            print(f"killed leftover processes {leftovers}", file=sys.stderr)
        if settings.keep_logs:
            keep_logs(report, "scaler_burst", _logs(workdir))

    return run_bench(
        run,
        settings,
        report,
        "scaler_burst",
        print_report,
        logs=lambda workdir: sorted(_logs(workdir)),
        tail_lines=15,
        cleanup=cleanup,
    )


if __name__ == "__main__":
    sys.exit(main())

"""The scaler: each model's agent count follows its queue.

Every tick (≤ 1 s), per model: the backlog (ready requests over its lanes), the
agents the directory knows by state, launches not yet announced, and the measured
throughput of hot agents. It wants enough agents for the backlog to drain within
`target_drain_s`, never fewer than `min_hot`, never more than `max_agents`;
launches in progress count as capacity, so nodes waiting in a batch scheduler
do not cause overshoot. It only ever launches: agents leave on their own when
idle, so the scaler never kills an agent that has work.

Placement: the model's clusters in order of preference, skipping those offline,
at `max_nodes` or backing off after failed agents (1 s doubling to 60 s),
preferring the shortest measured cold start (a cluster not measured yet is
tried first, so it gets measured). Per-agent throughput is remembered per model,
so a second burst is sized from what the first one measured.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import structlog
from aio_pika.abc import AbstractChannel

from broker import topology
from broker.config import Config, ModelConfig
from broker.connection import connect
from broker.messages import AgentState, AgentStatus, Lane
from hpc_agents.decisions import Decision, DecisionLog, decision_log_path
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers import Launch, Launcher
from ops.metrics import ScalerMetrics

log = structlog.get_logger("hotq.scaler")

# Requests/s one agent is assumed to serve before any has been measured: a
# deliberately modest guess, so a cold backlog starts more than one node.
UNMEASURED_AGENT_RPS = 1.0
COLD_START_SMOOTHING = 0.5
# Agents that left for these reasons were fine; any other exit counts as a failure.
HEALTHY_EXITS = frozenset({"idle", "signal", "walltime", "not_started"})
MAX_LAUNCH_BACKOFF_S = 60.0  # weight of the newest measurement in the running estimate


@dataclasses.dataclass
class _Rate:
    served: int
    uptime_s: float
    rps: float = 0.0


class Scaler:
    def __init__(
        self,
        config: Config,
        launchers: dict[str, Launcher],
        directory: AgentDirectory,
        decisions: DecisionLog | None = None,
        tick_s: float = 1.0,
        metrics: ScalerMetrics | None = None,
    ) -> None:
        self.config = config
        self.launchers = launchers
        self.directory = directory
        self.decisions = decisions
        self.tick_s = tick_s
        self.metrics = metrics
        self.launches: dict[str, Launch] = {}  # agent_id -> launch, until its agent exits
        self.summaries: list[dict[str, object]] = []  # what exited agents reported
        self.cold_start_s: dict[str, float] = {}  # cluster -> measured launch-to-hot time
        self._rates: dict[str, _Rate] = {}  # agent_id -> served-requests rate
        self._hot_seen: set[str] = set()
        self._last_desired: dict[str, int] = {}
        self._online: dict[str, bool] = {}  # cluster -> could take launches at this tick
        # model -> last measured requests/s per agent (from earlier runs too)
        self._model_rps: dict[str, float] = decisions.measured_throughput() if decisions else {}
        self._failures: dict[str, int] = {}  # cluster -> agents that failed in a row
        self._backoff_until: dict[str, float] = {}  # cluster -> no launches before (monotonic)

    async def run(self, channel: AbstractChannel, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.tick(channel)
            try:
                await asyncio.wait_for(stop.wait(), self.tick_s)
            except TimeoutError:
                pass

    async def tick(self, channel: AbstractChannel) -> list[Decision]:
        self._collect_finished()
        self._measure()
        # Launchers may ask a remote service (Globus Compute): never on the event loop.
        self._online = {name: await asyncio.to_thread(launcher.online) for name, launcher in self.launchers.items()}
        made = []
        for model, model_config in self.config.models.items():
            backlog = 0
            for lane in Lane:
                ready, _ = await topology.queue_depth(channel, model, lane)
                backlog += ready
            pinned_backlog = {}
            for cluster in self._clusters_of(model_config):
                pinned_backlog[cluster], _ = await topology.queue_depth(channel, model, Lane.INTERACTIVE, cluster)
            decision = await self._decide(model, model_config, backlog, pinned_backlog)
            if decision is not None:
                made.append(decision)
        return made

    def _collect_finished(self) -> None:
        for agent_id, launch in list(self.launches.items()):
            if launch.future.done():
                del self.launches[agent_id]
                error = launch.future.exception()
                summary = {"exit_reason": "launch_failed", "error": repr(error)} if error else launch.future.result()
                self.summaries.append({"agent_id": agent_id, "cluster": launch.cluster, **summary})
                log.info("agent_finished", agent_id=agent_id, cluster=launch.cluster, summary=summary)
                self._note_outcome(launch.cluster, str(summary.get("exit_reason")))

    def _note_outcome(self, cluster: str, exit_reason: str) -> None:
        """Back off a cluster whose agents fail, so a broken node image is not relaunched every tick."""
        if exit_reason in HEALTHY_EXITS:
            self._failures.pop(cluster, None)
            return
        failures = self._failures.get(cluster, 0) + 1
        self._failures[cluster] = failures
        pause = min(MAX_LAUNCH_BACKOFF_S, 2.0 ** (failures - 1))
        self._backoff_until[cluster] = time.monotonic() + pause
        log.warning("cluster_backoff", cluster=cluster, failures=failures, exit_reason=exit_reason, pause_s=pause)

    def _measure(self) -> None:
        """Update per-agent throughput and per-cluster cold start from the directory."""
        for status in self.directory.agents():
            self._measure_rate(status)
            launch = self.launches.get(status.agent_id)
            if status.state is AgentState.HOT and status.agent_id not in self._hot_seen:
                self._hot_seen.add(status.agent_id)
                if launch is not None:
                    took = time.monotonic() - launch.launched_at
                    before = self.cold_start_s.get(launch.cluster)
                    self.cold_start_s[launch.cluster] = (
                        took if before is None else before + COLD_START_SMOOTHING * (took - before)
                    )

    def _measure_rate(self, status: AgentStatus) -> None:
        if not status.heartbeat:
            return
        rate = self._rates.get(status.agent_id)
        if rate is None or status.uptime_s <= rate.uptime_s:
            self._rates[status.agent_id] = _Rate(status.served, status.uptime_s)
            return
        served = status.served - rate.served
        if served > 0:  # an idle agent says nothing about its capacity
            rate.rps = served / (status.uptime_s - rate.uptime_s)
        rate.served, rate.uptime_s = status.served, status.uptime_s

    def _agent_rps(self, model: str, agents: list[AgentStatus], backlog: int) -> float:
        """Requests/s one agent of the model can serve, as last measured while work was waiting.

        Only then is the served rate the agents' capacity; without a backlog it is the demand.
        """
        measured = [self._rates[a.agent_id].rps for a in agents if a.agent_id in self._rates]
        measured = [rps for rps in measured if rps > 0]
        if measured and (backlog > 0 or model not in self._model_rps):
            self._model_rps[model] = max(measured)
        return self._model_rps.get(model, UNMEASURED_AGENT_RPS)

    def _clusters_of(self, model_config: ModelConfig) -> list[str]:
        """The model's clusters in order of preference (all, when it names none)."""
        return model_config.clusters or list(self.launchers)

    async def _launch(self, cluster: str, model: str) -> None:
        launch = await asyncio.to_thread(self.launchers[cluster].launch, model)
        self.launches[launch.agent_id] = launch

    async def _decide(
        self, model: str, model_config: ModelConfig, backlog: int, pinned_backlog: dict[str, int]
    ) -> Decision | None:
        agents = self.directory.agents(model)
        announced = {a.agent_id for a in agents}
        hot = [a for a in agents if a.state is AgentState.HOT]
        starting = [a for a in agents if a.state in (AgentState.STARTING, AgentState.LOADING)]
        pending = [x for x in self.launches.values() if x.model == model and x.agent_id not in announced]
        capacity = len(hot) + len(starting) + len(pending)  # draining agents are leaving: not capacity
        backlog += sum(pinned_backlog.values())
        rps = self._agent_rps(model, hot, backlog)
        wanted = math.ceil(backlog / (rps * model_config.target_drain_s)) if backlog else 0
        desired = min(max(wanted, model_config.min_hot), model_config.max_agents)
        to_launch = max(0, desired - capacity)
        placed: list[str] = []
        for _ in range(to_launch):
            cluster = self._place(model_config)
            if cluster is None:
                break
            await self._launch(cluster, model)
            placed.append(cluster)
        # Requests pinned to a cluster can only run there: it needs an agent of its own.
        for cluster, waiting in pinned_backlog.items():
            serving = {a.agent_id for a in hot + starting if a.cluster == cluster}
            serving |= {x.agent_id for x in self.launches.values() if x.model == model and x.cluster == cluster}
            if waiting and not serving and self._has_room(cluster):
                await self._launch(cluster, model)
                placed.append(cluster)
        if not placed and desired == self._last_desired.get(model):
            return None  # nothing new to say
        self._last_desired[model] = desired
        reason = (
            f"backlog {backlog} at {rps:.2f} req/s per agent needs {wanted} agent(s) to drain within "
            f"{model_config.target_drain_s:g} s; min_hot {model_config.min_hot}, max_agents "
            f"{model_config.max_agents} -> {desired}; have {len(hot)} hot, {len(starting)} starting, "
            f"{len(pending)} launching"
        )
        if to_launch and len(placed) < to_launch:
            reason += f"; {to_launch - len(placed)} launch(es) found no cluster (offline or at max_nodes)"
        decision = Decision(
            model=model,
            backlog=backlog,
            agents_hot=len(hot),
            agents_starting=len(starting),
            launches_pending=len(pending),
            throughput_rps=round(self._model_rps.get(model, 0.0), 3),  # 0: not measured yet
            desired=desired,
            launched=len(placed),
            clusters=",".join(placed),
            reason=reason,
        )
        log.info("scaler_decision", **{k: v for k, v in dataclasses.asdict(decision).items() if k != "at"})
        if self.decisions is not None:
            self.decisions.record(decision)
        if self.metrics is not None:
            self.metrics.record(decision)
        return decision

    def _place(self, model_config: ModelConfig) -> str | None:
        candidates = [
            (self.cold_start_s.get(cluster, 0.0), index, cluster)
            for index, cluster in enumerate(self._clusters_of(model_config))
            if self._has_room(cluster)
        ]
        return min(candidates)[2] if candidates else None

    def _has_room(self, cluster: str) -> bool:
        """The cluster's launcher exists, is online and below its max_nodes."""
        launcher = self.launchers.get(cluster)
        return (
            launcher is not None
            and self._online.get(cluster, False)
            and time.monotonic() >= self._backoff_until.get(cluster, 0.0)
            and self._nodes_in_use(cluster) < launcher.max_nodes
        )

    def _nodes_in_use(self, cluster: str) -> int:
        announced = {a.agent_id for a in self.directory.agents() if a.cluster == cluster}
        launched = {x.agent_id for x in self.launches.values() if x.cluster == cluster}
        return len(announced | launched)


IMPLICIT_CLUSTER = "local"


def build_launchers(config: Config) -> dict[str, Launcher]:
    """One launcher per configured cluster; without any, this machine as cluster "local"."""
    from hpc_agents.launchers.local import LocalLauncher

    if not config.clusters:
        room = sum(model.max_agents for model in config.models.values())
        return {IMPLICIT_CLUSTER: LocalLauncher(IMPLICIT_CLUSTER, config, max_nodes=room)}
    launchers: dict[str, Launcher] = {}
    for name, cluster in config.clusters.items():
        if cluster.launcher == "local":
            launchers[name] = LocalLauncher(name, config)
        else:
            from hpc_agents.launchers.globus_compute import GlobusComputeLauncher

            launchers[name] = GlobusComputeLauncher(name, config)
    return launchers


async def run_scaler(
    config: Config, launchers: dict[str, Launcher], stop: asyncio.Event, metrics: ScalerMetrics | None = None
) -> Scaler:
    """Scale until `stop` is set, then shut the launchers down (their agents drain)."""
    connection = await connect(config.amqp_url, "scaler", config.amqp_tls)
    try:
        directory = AgentDirectory(config.heartbeat_s)
        await directory.subscribe(connection)
        channel = await connection.channel()
        # Also the queues the API pins requests to: with per-role RabbitMQ users the scaler's
        # role creates request queues, which the API's role may not (ops/rabbitmq/README.md).
        await topology.declare_model_queues(channel, list(config.models), pinned=config.pinned_clusters())
        decisions = DecisionLog(decision_log_path(config.data_dir))
        scaler = Scaler(config, launchers, directory, decisions, metrics=metrics)
        # Agents already running announce themselves within a heartbeat: hear them first.
        try:
            await asyncio.wait_for(stop.wait(), config.heartbeat_s + 0.5)
        except TimeoutError:
            pass
        log.info("scaler_started", models=list(config.models), clusters=list(launchers))
        await scaler.run(channel, stop)
        return scaler
    finally:
        for launcher in launchers.values():
            await asyncio.to_thread(launcher.shutdown)
        await connection.close()

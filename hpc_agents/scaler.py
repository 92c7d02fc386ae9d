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
tried first, so it gets measured). Every model's `min_hot` agents are placed
before any burst, and a burst leaves the nodes other models still need for their
`min_hot`. Per-agent throughput and per-cluster cold starts are remembered (in
the decision log), so a restarted scaler sizes and estimates from experience.

Each tick it also publishes a `ModelOutlook` per model on the events exchange:
whether capacity is there or coming, and if not, why (`hpc_agents/outlook.py`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange

from broker import messages, topology
from broker.config import Config, ModelConfig
from broker.connection import BROKER_LOST, connect_with
from broker.messages import AgentState, AgentStatus, Lane, ModelOutlook
from hpc_agents.decisions import Decision, DecisionLog, decision_log_path
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers import Launch, Launcher
from hpc_agents.outlook import Facts, failure_text, outlook
from ops.metrics import ScalerMetrics

log = structlog.get_logger("hotq.scaler")

# Requests/s one agent is assumed to serve before any has been measured: a
# deliberately modest guess, so a cold backlog starts more than one node.
UNMEASURED_AGENT_RPS = 1.0
COLD_START_SMOOTHING = 0.5  # weight of the newest measurement in the running estimate
# Agents that left for these reasons were fine; any other exit counts as a failure.
HEALTHY_EXITS = frozenset({"idle", "signal", "walltime", "not_started"})
MAX_LAUNCH_BACKOFF_S = 60.0


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
        # cluster -> measured launch-to-hot time (from earlier runs too)
        self.cold_start_s: dict[str, float] = decisions.cold_starts() if decisions else {}
        self.outlooks: dict[str, ModelOutlook] = {}  # model -> what this tick published
        self._failed: dict[str, str] = {}  # model -> its last launch failed (until an agent goes hot)
        self._floor_short: dict[str, int] = {}  # model -> min_hot agents it still lacks after this tick
        self._events: AbstractExchange | None = None
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
            try:
                await self.tick(channel)
            except BROKER_LOST as exc:  # its node went away: the connection moves to another one
                log.warning("scaler_tick_skipped", error=repr(exc))
            try:
                await asyncio.wait_for(stop.wait(), self.tick_s)
            except TimeoutError:
                pass

    async def tick(self, channel: AbstractChannel) -> list[Decision]:
        self._collect_finished()
        self._measure()
        # Launchers may ask a remote service (Globus Compute): never on the event loop.
        self._online = {name: await asyncio.to_thread(launcher.online) for name, launcher in self.launchers.items()}
        backlogs: dict[str, tuple[int, dict[str, int]]] = {}
        for model, model_config in self.config.models.items():
            backlog = 0
            for lane in Lane:
                ready, _ = await topology.queue_depth(channel, model, lane)
                backlog += ready
            pinned_backlog = {}
            for cluster in self._clusters_of(model_config):
                pinned_backlog[cluster], _ = await topology.queue_depth(channel, model, Lane.INTERACTIVE, cluster)
            backlogs[model] = (backlog, pinned_backlog)
        # Floors first: no burst of one model may keep another below its min_hot.
        floors = {model: await self._place_floor(model, config) for model, config in self.config.models.items()}
        made = []
        for model, model_config in self.config.models.items():
            decision = await self._decide(model, model_config, *backlogs[model], floors[model])
            if decision is not None:
                made.append(decision)
            await self._publish(channel, model, model_config, sum(backlogs[model][1].values()) + backlogs[model][0])
        return made

    def _capacity(self, model: str) -> tuple[list[AgentStatus], list[AgentStatus], list[Launch]]:
        """The model's hot agents, its starting ones, and its launches not announced yet."""
        agents = self.directory.agents(model)
        announced = {a.agent_id for a in agents}
        hot = [a for a in agents if a.state is AgentState.HOT]
        starting = [a for a in agents if a.state in (AgentState.STARTING, AgentState.LOADING)]
        pending = [x for x in self.launches.values() if x.model == model and x.agent_id not in announced]
        return hot, starting, pending

    async def _place_floor(self, model: str, model_config: ModelConfig) -> list[str]:
        """Launch what the model lacks of its min_hot; remember what could not be placed."""
        hot, starting, pending = self._capacity(model)
        short = max(0, min(model_config.min_hot, model_config.max_agents) - len(hot) - len(starting) - len(pending))
        placed: list[str] = []
        while len(placed) < short and (cluster := self._place(model_config)) is not None:
            await self._launch(cluster, model)
            placed.append(cluster)
        self._floor_short[model] = short - len(placed)
        return placed

    async def _publish(self, channel: AbstractChannel, model: str, model_config: ModelConfig, backlog: int) -> None:
        hot, starting, pending = self._capacity(model)
        now = time.monotonic()
        on_the_way = {a.agent_id for a in starting} | {x.agent_id for x in pending}
        launching = [(x.cluster, now - x.launched_at) for x in self.launches.values() if x.agent_id in on_the_way]
        clusters = self._clusters_of(model_config)
        retry_in = max([self._backoff_until.get(c, 0.0) - now for c in clusters] + [0.0])
        facts = Facts(
            model=model,
            hot=len(hot),
            hot_with_room=sum(a.inflight < model_config.max_inflight for a in hot),
            starting=len([a for a in starting if a.agent_id not in self.launches]),  # launched ones: in `launching`
            launching=launching,
            max_agents=model_config.max_agents,
            backlog=backlog,
            agent_rps=self._model_rps.get(model, 0.0),
            room=[c for c in clusters if self._has_room(c, self._reserved(c, model))],
            blocked={c: problem for c in clusters if (problem := self._why_no_room(c, model))},
            serving={a.cluster for a in starting if a.agent_id in on_the_way}
            | {c for c, _ in launching}
            | {a.cluster for a in hot if a.inflight < model_config.max_inflight},
            failure=self._failed.get(model),
            retry_failed_in_s=retry_in,
            cold_start_s=self.cold_start_s,
        )
        self.outlooks[model] = outlook(facts)
        try:
            if self._events is None:
                self._events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
            message = aio_pika.Message(messages.encode(self.outlooks[model]), expiration=10)
            await self._events.publish(message, routing_key=topology.OUTLOOK_ROUTING_KEY)
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            self._events = None  # the channel may be gone: look the exchange up again next tick
            log.warning("outlook_not_published", model=model, error=repr(exc))

    def _collect_finished(self) -> None:
        for agent_id, launch in list(self.launches.items()):
            if launch.future.done():
                del self.launches[agent_id]
                error = launch.future.exception()
                summary = {"exit_reason": "launch_failed", "error": repr(error)} if error else launch.future.result()
                self.summaries.append({"agent_id": agent_id, "cluster": launch.cluster, **summary})
                log.info("agent_finished", agent_id=agent_id, cluster=launch.cluster, summary=summary)
                exit_reason = str(summary.get("exit_reason"))
                self._note_outcome(launch.cluster, exit_reason)
                if exit_reason not in HEALTHY_EXITS and agent_id not in self._hot_seen:  # it never served
                    self._failed[launch.model] = failure_text(launch.cluster, summary)

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
                self._failed.pop(status.model, None)  # the model serves again
                if launch is not None:
                    took = time.monotonic() - launch.launched_at
                    before = self.cold_start_s.get(launch.cluster)
                    estimate = took if before is None else before + COLD_START_SMOOTHING * (took - before)
                    self.cold_start_s[launch.cluster] = estimate
                    if self.decisions is not None:
                        self.decisions.record_cold_start(launch.cluster, estimate)

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
        self, model: str, model_config: ModelConfig, backlog: int, pinned_backlog: dict[str, int], floor: list[str]
    ) -> Decision | None:
        hot, starting, pending = self._capacity(model)
        capacity = len(hot) + len(starting) + len(pending)  # draining agents are leaving: not capacity
        backlog += sum(pinned_backlog.values())
        rps = self._agent_rps(model, hot, backlog)
        wanted = math.ceil(backlog / (rps * model_config.target_drain_s)) if backlog else 0
        desired = min(max(wanted, model_config.min_hot), model_config.max_agents)
        to_launch = max(0, desired - capacity)
        placed: list[str] = list(floor)
        for _ in range(to_launch):
            cluster = self._place(model_config, model)
            if cluster is None:
                break
            await self._launch(cluster, model)
            placed.append(cluster)
        # Requests pinned to a cluster can only run there: it needs an agent of its own.
        for cluster, waiting in pinned_backlog.items():
            serving = {a.agent_id for a in hot + starting if a.cluster == cluster}
            serving |= {x.agent_id for x in self.launches.values() if x.model == model and x.cluster == cluster}
            if waiting and not serving and self._has_room(cluster, self._reserved(cluster, model)):
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
        if floor:
            reason += f"; {len(floor)} launched first for min_hot"
        if self._floor_short.get(model):
            reason += f"; {self._floor_short[model]} min_hot launch(es) found no cluster"
        if to_launch and len(placed) - len(floor) < to_launch:
            short = to_launch - len(placed) + len(floor)
            reason += f"; {short} launch(es) found no cluster (offline, at max_nodes, or kept for min_hot)"
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

    def _place(self, model_config: ModelConfig, burst_of: str | None = None) -> str | None:
        """Where the next agent goes; a burst (`burst_of` the model) leaves other models' min_hot room."""
        candidates = [
            (self.cold_start_s.get(cluster, 0.0), index, cluster)
            for index, cluster in enumerate(self._clusters_of(model_config))
            if self._has_room(cluster, self._reserved(cluster, burst_of))
        ]
        return min(candidates)[2] if candidates else None

    def _reserved(self, cluster: str, model: str | None) -> int:
        """Nodes of `cluster` that other models still need for their min_hot (none for a floor launch)."""
        if model is None:
            return 0
        return sum(
            short
            for other, short in self._floor_short.items()
            if other != model and short and cluster in self._clusters_of(self.config.models[other])
        )

    def _has_room(self, cluster: str, reserved: int = 0) -> bool:
        """The cluster's launcher exists, is online and below its max_nodes (less `reserved`)."""
        return self._why_no_room(cluster, reserved=reserved) is None

    def _why_no_room(self, cluster: str, model: str | None = None, reserved: int | None = None) -> str | None:
        launcher = self.launchers.get(cluster)
        if reserved is None:
            reserved = self._reserved(cluster, model)
        if launcher is None or not self._online.get(cluster, False):
            return "offline"
        if (pause := self._backoff_until.get(cluster, 0.0) - time.monotonic()) > 0:
            return f"backing off {pause:.0f} s after {self._failures.get(cluster, 0)} failed agent(s)"
        if self._nodes_in_use(cluster) + reserved >= launcher.max_nodes:
            kept = f", {reserved} kept for other models' min_hot" if reserved else ""
            return f"at max_nodes {launcher.max_nodes}{kept}"
        return None

    def _nodes_in_use(self, cluster: str) -> int:
        announced = {a.agent_id for a in self.directory.agents() if a.cluster == cluster}
        launched = {x.agent_id for x in self.launches.values() if x.cluster == cluster}
        return len(announced | launched)


async def run_scaler(
    config: Config, launchers: dict[str, Launcher], stop: asyncio.Event, metrics: ScalerMetrics | None = None
) -> Scaler:
    """Scale until `stop` is set, then shut the launchers down (their agents drain)."""
    connection = await connect_with(config, "scaler")
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

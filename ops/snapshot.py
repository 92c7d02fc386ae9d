"""What operators watch, gathered in one place for all three views.

`hotq watch`, the API's /metrics and its /ops page all show one `Snapshot`:
per model and lane the queue's ready messages and consumers, the model's live
agents (from their announcements on the events exchange) by state and cluster
with their summed in-flight requests and tokens/s, and the scaler's last
decisions.

Queue numbers come from an idempotent declare, the only thing AMQP offers:
its `message_count` counts *ready* messages (in quorum queues too), never
unacked ones, so what is in flight is what the agents report.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter

import aio_pika
from aio_pika.abc import AbstractChannel

from broker import topology
from broker.config import Config
from broker.messages import AgentState, AgentStatus, Lane, ModelOutlook
from hpc_agents.decisions import Decision, DecisionLog, decision_log_path
from hpc_agents.directory import AgentDirectory

DECISIONS_SINCE_S = 3600.0
DECISION_LIMIT = 50  # the newest decisions a snapshot carries
_LIFECYCLE = list(AgentState)


@dataclasses.dataclass(frozen=True, slots=True)
class LaneSnapshot:
    lane: Lane
    depth: int | None  # ready messages; None when RabbitMQ could not be asked
    consumers: int | None


@dataclasses.dataclass(frozen=True, slots=True)
class AgentGroup:
    """How many of a model's agents are in one state on one cluster."""

    state: AgentState
    cluster: str
    count: int


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSnapshot:
    model: str
    lanes: tuple[LaneSnapshot, ...]
    agents: tuple[AgentStatus, ...]  # each live agent's latest announcement
    groups: tuple[AgentGroup, ...]
    inflight: int  # summed over the model's agents (a plain `hotq worker` does not announce)
    tokens_per_s: float  # summed over hot agents
    outlook: ModelOutlook | None  # the scaler's word on its capacity (None without a scaler)

    def agents_in(self, state: AgentState) -> int:
        return sum(group.count for group in self.groups if group.state is state)


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: float  # unix time
    models: tuple[ModelSnapshot, ...]
    decisions: tuple[Decision, ...]  # oldest first


async def take_snapshot(
    channel: AbstractChannel, directory: AgentDirectory, config: Config, decisions: DecisionLog | None
) -> Snapshot:
    """One consistent look at every configured model. `channel` must come from a robust connection."""
    models = []
    for model in config.models:
        lanes = tuple([await _lane_snapshot(channel, model, lane) for lane in Lane])
        agents = tuple(sorted(directory.agents(model), key=lambda status: status.agent_id))
        counts = Counter((status.state, status.cluster) for status in agents)
        models.append(
            ModelSnapshot(
                model=model,
                lanes=lanes,
                agents=agents,
                groups=tuple(
                    AgentGroup(state, cluster, n) for (state, cluster), n in sorted(counts.items(), key=_order)
                ),
                inflight=sum(status.inflight for status in agents),
                tokens_per_s=round(sum(s.tokens_per_s for s in agents if s.state is AgentState.HOT), 2),
                outlook=directory.outlook(model),
            )
        )
    return Snapshot(taken_at=time.time(), models=tuple(models), decisions=_recent_decisions(decisions))


def prefix_hit_rate(agent: AgentStatus) -> float | None:
    """The share of prompt tokens its backend found in its prefix cache (None before any query)."""
    if agent.prefix_cache_queries <= 0:
        return None
    return round(agent.prefix_cache_hits / agent.prefix_cache_queries, 3)


def capacity_text(model: ModelSnapshot) -> str:
    """The scaler's outlook in words: hot, or starting with the expected seconds until hot, or why not."""
    outlook = model.outlook
    if outlook is None:
        return "no scaler heard"
    expected = f", hot in ~{outlook.expected_hot_s:.0f} s" if outlook.expected_hot_s > 0 else ""
    text = f"{outlook.state.value}{expected}"
    return text if outlook.coming else f"{text}; nothing coming: {outlook.reason}"


def _order(item: tuple[tuple[AgentState, str], int]) -> tuple[int, str]:
    (state, cluster), _ = item
    return _LIFECYCLE.index(state), cluster  # in lifecycle order, not alphabetical


async def _lane_snapshot(channel: AbstractChannel, model: str, lane: Lane) -> LaneSnapshot:
    try:
        depth, consumers = await topology.queue_depth(channel, model, lane)
    except (aio_pika.exceptions.AMQPError, ConnectionError):
        return LaneSnapshot(lane, None, None)  # the views say "unknown" rather than fail
    return LaneSnapshot(lane, depth, consumers)


def open_decisions(config: Config) -> DecisionLog | None:
    """The scaler's decision log in `data_dir`, or None while no scaler has written one."""
    path = decision_log_path(config.data_dir)
    return DecisionLog(path) if path.exists() else None


def _recent_decisions(decisions: DecisionLog | None) -> tuple[Decision, ...]:
    if decisions is None:
        return ()
    names = {field.name for field in dataclasses.fields(Decision)}
    rows = decisions.recent(DECISIONS_SINCE_S)[-DECISION_LIMIT:]
    # The table may have grown columns this build does not know: keep the known ones.
    return tuple(Decision(**{key: value for key, value in row.items() if key in names}) for row in rows)

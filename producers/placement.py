"""Where a request waits: the affinity queue of the agent whose KV cache likely holds its prefix.

Among a model's hot agents (their announcements, `AgentDirectory`), the request's
affinity key (`broker.affinity`) ranks the agents by rendezvous hashing; the first with
a free slot by its last heartbeat is chosen. The request waits in that agent's
affinity queue for at most its lane's `spill_after_ms`, then in the model's shared
queue, which every agent takes from: placement never makes a request wait behind a
busy agent for longer than that. No key, affinity off, fewer than two hot agents, or
every agent full: the shared queue, as without affinity.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from broker import affinity, topology
from broker.config import Config
from broker.messages import AgentState, AgentStatus, Lane


@dataclass(frozen=True, slots=True)
class Placed:
    """An affinity queue to publish to, and when its request spills (unix seconds)."""

    queue: str
    agent_id: str
    spill_at: float
    spill_after_ms: int


class Placement:
    def __init__(self, config: Config, agents: Callable[[str], list[AgentStatus]]) -> None:
        """`agents(model)`: the model's live agents' latest announcements."""
        self._config = config
        self._agents = agents

    def place(self, model: str, lane: Lane, key: bytes | None) -> Placed | None:
        """The affinity queue for a request with this key, or None: the model's shared queue."""
        model_config = self._config.models.get(model)
        if key is None or model_config is None or not model_config.affinity_on:
            return None
        hot = {a.agent_id: a for a in self._agents(model) if a.state is AgentState.HOT}
        if len(hot) < 2:
            return None  # one agent serves the shared queue alike, with no spill wait
        for agent_id in affinity.rank(key, hot):
            if hot[agent_id].inflight < model_config.max_inflight:
                spill_ms = getattr(model_config.spill_after_ms, lane.value)
                return Placed(
                    topology.affinity_queue_name(model, lane, agent_id),
                    agent_id,
                    time.time() + spill_ms / 1000,
                    spill_ms,
                )
        return None

"""Where a request waits: the affinity queue of the agent whose KV cache likely holds its prefix.

Among a model's hot agents (their announcements, `AgentDirectory`), the request's
affinity key (`broker.affinity`) ranks the agents by rendezvous hashing. A key this
process has placed before goes where it went (its prefix is cached there); a new one,
which no cache holds yet, goes to the less loaded of its first two choices, so unrelated
prompts spread evenly instead of as unevenly as they hash. An agent is passed over when
its last heartbeat shows no free slot, or when it holds more than `1 + BALANCE_SLACK`
times its share of this process's unfinished requests (heartbeats are seconds old, these
counts are not). The request waits in that agent's
affinity queue for at most its lane's `spill_after_ms`, then in the model's shared
queue, which every agent takes from: placement never makes a request wait behind a
busy agent for longer than that. No key, affinity off, fewer than two hot agents, or
every agent full: the shared queue, as without affinity.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
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


BALANCE_SLACK = 1.0
KEYS_REMEMBERED = 100_000


class Placement:
    def __init__(self, config: Config, agents: Callable[[str], list[AgentStatus]]) -> None:
        """`agents(model)`: the model's live agents' latest announcements."""
        self._config = config
        self._agents = agents
        self._outstanding: Counter[str] = Counter()  # agent id -> requests placed and not finished
        self._homes: OrderedDict[bytes, str] = OrderedDict()  # key -> the agent it went to last

    def finished(self, placed: Placed) -> None:
        """A request `place` placed (and its caller counted, `counted=True`) is over."""
        self._outstanding[placed.agent_id] -= 1
        if self._outstanding[placed.agent_id] <= 0:
            del self._outstanding[placed.agent_id]

    def place(self, model: str, lane: Lane, key: bytes | None, counted: bool = False) -> Placed | None:
        """The affinity queue for a request with this key, or None: the model's shared queue.
        `counted`: the caller calls `finished` when the request is over (its load counts till then)."""
        model_config = self._config.models.get(model)
        if key is None or model_config is None or not model_config.affinity_on:
            return None
        hot = {a.agent_id: a for a in self._agents(model) if a.state is AgentState.HOT}
        if len(hot) < 2:
            return None  # one agent serves the shared queue alike, with no spill wait
        share = (sum(self._outstanding[agent_id] for agent_id in hot) + 1) / len(hot)
        bound = math.ceil(share * (1 + BALANCE_SLACK))
        free = [
            agent_id
            for agent_id in affinity.rank(key, hot)
            if hot[agent_id].inflight < model_config.max_inflight and self._outstanding[agent_id] < bound
        ]
        if not free:
            return None
        home = self._homes.get(key)
        if home in free:
            chosen = home
        elif home is None:
            chosen = min(free[:2], key=lambda agent_id: self._outstanding[agent_id])
        else:
            chosen = free[0]
        self._remember(key, chosen)
        if counted:
            self._outstanding[chosen] += 1
        spill_ms: int = getattr(model_config.spill_after_ms, lane.value)
        return Placed(
            topology.affinity_queue_name(model, lane, chosen), chosen, time.time() + spill_ms / 1000, spill_ms
        )

    def _remember(self, key: bytes, agent_id: str) -> None:
        self._homes[key] = agent_id
        self._homes.move_to_end(key)
        if len(self._homes) > KEYS_REMEMBERED:
            self._homes.popitem(last=False)

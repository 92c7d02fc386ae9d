"""What the scaler tells the API about each model's capacity: there, coming, or not coming.

Pure: the scaler gathers the facts each tick (`Facts`), `outlook` turns them into the
`ModelOutlook` it publishes. Estimates come from measured cold starts per cluster; a
cluster not measured yet makes the estimate unknown (-1).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping

from broker.messages import ModelOutlook, ModelState

UNKNOWN = -1.0
NO_CLUSTER_RETRY_S = 30.0  # a retry after an offline or full cluster: nothing measures when it returns


@dataclasses.dataclass(frozen=True, slots=True)
class Facts:
    model: str
    hot: int
    hot_with_room: int  # hot agents with a free slot (as of their last heartbeat): they take work at once
    starting: int  # announced starting or loading
    launching: list[tuple[str, float]]  # (cluster, seconds since launch) of launches not hot yet
    max_agents: int
    backlog: int
    agent_rps: float  # requests/s one agent serves
    room: list[str]  # clusters that could take an agent of this model now
    blocked: dict[str, str]  # cluster -> why it cannot (offline, full, backing off N s)
    serving: set[str]  # clusters with a hot agent with a free slot, or one on its way
    failure: str | None  # the model's last launch failed, and no agent went hot since
    retry_failed_in_s: float  # when the scaler launches again after that failure
    cold_start_s: dict[str, float]  # cluster -> measured launch-to-hot seconds


def _expected_hot_s(facts: Facts) -> float:
    if facts.hot:
        return 0.0
    if facts.launching:
        remaining = [facts.cold_start_s[c] - age for c, age in facts.launching if c in facts.cold_start_s]
        return round(max(0.0, min(remaining)), 1) if remaining else UNKNOWN
    measured = [facts.cold_start_s[c] for c in facts.room if c in facts.cold_start_s]
    return round(min(measured), 1) if measured else UNKNOWN


def outlook(facts: Facts) -> ModelOutlook:
    capacity = facts.hot + facts.starting + len(facts.launching)
    state = ModelState.HOT if facts.hot else ModelState.STARTING if capacity else ModelState.COLD
    expected = _expected_hot_s(facts)
    reason, retry_after = "", 0.0
    if facts.failure is not None and not facts.hot:
        reason = f"the model's agent failed to start: {facts.failure}"
        retry_after = facts.retry_failed_in_s + max(0.0, expected)
    elif facts.starting or facts.launching or facts.hot_with_room:
        pass  # capacity is on its way, or an agent that just went hot is taking the work
    elif capacity >= facts.max_agents:
        reason = f"all {capacity} agent(s) (max_agents) are busy"
        retry_after = facts.backlog / max(facts.agent_rps * capacity, 1e-6) if facts.agent_rps else 1.0
    elif not facts.room:
        why = "; ".join(f"{cluster} {problem}" for cluster, problem in facts.blocked.items()) or "no cluster configured"
        reason = f"no cluster can take an agent of this model ({why})"
        retry_after = NO_CLUSTER_RETRY_S + max(0.0, expected)
    return ModelOutlook(
        model=facts.model,
        state=state,
        agents_hot=facts.hot,
        agents_starting=facts.starting + len(facts.launching),
        expected_hot_s=expected,
        coming=not reason,
        reason=reason,
        retry_after_s=round(max(1.0, retry_after), 1) if reason else 0.0,
        pinned={c: f"cluster {c}: {problem}" for c, problem in facts.blocked.items() if c not in facts.serving},
        sent_at=time.time(),
    )


def failure_text(cluster: str, summary: Mapping[str, object]) -> str:
    """An agent's failure in words, for the clients its requests now fail."""
    if error := summary.get("error"):
        return f"the launch on {cluster} failed: {error}"
    if summary.get("exit_reason") == "backend_failed":
        return f"its backend on {cluster} failed to start after {summary.get('backend_restarts', 0)} restart(s)"
    return f"the agent on {cluster} exited ({summary.get('exit_reason')})"

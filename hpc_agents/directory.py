"""What agents exist right now, read from their announcements on the events exchange.

The scaler and the ops views hold one `AgentDirectory`: it keeps each agent's
latest `AgentStatus` and forgets an agent once it stopped or its heartbeats
stopped for `missed_heartbeats` intervals (a node that died says nothing). It also
keeps the scaler's latest `ModelOutlook` per model, as long as the scaler keeps
sending them (at least `OUTLOOK_STALE_S`, however short the heartbeats).
"""

from __future__ import annotations

import time
from collections import Counter

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from broker import messages, topology
from broker.errors import WireError
from broker.messages import AgentState, AgentStatus, ModelOutlook

log = structlog.get_logger("hotq.directory")

OUTLOOK_STALE_S = 10.0  # the scaler sends one a second; a slow tick must not make it look gone


class AgentDirectory:
    def __init__(self, heartbeat_s: float, missed_heartbeats: int = 3) -> None:
        self._expire_after_s = heartbeat_s * missed_heartbeats
        self._agents: dict[str, tuple[AgentStatus, float]] = {}  # agent_id -> (status, received at)
        self._outlooks: dict[str, tuple[ModelOutlook, float]] = {}  # model -> (outlook, received at)

    async def subscribe(self, connection: AbstractRobustConnection) -> None:
        await topology.consume_agent_events(connection, self._on_status)

    async def _on_status(self, message: AbstractIncomingMessage) -> None:
        try:
            status = messages.decode_as(message.body, AgentStatus | ModelOutlook)
        except WireError as exc:
            log.warning("status_undecodable", error=exc.message)
            return
        if isinstance(status, ModelOutlook):
            self._outlooks[status.model] = (status, time.monotonic())
        else:
            self.record(status)

    def record(self, status: AgentStatus) -> None:
        if status.state is AgentState.STOPPED:
            self._agents.pop(status.agent_id, None)
        else:
            self._agents[status.agent_id] = (status, time.monotonic())

    def agents(self, model: str | None = None) -> list[AgentStatus]:
        """Live agents (of one model), dropping those whose heartbeats stopped."""
        now = time.monotonic()
        for agent_id, (_, seen) in list(self._agents.items()):
            if now - seen > self._expire_after_s:
                del self._agents[agent_id]
        return [status for status, _ in self._agents.values() if model is None or status.model == model]

    def outlook(self, model: str) -> ModelOutlook | None:
        """The scaler's latest outlook for `model`, or None without a scaler that speaks."""
        entry = self._outlooks.get(model)
        if entry is None or time.monotonic() - entry[1] > max(self._expire_after_s, OUTLOOK_STALE_S):
            return None
        return entry[0]

    def known(self, agent_id: str) -> AgentStatus | None:
        entry = self._agents.get(agent_id)
        return entry[0] if entry else None

    def count_by_state(self, model: str) -> Counter[AgentState]:
        return Counter(status.state for status in self.agents(model))

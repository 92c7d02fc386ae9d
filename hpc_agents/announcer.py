"""An agent's announcements: state changes and heartbeats on the events exchange.

Routing keys are ``agent.<state>`` for a state change and ``agent.heartbeat``
for the periodic status; every message is an `AgentStatus` record. Readers (the
scaler, the ops views) consider an agent gone when its heartbeats stop.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import structlog
from aio_pika.abc import AbstractExchange, AbstractRobustConnection

from broker import messages, topology
from broker.messages import AgentState, AgentStatus

log = structlog.get_logger("hotq.agent")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a heartbeat reports of the agent right now."""

    backend: str  # the backend's URL
    inflight: int
    served: int
    completion_tokens: int  # so far
    prefix_cache: tuple[int, int] = (0, 0)  # the backend's (queries, hits), in tokens
    affinity: tuple[int, int] = (0, 0)  # requests served (from its affinity queues, after a spill)


class AgentAnnouncer:
    """Publishes one agent's state changes and heartbeats (`AgentDirectory` is the reader)."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        agent_id: str,
        model: str,
        cluster: str,
        snapshot: Callable[[], Snapshot],
    ) -> None:
        self._connection = connection
        self.agent_id = agent_id
        self.model = model
        self.cluster = cluster
        self.node = socket.gethostname()
        self.state = AgentState.STARTING
        self._snapshot = snapshot
        self._started = time.monotonic()
        self._exchange: AbstractExchange | None = None
        self._last_tokens = (0, time.monotonic())

    async def open(self) -> None:
        channel = await self._connection.channel()
        await topology.declare_exchanges(channel)
        self._exchange = await channel.get_exchange(topology.EVENTS_EXCHANGE)

    async def set_state(self, state: AgentState) -> None:
        self.state = state
        log.info("agent_state", state=state.value)
        await self._publish(heartbeat=False)

    async def heartbeat(self) -> None:
        await self._publish(heartbeat=True)

    def _tokens_per_s(self, tokens: int) -> float:
        last_tokens, last_at = self._last_tokens
        now = time.monotonic()
        self._last_tokens = (tokens, now)
        return round((tokens - last_tokens) / (now - last_at), 2) if now > last_at else 0.0

    async def _publish(self, heartbeat: bool) -> None:
        if self._exchange is None:
            return
        now = self._snapshot()
        status = AgentStatus(
            agent_id=self.agent_id,
            model=self.model,
            state=self.state,
            heartbeat=heartbeat,
            node=self.node,
            cluster=self.cluster,
            backend=now.backend,
            inflight=now.inflight,
            served=now.served,
            tokens_per_s=self._tokens_per_s(now.completion_tokens) if heartbeat else 0.0,
            uptime_s=round(time.monotonic() - self._started, 3),
            sent_at=time.time(),
            prefix_cache_queries=now.prefix_cache[0],
            prefix_cache_hits=now.prefix_cache[1],
            affinity_taken=now.affinity[0],
            affinity_spilled_in=now.affinity[1],
        )
        routing_key = "agent.heartbeat" if heartbeat else f"agent.{self.state.value}"
        try:
            await self._exchange.publish(aio_pika.Message(messages.encode(status)), routing_key=routing_key)
        except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError) as exc:
            # Best effort: a broker outage (ChannelInvalidStateError is a RuntimeError) must not
            # kill the heartbeats or stop a draining agent from stopping its backend.
            log.warning("status_not_published", error=repr(exc))

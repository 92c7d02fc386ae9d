"""The node-side program: one agent serves one model while work keeps coming.

Life of an agent: starting → loading (the backend starts and becomes ready) →
hot (consuming the model's queues) → draining → stopped. It leaves when

- its queues gave it nothing for `idle_ttl_s` (a model with no work must not
  hold a node; the scaler keeps `min_hot` agents, not the agents themselves),
- `drain_before_s` before the allocation's `walltime_s` ends,
- it gets SIGTERM (or `request_stop()`),
- its backend died more than `max_restarts` times.

Draining stops consuming, hands back at once what another agent can take over
(non-streaming requests, streams it can continue: README, Stream migration), lets
the other streams finish within `drain_grace_s`, requeues the rest and stops the
backend: nothing is lost. While the backend is
restarted, the agent takes no work and hands back what it held.

`run_agent(params)` is the entry point for `hotq agent` and for a Globus Compute
task alike: a plain dict in, a summary dict out.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import structlog
import uvloop

from broker.config import Config, config_from_mapping, load_config, parse_config
from broker.connection import connect_with
from broker.messages import AgentState, Lane
from consumers.affinity import AffinityIntake
from consumers.backend_client import BackendClient
from consumers.consumer import Consumer
from consumers.handler import RequestHandler
from hpc_agents.announcer import AgentAnnouncer, Snapshot
from hpc_agents.backend_metrics import PrefixCacheReader
from hpc_agents.backend_process import BackendFailed, BackendProcess, backend_command, backend_environment
from hpc_agents.embedded_model import default_cache_dir
from ops.processes import free_port

log = structlog.get_logger("hotq.agent")

T = TypeVar("T")
SUPERVISE_INTERVAL_S = 0.25
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0)


def new_agent_id(model: str) -> str:
    return f"{model.rsplit('/', 1)[-1][:24]}-{uuid.uuid4().hex[:8]}"


class Agent:
    def __init__(self, config: Config, model: str, cluster: str = "local", agent_id: str | None = None) -> None:
        self.config = config
        self.model = model
        self.model_config = config.model(model)
        self.cluster = cluster
        # A launcher names its agent, so it can tell its launch apart in the announcements.
        self.agent_id = agent_id or new_agent_id(model)
        self._stop = asyncio.Event()
        self._started = time.monotonic()
        self.backend_restarts = 0
        self.backend_ready_s: float | None = None
        self.consumer: Consumer | None = None
        self.handler: RequestHandler | None = None
        self.backend: BackendProcess | None = None
        self._prefix_cache: PrefixCacheReader | None = None

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> dict[str, Any]:
        log_context = structlog.contextvars.bound_contextvars(agent_id=self.agent_id, model=self.model)
        with log_context:
            connection = await connect_with(self.config, f"agent:{self.model}")
            announcer = AgentAnnouncer(connection, self.agent_id, self.model, self.cluster, self._snapshot)
            await announcer.open()
            await announcer.set_state(AgentState.STARTING)
            heartbeats = asyncio.create_task(self._heartbeats(announcer))
            backend_client: BackendClient | None = None
            exit_reason = "signal"
            try:
                backend_url = await self._start_backend(announcer)
                if backend_url is not None:
                    backend_client = BackendClient(backend_url, self.model_config.max_inflight)
                    exit_reason = await self._serve(connection, backend_client, announcer)
                elif not self._stop.is_set():
                    exit_reason = "backend_failed"
            finally:
                await announcer.set_state(AgentState.DRAINING)
                if self.consumer is not None:
                    await self.consumer.stop(self.model_config.drain_grace_s)
                if self.backend is not None:
                    await self.backend.stop()
                await announcer.set_state(AgentState.STOPPED)
                heartbeats.cancel()
                if backend_client is not None:
                    await backend_client.close()
                await connection.close()
            summary = self._summary(exit_reason)
            log.info("agent_exit", **summary)
            return summary

    async def _start_backend(self, announcer: AgentAnnouncer) -> str | None:
        """Start the backend (unless one is configured by URL) and wait for it; its URL, or None."""
        await announcer.set_state(AgentState.LOADING)
        if self.model_config.backend_url is not None and self.model_config.command is None:
            return self.model_config.backend_url
        port = free_port()
        log_path = Path(self.config.data_dir) / "logs" / f"backend-{self.agent_id}.log"
        self.backend = BackendProcess(
            backend_command(self.model, self.model_config, port),
            backend_environment(self.model_config, default_cache_dir()),
            port,
            log_path,
        )
        if await self._bring_up_backend(restart_first=False):
            return self.backend.url
        return None

    async def _bring_up_backend(self, restart_first: bool) -> bool:
        """Start the backend until it is ready, restarting with back-off up to `max_restarts`.

        False if it never became ready, or if the agent was asked to stop meanwhile.
        """
        assert self.backend is not None
        if restart_first and not await self._may_restart():
            return False
        while True:
            self.backend.start()
            try:
                ready = await self._unless_stopped(self.backend.wait_ready(self.model_config.start_timeout_s))
            except BackendFailed as exc:
                log.error("backend_failed_to_start", error=str(exc))
                await self.backend.stop()
                if not await self._may_restart():
                    return False
                continue
            if ready is None:
                return False  # asked to stop while loading
            self.backend_ready_s = round(ready, 3)
            log.info("backend_ready", seconds=self.backend_ready_s, url=self.backend.url)
            return True

    async def _may_restart(self) -> bool:
        if self.backend_restarts >= self.model_config.max_restarts or self._stop.is_set():
            return False
        pause = RESTART_BACKOFF_S[min(self.backend_restarts, len(RESTART_BACKOFF_S) - 1)]
        self.backend_restarts += 1
        log.warning("backend_restarting", attempt=self.backend_restarts, in_s=pause)
        await asyncio.sleep(pause)
        return True

    async def _serve(self, connection: Any, backend_client: BackendClient, announcer: AgentAnnouncer) -> str:
        self.handler = RequestHandler(backend_client, flush_interval_s=self.config.stream_flush_ms / 1000)
        self._prefix_cache = PrefixCacheReader(
            self.backend.url if self.backend else self.model_config.backend_url or ""
        )
        spill = self.model_config.spill_after_ms
        affinity = (
            AffinityIntake(self.model, self.agent_id, {Lane.INTERACTIVE: spill.interactive, Lane.BATCH: spill.batch})
            if self.model_config.affinity_on
            else None
        )
        self.consumer = Consumer(
            connection,
            self.model,
            self.handler,
            max_inflight=self.model_config.max_inflight,
            reserved_interactive=self.model_config.reserved_interactive,
            lanes=tuple(Lane),
            cluster=self.cluster if self.cluster in self.config.clusters else None,
            affinity=affinity,
        )
        await self.consumer.start()
        await announcer.set_state(AgentState.HOT)
        return await self._supervise(self.consumer, announcer)

    async def _supervise(self, consumer: Consumer, announcer: AgentAnnouncer) -> str:
        """Watch for the reasons to leave, and restart a backend that dies meanwhile."""
        model_config = self.model_config
        drain_at = (
            self._started + model_config.walltime_s - model_config.drain_before_s
            if model_config.walltime_s is not None
            else float("inf")
        )
        while True:
            now = time.monotonic()
            if self._stop.is_set():
                return "signal"
            if now >= drain_at:
                return "walltime"
            if consumer.held == 0 and now - consumer.last_active >= model_config.idle_ttl_s:
                return "idle"
            if self.backend is not None and self.backend.exited():
                if not await self._recover_backend(consumer, announcer):
                    return "backend_failed"
            await asyncio.sleep(SUPERVISE_INTERVAL_S)

    async def _recover_backend(self, consumer: Consumer, announcer: AgentAnnouncer) -> bool:
        assert self.backend is not None
        log.error("backend_died", returncode=self.backend.process.returncode if self.backend.process else None)
        await consumer.pause()
        await consumer.requeue_inflight()  # another agent, or this one once restarted, serves them
        await self.backend.stop()
        await announcer.set_state(AgentState.LOADING)
        if not await self._bring_up_backend(restart_first=True):
            return self._stop.is_set()  # stopping anyway: _supervise sees the stop next
        await consumer.resume()
        await announcer.set_state(AgentState.HOT)
        return True

    async def _unless_stopped(self, work: Awaitable[T]) -> T | None:
        work_task = asyncio.ensure_future(work)
        stop_task = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait((work_task, stop_task), return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if work_task.done():
            return work_task.result()
        work_task.cancel()
        await asyncio.gather(work_task, return_exceptions=True)
        return None

    async def _heartbeats(self, announcer: AgentAnnouncer) -> None:
        async with aiohttp.ClientSession() as session:
            while True:
                await asyncio.sleep(self.config.heartbeat_s)
                if self._prefix_cache is not None:
                    await self._prefix_cache.read(session)
                await announcer.heartbeat()

    def _snapshot(self) -> Snapshot:
        backend = self.backend.url if self.backend else (self.model_config.backend_url or "")
        consumer, handler = self.consumer, self.handler
        affinity = consumer.affinity if consumer else None
        return Snapshot(
            backend,
            consumer.inflight if consumer else 0,
            consumer.served if consumer else 0,
            handler.completion_tokens if handler else 0,
            self._prefix_cache.last if self._prefix_cache else (0, 0),
            (affinity.taken, affinity.spilled_in) if affinity else (0, 0),
        )

    def _summary(self, exit_reason: str) -> dict[str, Any]:
        return {
            "agent_id": self.agent_id,
            "model": self.model,
            "cluster": self.cluster,
            "exit_reason": exit_reason,
            "served": self.consumer.served if self.consumer else 0,
            "completion_tokens": self.handler.completion_tokens if self.handler else 0,
            "backend_restarts": self.backend_restarts,
            "backend_ready_s": self.backend_ready_s,
            "uptime_s": round(time.monotonic() - self._started, 3),
        }


def _config_from_params(params: dict[str, Any]) -> Config:
    if "config" in params:
        return config_from_mapping(params["config"], "params.config")
    if "config_toml" in params:
        return parse_config(params["config_toml"], "params.config_toml")
    return load_config(params.get("config_path"))


def run_agent(params: dict[str, Any]) -> dict[str, Any]:
    """Run an agent until it exits; return its summary.

    `params`: ``model`` (required); the config as ``config`` (a parsed TOML
    mapping), ``config_toml`` (its text) or ``config_path``; optional ``cluster``
    and ``agent_id``.
    Plain data in and out, so a Globus Compute task can call it on a remote node.
    """
    config = _config_from_params(params)
    agent = Agent(config, params["model"], params.get("cluster", "local"), params.get("agent_id"))

    async def main() -> dict[str, Any]:
        if threading.current_thread() is threading.main_thread():
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, agent.request_stop)
        return await agent.run()

    return uvloop.run(main())

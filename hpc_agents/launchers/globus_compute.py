"""The Globus Compute launcher: agents as Globus Compute tasks on a cluster's endpoint.

A launch submits `hpc_agents.agent.run_agent(params)` to the endpoint named by
``[clusters."NAME"] endpoint_id``, with the table's ``user_endpoint_config`` for
the endpoint's template. The endpoint (see ``ops/DEPLOYING.md``) runs one worker
per node, so each task is one agent owning one node, and Parsl turns waiting
tasks into batch jobs, up to the cluster's ``max_nodes``. The task's result is
the agent's summary.

Credentials: the default executor and status client are Globus Compute's own
``Client``, which authenticates as the client identity whose id and secret are
in ``GLOBUS_COMPUTE_CLIENT_ID`` and ``GLOBUS_COMPUTE_CLIENT_SECRET`` (without
them it falls back to tokens stored by an interactive login). A non-privileged
endpoint runs only its owner's tasks, so start the endpoint with the same
client credentials.

Nothing touches the network until the first `submit` or `online`: the SDK's
``Client`` checks its version with the service as it is created, and its
``Executor`` starts threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import threading
import time
from typing import Any, Protocol

import globus_compute_sdk
import structlog

from broker.config import Config
from broker.errors import ConfigError
from hpc_agents.agent import run_agent
from hpc_agents.launchers import Launcher

log = structlog.get_logger("hotq.launcher.globus_compute")

STATUS_CACHE_S = 10.0  # the scaler asks every tick; the endpoint's state changes over minutes
KEPT_SUMMARIES = 100


class EndpointStatusClient(Protocol):
    """What `online()` needs: ``globus_compute_sdk.Client`` or ``globus_sdk.ComputeClientV2``.

    Either returns something indexable by ``"status"`` ("online", "offline", ...).
    """

    def get_endpoint_status(self, endpoint_id: str) -> Any: ...


class GlobusComputeLauncher(Launcher):
    """Launch agents through a Globus Compute endpoint.

    `executor` (any ``concurrent.futures.Executor``; tests pass a process pool)
    and `status_client` replace the Globus Compute defaults. The launcher owns
    the executor and shuts it down.
    """

    def __init__(
        self,
        cluster: str,
        config: Config,
        executor: concurrent.futures.Executor | None = None,
        status_client: EndpointStatusClient | None = None,
    ) -> None:
        super().__init__(cluster, config)
        cluster_config = config.clusters.get(cluster)
        if cluster_config is None or not cluster_config.endpoint_id:
            raise ConfigError(f'clusters."{cluster}".endpoint_id is required by the globus-compute launcher')
        self.endpoint_id = cluster_config.endpoint_id
        self._user_endpoint_config = cluster_config.user_endpoint_config
        self._executor = executor
        self._status_client = status_client
        self._compute_client: globus_compute_sdk.Client | None = None
        self._lock = threading.RLock()  # lazy creation and the futures table
        self._futures: dict[str, concurrent.futures.Future[dict[str, Any]]] = {}
        # The latest agents' summaries, oldest first, for the scaler and for people.
        self.summaries: collections.deque[dict[str, Any]] = collections.deque(maxlen=KEPT_SUMMARIES)
        self._status_lock = threading.Lock()  # one status request at a time, apart from submits
        self._status_checked_at = float("-inf")
        self._online = False
        self._last_status: str | None = None

    def submit(self, params: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        agent_id = params["agent_id"]
        future = self._get_executor().submit(run_agent, params)
        with self._lock:
            self._futures[agent_id] = future
        future.add_done_callback(functools.partial(self._finished, agent_id))
        log.info("agent_submitted", cluster=self.cluster, endpoint_id=self.endpoint_id, agent_id=agent_id)
        return future

    def online(self) -> bool:
        with self._status_lock:
            now = time.monotonic()
            if now - self._status_checked_at >= STATUS_CACHE_S:
                # Failures are cached too: an unreachable service is asked again after the
                # cache time, not on every tick.
                self._online = self._fetch_online()
                self._status_checked_at = now
            return self._online

    def shutdown(self) -> None:
        with self._lock:
            executor = self._executor
        if executor is not None:
            # Cancels tasks not yet sent. Running agents cannot be cancelled (Globus Compute
            # has no way to); they drain on their own at idle_ttl_s or walltime.
            executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            left_running = sorted(self._futures)
        log.info("launcher_shutdown", cluster=self.cluster, agents_left_running=left_running)

    def _get_executor(self) -> concurrent.futures.Executor:
        with self._lock:
            if self._executor is None:
                self._executor = globus_compute_sdk.Executor(
                    endpoint_id=self.endpoint_id,
                    client=self._get_compute_client(),
                    user_endpoint_config=self._user_endpoint_config,
                    label=f"hotq {self.cluster}",
                )
            return self._executor

    def _get_compute_client(self) -> globus_compute_sdk.Client:
        with self._lock:
            if self._compute_client is None:
                self._compute_client = globus_compute_sdk.Client()
            return self._compute_client

    def _fetch_online(self) -> bool:
        try:
            client = self._status_client if self._status_client is not None else self._get_compute_client()
            status = str(client.get_endpoint_status(self.endpoint_id)["status"])
        except Exception as exc:  # network, HTTP, auth and version errors all mean "cannot launch now"
            log.warning("endpoint_status_failed", cluster=self.cluster, endpoint_id=self.endpoint_id, error=repr(exc))
            status = "unknown"
        if status != self._last_status:
            log.info("endpoint_status", cluster=self.cluster, endpoint_id=self.endpoint_id, status=status)
            self._last_status = status
        return status == "online"

    def _finished(self, agent_id: str, future: concurrent.futures.Future[dict[str, Any]]) -> None:
        with self._lock:
            self._futures.pop(agent_id, None)
        if future.cancelled():
            log.info("agent_cancelled", cluster=self.cluster, agent_id=agent_id)
            return
        error = future.exception()
        if error is not None:
            log.error("agent_failed", cluster=self.cluster, agent_id=agent_id, error=repr(error))
            return
        summary = future.result()
        self.summaries.append(summary)
        log.info("agent_summary", **summary)

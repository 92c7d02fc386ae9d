"""Launchers start agents on a cluster; the scaler decides when.

Every launcher turns "start an agent for this model" into a `Launch` whose
future resolves to the summary dict the agent returns when it exits
(`hpc_agents.agent.run_agent`). `online()` says whether the cluster can take
launches now (a Globus Compute endpoint may be offline).
"""

from __future__ import annotations

import abc
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from broker.config import Config
from hpc_agents.agent import new_agent_id


@dataclass
class Launch:
    agent_id: str
    model: str
    cluster: str
    future: concurrent.futures.Future[dict[str, Any]]
    launched_at: float = field(default_factory=time.monotonic)


class Launcher(abc.ABC):
    def __init__(self, cluster: str, config: Config, max_nodes: int | None = None) -> None:
        self.cluster = cluster
        self.config = config
        self.max_nodes = max_nodes or (config.clusters[cluster].max_nodes if cluster in config.clusters else 1)

    def launch(self, model: str) -> Launch:
        agent_id = new_agent_id(model)
        params = {
            "model": model,
            "cluster": self.cluster,
            "agent_id": agent_id,
            "config": msgspec.to_builtins(self.config.for_agents()),  # the node needs no config file
        }
        return Launch(agent_id, model, self.cluster, self.submit(params))

    @abc.abstractmethod
    def submit(self, params: dict[str, Any]) -> concurrent.futures.Future[dict[str, Any]]:
        """Start `run_agent(params)` somewhere; the future holds its summary."""

    def online(self) -> bool:
        return True

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop what this launcher started, letting agents drain."""


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

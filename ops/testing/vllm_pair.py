"""Two real vLLM agents of one model, each computing on a core of its own, behind two APIs: one
placing by prefix affinity, one not (`affinity = "off"`), for tests and benchmarks to compare
the same agents under both.

Both agents consume their affinity queues and the shared queue; only the API decides where a
request waits. vLLM's prefix-cache counters are read from each backend's `/metrics`.
"""

from __future__ import annotations

import contextlib
import os
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from hpc_agents.backend_metrics import parse_prefix_cache
from hpc_agents.embedded_model import ensure_embedded_model
from ops.processes import wait_until
from ops.testing.deadlines import VLLM_STARTUP_S
from ops.testing.stack import Stack, wait_for_event, write_config


@dataclass
class VllmPair:
    on: Stack  # its API places by affinity
    off: Stack  # its API uses the shared queue only
    backends: list[str]  # the two vLLM servers' URLs

    def prefix_cache(self) -> tuple[int, int]:
        """(queries, hits) in tokens, summed over both backends."""
        queries = hits = 0
        for url in self.backends:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
                counters = parse_prefix_cache(response.read().decode())
            if counters is not None:
                queries, hits = queries + counters[0], hits + counters[1]
        return queries, hits


@contextlib.contextmanager
def vllm_pair(
    workdir: Path,
    amqp_url: str,
    model: str,
    max_inflight: int = 16,
    running_backend: str | None = None,
    wait_for_running_backend: Callable[[], object] = lambda: None,
    **table: object,
) -> Iterator[VllmPair]:
    """`running_backend`: the URL of a vLLM serving the embedded model as `model`, for the first
    agent to use instead of starting its own (the test suite's shared one: a start saved). It may
    still be loading: the second agent's vLLM starts first, then `wait_for_running_backend()` waits
    for it, so that the two load side by side."""
    model_dir = ensure_embedded_model()
    base: dict[str, object] = {
        "model_path": str(model_dir),
        "max_agents": 2,
        "max_inflight": max_inflight,
        "reserved_interactive": 1,
        "idle_ttl_s": 36_000,
        "start_timeout_s": VLLM_STARTUP_S,
        "drain_grace_s": 5,
        **table,
    }
    cores = max(1, os.cpu_count() or 1)

    def config(name: str, **extra: object) -> Path:
        (workdir / name).mkdir(exist_ok=True)
        return write_config(workdir / name / "hotq.toml", amqp_url, {model: {**base, **extra}}, ops_sample_s=1.0)

    on = Stack(config("on", affinity="prefix"), workdir / "on")
    off = Stack(config("off", affinity="off"), workdir / "off")
    try:
        on.start_api()
        off.start_api()
        # Each agent's vLLM computes on one core (OpenMP threads bound there).
        agent_tables: list[dict[str, object]] = [
            {"env": {"VLLM_CPU_OMP_THREADS_BIND": str(i % cores)}} for i in range(2)
        ]
        if running_backend is not None:
            agent_tables[0] = {"backend_url": running_backend}
        # The agent that starts a vLLM of its own goes first: it loads while the running one finishes.
        second = on.start_agent(model, config("agent1", affinity="prefix", **agent_tables[1]))
        wait_for_running_backend()
        first = on.start_agent(model, config("agent0", affinity="prefix", **agent_tables[0]))
        agents = [first, second]
        backends = [
            str(
                agent_table.get("backend_url")
                or wait_for_event(agent, "backend_ready", timeout_s=VLLM_STARTUP_S)["url"]
            )
            for agent, agent_table in zip(agents, agent_tables, strict=True)
        ]
        for agent in agents:
            wait_for_event(agent, "agent_state", timeout_s=VLLM_STARTUP_S, state="hot")
        wait_until(lambda: _hot_heard(on, model) == 2, VLLM_STARTUP_S, "the API hears both agents hot", on.api)
        yield VllmPair(on, off, backends)
    finally:
        on.close()
        off.close()


def _hot_heard(stack: Stack, model: str) -> float:
    with urllib.request.urlopen(stack.url + "/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("hotq_agents{") and f'model="{model}"' in line and 'state="hot"' in line
    )

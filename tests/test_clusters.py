"""Issue 4 scenario 3: two clusters serve one model; pinned requests stay on their cluster;
an offline cluster is skipped. Local launchers stand in for the clusters (one starts slower)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest

from broker.config import load_config
from broker.messages import AgentState, AgentStatus
from hpc_agents.launchers import Launcher
from hpc_agents.launchers.local import LocalLauncher
from hpc_agents.scaler import Scaler
from ops.processes import wait_until_async
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, Hold
from ops.testing.scaling import running_scaler
from ops.testing.stack import Stack, write_config

BETA_START_DELAY_S = 1.5  # beta's stand-in for a batch scheduler's queue wait


class OfflineLauncher(LocalLauncher):
    """A cluster whose endpoint reports offline (the Globus launcher's status, simulated)."""

    def online(self) -> bool:
        return False


def _cluster_tables(path: Path, amqp_url: str, model: str) -> Path:
    table = {
        "command": FAKE_BACKEND_COMMAND,
        "clusters": ["gamma", "alpha", "beta"],
        "max_agents": 2,
        "target_drain_s": 1,
        "max_inflight": 2,
        "idle_ttl_s": 600,
    }
    clusters: dict[str, dict[str, object]] = {
        "gamma": {"launcher": "local", "max_nodes": 2},
        "alpha": {"launcher": "local", "max_nodes": 1},
        "beta": {"launcher": "local", "max_nodes": 1},
    }
    return write_config(path, amqp_url, {model: table}, clusters, heartbeat_s=1.0)


@pytest.fixture
async def federation(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> AsyncIterator[tuple[Scaler, Stack, str]]:
    model = f"federated-{session_tag}"
    delete_test_queues.append(model)
    path = _cluster_tables(tmp_path / "hotq.toml", amqp_url, model)
    config = load_config(path)
    stack = Stack(path, tmp_path)
    stack.start_api()
    logs = tmp_path / "logs"
    launchers: dict[str, Launcher] = {
        "gamma": OfflineLauncher("gamma", config, log_dir=logs),
        "alpha": LocalLauncher("alpha", config, log_dir=logs),
        "beta": LocalLauncher("beta", config, log_dir=logs, start_delay_s=BETA_START_DELAY_S),
    }
    try:
        async with running_scaler(config, launchers, amqp_url) as scaler:
            yield scaler, stack, model
    finally:
        stack.close()


async def _ask_many(
    stack: Stack, model: str, count: int, headers: dict[str, str] | None = None, hold: Hold | None = None
) -> None:
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=count + 5), timeout=EVENTUALLY_S)
    # openai types `http_client` for httpx2; it takes an httpx client too
    client = openai.AsyncOpenAI(
        base_url=stack.url + "/v1",
        api_key="x",
        max_retries=0,
        http_client=http,  # type: ignore[arg-type]
    )
    try:
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": f"shared work {i}"}],
                    extra_body=None if hold is None else hold.field,
                    extra_headers=headers or {},
                )
                for i in range(count)
            )
        )
    finally:
        await http.aclose()
    assert all(a.choices[0].message.content for a in answers)


def _served_by_cluster(scaler: Scaler, model: str) -> dict[str, int]:
    latest: dict[str, AgentStatus] = {a.agent_id: a for a in scaler.directory.agents(model) if a.heartbeat}
    served: dict[str, int] = {}
    for status in latest.values():
        served[status.cluster] = served.get(status.cluster, 0) + status.served
    return served


async def _settle(scaler: Scaler, model: str, expected_total: int) -> dict[str, int]:
    """What each cluster's agents served, once their heartbeats count `expected_total` in all."""

    def counted() -> bool:
        return sum(_served_by_cluster(scaler, model).values()) >= expected_total

    await wait_until_async(counted, EVENTUALLY_S, f"heartbeats counting {expected_total} served", poll_s=0.2)
    return _served_by_cluster(scaler, model)


def _busy_clusters(scaler: Scaler, model: str) -> set[str]:
    """The clusters with a hot agent whose slots are all taken (max_inflight = 2)."""
    latest: dict[str, AgentStatus] = {a.agent_id: a for a in scaler.directory.agents(model) if a.heartbeat}
    return {status.cluster for status in latest.values() if status.state is AgentState.HOT and status.inflight == 2}


async def test_two_clusters_share_work_pinned_requests_stay_and_offline_is_skipped(
    federation: tuple[Scaler, Stack, str], tmp_path: Path
) -> None:
    scaler, stack, model = federation
    # The backends hold the work until both clusters' agents are busy with it: however fast or slow
    # the machine, the cluster that starts later (beta) gets its share.
    hold = Hold(tmp_path / "release")
    asking = asyncio.create_task(_ask_many(stack, model, 60, hold=hold))
    try:
        await wait_until_async(
            lambda: _busy_clusters(scaler, model) == {"alpha", "beta"}, EVENTUALLY_S, "both clusters busy"
        )
    finally:
        hold.release()
    await asking
    launched_to = sorted(launch.cluster for launch in scaler.launches.values())
    assert launched_to == ["alpha", "beta"]  # gamma offline; each of the others at its max_nodes
    served = await _settle(scaler, model, 60)
    assert served.get("alpha", 0) > 0 and served.get("beta", 0) > 0 and sum(served.values()) == 60
    # The slower start was measured: beta's cold start includes its queue wait.
    assert scaler.cold_start_s["beta"] >= BETA_START_DELAY_S and scaler.cold_start_s["alpha"] > 0

    await _ask_many(stack, model, 10, headers={"X-Hotq-Cluster": "alpha"})
    after = await _settle(scaler, model, 70)
    assert after["alpha"] == served["alpha"] + 10 and after["beta"] == served["beta"]
    hot = {a.cluster for a in scaler.directory.agents(model) if a.state is AgentState.HOT}
    assert hot == {"alpha", "beta"}


async def test_pinning_to_a_cluster_that_does_not_serve_the_model_is_400(
    federation: tuple[Scaler, Stack, str],
) -> None:
    _, stack, model = federation
    client = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], extra_headers={"X-Hotq-Cluster": "nowhere"}
        )
    assert caught.value.param == "X-Hotq-Cluster"

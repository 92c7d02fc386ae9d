"""Issue 10 §1: a request to a cold model waits for capacity that is coming, and gets a 503
with the reason as soon as none can come; `min_hot` is placed before bursts.

The API and the agents run as processes; the scaler runs in the test (its launchers are
local, one can be made to report offline). Agents start the fake backend, which can take a
fixed time to become ready (`--ready-after`), as a model server loading its weights.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from broker.config import load_config
from broker.messages import AgentState
from hpc_agents.launchers import Launcher
from hpc_agents.launchers.local import LocalLauncher
from hpc_agents.scaler import Scaler
from ops.processes import wait_until_async
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, Hold, expected_chat_tokens
from ops.testing.scaling import running_scaler
from ops.testing.stack import Stack, write_config

READY_AFTER_S = 8.0  # the fake model server's load time: four times max_queue_wait_s, so an answer proves it waited
MAX_QUEUE_WAIT_S = 2.0  # after about this (+1.2 s), a request no capacity can serve gets its 503
# A request must outlive the cold start on a slow machine; the deadline only turns a hang into a failure.
COLD_ANSWER_S = STARTUP_S + READY_AFTER_S + EVENTUALLY_S


class OfflineLauncher(LocalLauncher):
    """A cluster whose endpoint reports offline (the Globus launcher's status, simulated)."""

    def online(self) -> bool:
        return False


@dataclass
class Scaled:
    scaler: Scaler
    stack: Stack
    models: list[str]

    def hot(self, model: str) -> list[str]:
        return [a.agent_id for a in self.scaler.directory.agents(model) if a.state is AgentState.HOT]

    def agents(self, model: str) -> int:
        """The model's agents, launched or announced (what occupies nodes)."""
        announced = {a.agent_id for a in self.scaler.directory.agents(model)}
        launched = {x.agent_id for x in self.scaler.launches.values() if x.model == model}
        return len(announced | launched)


@pytest.fixture
async def scaled(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[Scaled]:
    """Marker `models(tables, clusters=None, offline=())`: the [models] tables by short name."""
    marker = request.node.get_closest_marker("models")
    assert marker is not None
    tables: dict[str, dict[str, object]] = marker.args[0]
    clusters: dict[str, dict[str, object]] = marker.kwargs.get("clusters") or {"local": {"max_nodes": 4}}
    offline: tuple[str, ...] = marker.kwargs.get("offline", ())
    names = {short: f"cold-{short}-{request.node.name[5:20]}-{session_tag}" for short in tables}
    delete_test_queues.extend(names.values())
    path = write_config(
        tmp_path / "hotq.toml",
        amqp_url,
        {names[short]: {"idle_ttl_s": 600, "max_inflight": 4, **table} for short, table in tables.items()},
        clusters,
        heartbeat_s=0.5,
        max_queue_wait_s=MAX_QUEUE_WAIT_S,
        keepalive_s=1,
    )
    config = load_config(path)
    stack = Stack(path, tmp_path)
    stack.start_api()
    logs = tmp_path / "logs"
    launchers: dict[str, Launcher] = {
        name: (OfflineLauncher if name in offline else LocalLauncher)(name, config, log_dir=logs) for name in clusters
    }

    async def heard() -> bool:  # the API has heard the scaler's outlooks: it holds requests through cold starts
        async with httpx.AsyncClient(timeout=EVENTUALLY_S) as http:
            entries = [await _models_entry(http, stack.url, model) for model in names.values()]
        return all(entry["agents_starting"] is not None for entry in entries)

    try:
        async with running_scaler(config, launchers, amqp_url) as scaler:
            await wait_until_async(heard, EVENTUALLY_S, "/v1/models showing the scaler's outlooks", poll_s=0.2)
            yield Scaled(scaler, stack, [names[short] for short in tables])
    finally:
        stack.close()


def _chat(model: str, text: str, stream: bool = False, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream, **extra}


def _events(body: str) -> tuple[list[dict[str, object]], int]:
    """The data events of an SSE body (without [DONE]) and how many keep-alives came before the first."""
    events: list[dict[str, object]] = []
    keepalives = 0
    for block in body.split("\n\n"):
        lines = [line for line in block.splitlines() if line]
        if not lines:
            continue
        data = "".join(line.removeprefix("data:").strip() for line in lines if line.startswith("data:"))
        if not data:
            keepalives += not events  # an SSE comment
            continue
        if data == "[DONE]":
            continue
        event = json.loads(data)
        if not events and event.get("choices") == [] and "usage" not in event:
            keepalives += 1  # a keep-alive chunk with no choices
            continue
        events.append(event)
    return events, keepalives


async def _models_entry(http: httpx.AsyncClient, url: str, model: str) -> dict[str, object]:
    listed = (await http.get(url + "/v1/models")).json()["data"]
    entry: dict[str, object] = next(m for m in listed if m["id"] == model)["hotq"]
    return entry


@pytest.mark.timeout(COLD_ANSWER_S + STARTUP_S)
@pytest.mark.models({"m": {"command": [*FAKE_BACKEND_COMMAND, "--ready-after", str(READY_AFTER_S)], "max_agents": 1}})
async def test_requests_sent_to_a_cold_model_wait_for_its_agent_and_are_answered(scaled: Scaled) -> None:
    (model,) = scaled.models
    url = scaled.stack.url
    async with httpx.AsyncClient(timeout=COLD_ANSWER_S) as http:
        assert (await _models_entry(http, url, model))["state"] == "cold"

        async def stream() -> tuple[int, str]:
            async with http.stream("POST", url + "/v1/chat/completions", json=_chat(model, "a b c", True)) as response:
                return response.status_code, (await response.aread()).decode()

        plain = asyncio.create_task(http.post(url + "/v1/chat/completions", json=_chat(model, "one two three")))
        streamed = asyncio.create_task(stream())

        async def starting() -> bool:
            entry = await _models_entry(http, url, model)
            return entry["state"] == "starting" and entry["agents_starting"] == 1

        await wait_until_async(starting, STARTUP_S, "/v1/models saying an agent is starting", poll_s=0.5)
        response = await plain
        status, body = await streamed

        async def hot() -> bool:
            entry = await _models_entry(http, url, model)
            return entry["state"] == "hot" and entry["expected_hot_s"] == 0

        await wait_until_async(hot, EVENTUALLY_S, "/v1/models saying the model is hot", poll_s=0.2)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "".join(
        expected_chat_tokens("one two three", None)[0]
    )
    # It waited for the cold start: far longer than max_queue_wait_s, which no longer means "give up".
    assert int(response.headers["x-hotq-queue-wait-ms"]) > MAX_QUEUE_WAIT_S * 1000
    assert status == 200
    events, keepalives = _events(body)
    content = "".join(str(e["choices"][0]["delta"].get("content") or "") for e in events)  # type: ignore[index]
    assert content == "".join(expected_chat_tokens("a b c", None)[0])
    assert keepalives >= 2  # the stream was kept alive while it waited
    # The API may hear the agent hot before the scaler's next look at the directory measures it.
    await wait_until_async(
        lambda: "local" in scaled.scaler.cold_start_s, EVENTUALLY_S, "the scaler measuring the cold start"
    )
    assert scaled.scaler.cold_start_s["local"] >= READY_AFTER_S  # measured, and kept for the next estimate


@pytest.mark.models(
    {"m": {"command": FAKE_BACKEND_COMMAND, "clusters": ["gamma"]}}, clusters={"gamma": {}}, offline=("gamma",)
)
async def test_a_model_whose_only_cluster_is_offline_gets_503_with_the_reason(scaled: Scaled) -> None:
    (model,) = scaled.models
    async with httpx.AsyncClient(timeout=EVENTUALLY_S) as http:
        response = await http.post(scaled.stack.url + "/v1/chat/completions", json=_chat(model, "anyone?"))
        async with http.stream(
            "POST", scaled.stack.url + "/v1/chat/completions", json=_chat(model, "anyone?", True)
        ) as streamed:
            body = (await streamed.aread()).decode()
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "no_capacity" and "gamma offline" in error["message"], error
    assert int(response.headers["retry-after"]) >= 1
    last = json.loads(body.strip().split("\n\n")[-1].removeprefix("data: "))
    assert last["error"]["code"] == "no_capacity" and "gamma offline" in last["error"]["message"]
    assert not scaled.scaler.launches


@pytest.mark.models(
    {"m": {"command": FAKE_BACKEND_COMMAND, "clusters": ["alpha", "gamma"]}},
    clusters={"alpha": {}, "gamma": {}},
    offline=("gamma",),
)
async def test_a_request_pinned_to_an_offline_cluster_gets_503_while_others_are_served(scaled: Scaled) -> None:
    (model,) = scaled.models
    async with httpx.AsyncClient(timeout=STARTUP_S + EVENTUALLY_S) as http:
        served = await http.post(scaled.stack.url + "/v1/chat/completions", json=_chat(model, "x y"))
        pinned = await http.post(
            scaled.stack.url + "/v1/chat/completions", json=_chat(model, "x y"), headers={"X-Hotq-Cluster": "gamma"}
        )
    assert served.status_code == 200, served.text  # an agent was launched on alpha for it
    assert pinned.status_code == 503, pinned.text
    error = pinned.json()["error"]
    assert error["code"] == "no_capacity" and "cluster gamma: offline" in error["message"], error


@pytest.mark.models({"m": {"command": ["{python}", "-c", "raise SystemExit(3)"], "max_restarts": 1}})
async def test_a_launch_that_fails_fails_the_waiting_request_with_a_clear_503(scaled: Scaled) -> None:
    (model,) = scaled.models
    async with httpx.AsyncClient(timeout=STARTUP_S + EVENTUALLY_S) as http:
        response = await http.post(scaled.stack.url + "/v1/chat/completions", json=_chat(model, "anyone?"))
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "no_capacity", error
    assert "failed to start after 1 restart(s)" in error["message"], error
    assert int(response.headers["retry-after"]) >= 1
    assert any(s["exit_reason"] == "backend_failed" for s in scaled.scaler.summaries)


@pytest.mark.timeout(2 * STARTUP_S + 2 * EVENTUALLY_S)
@pytest.mark.models(
    {
        "burst": {"command": FAKE_BACKEND_COMMAND, "max_agents": 3, "target_drain_s": 1, "max_inflight": 1},
        "floor": {"command": FAKE_BACKEND_COMMAND, "min_hot": 1},
    },
    clusters={"shared": {"max_nodes": 3}},
)
async def test_min_hot_is_placed_before_a_burst_and_kept_from_it(scaled: Scaled, tmp_path: Path) -> None:
    burst, floor = scaled.models
    hold = Hold(tmp_path / "release")
    async with httpx.AsyncClient(timeout=2 * STARTUP_S + 2 * EVENTUALLY_S) as http:
        # A burst that would take every node: 12 held requests, one per agent at a time.
        asking = [
            asyncio.create_task(
                http.post(scaled.stack.url + "/v1/chat/completions", json=_chat(burst, f"w{i}", **hold.field))
            )
            for i in range(12)
        ]
        await wait_until_async(lambda: len(scaled.hot(floor)) == 1, STARTUP_S, "the min_hot agent hot", poll_s=0.2)
        await wait_until_async(
            lambda: scaled.agents(burst) == 2, STARTUP_S, "the burst on the other 2 nodes", poll_s=0.2
        )
        # The floor's agent dies: its node goes back to the floor, not to the waiting burst.
        first = scaled.hot(floor)[0]
        pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--agent-id {first}"]).split()[0])
        os.kill(pid, signal.SIGKILL)
        await wait_until_async(
            lambda: scaled.hot(floor) and scaled.hot(floor)[0] != first, STARTUP_S, "a new min_hot agent", poll_s=0.2
        )
        assert scaled.agents(burst) == 2
        hold.release()
        answers = await asyncio.gather(*asking)
    # The burst's agents answered what they held; what waited behind them with no node left to
    # start another agent on got 503 (no capacity could come), never a hang.
    assert sum(a.status_code == 200 for a in answers) >= 2
    assert all(a.status_code == 200 or a.json()["error"]["code"] == "no_capacity" for a in answers)

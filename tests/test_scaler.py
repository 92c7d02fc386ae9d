"""Issue 4 scenarios with the local launcher and the fake backend: cold start to zero, and min_hot."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from broker.config import Config, load_config
from broker.connection import connect
from broker.messages import AgentState
from hpc_agents.decisions import Decision, DecisionLog
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers.local import LocalLauncher
from hpc_agents.scaler import Scaler
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import Stack, write_config

FAKE_COMMAND = ["{python}", "-m", "ops.testing.fake_backend", "--port", "{port}", "--model", "{model}"]


@dataclass
class Running:
    scaler: Scaler
    stack: Stack
    model: str
    decisions: list[Decision]
    config: Config


@pytest.fixture
async def running(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[Running]:
    marker = request.node.get_closest_marker("model")
    assert marker is not None
    model = f"scaled-{request.node.name[5:25]}-{session_tag}"
    delete_test_queues.append(model)
    table = {"command": FAKE_COMMAND, "max_inflight": 4, **marker.kwargs}
    path = write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, heartbeat_s=0.3, max_queue_wait_s=120)
    config = load_config(path)
    stack = Stack(path, tmp_path)
    stack.start_api()
    connection = await connect(amqp_url, "test-scaler")
    directory = AgentDirectory(config.heartbeat_s)
    await directory.subscribe(connection)
    channel = await connection.channel()
    launcher = LocalLauncher("local", config, max_nodes=4, log_dir=tmp_path / "logs")
    scaler = Scaler(config, {"local": launcher}, directory, tick_s=0.25)
    decisions: list[Decision] = []
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            decisions.extend(await scaler.tick(channel))
            await asyncio.sleep(scaler.tick_s)

    ticking = asyncio.create_task(loop())
    try:
        yield Running(scaler, stack, model, decisions, config)
    finally:
        stop.set()
        await ticking
        await asyncio.to_thread(launcher.shutdown)
        await connection.close()
        stack.close()


async def _wait(condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.1)


@pytest.mark.model(min_hot=0, max_agents=3, target_drain_s=2, idle_ttl_s=2.0)
async def test_cold_start_burst_then_back_to_zero(running: Running) -> None:
    scaler, model = running.scaler, running.model
    assert scaler.directory.agents(model) == [] and not scaler.launches
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=250), timeout=120)
    client = openai.AsyncOpenAI(base_url=running.stack.url + "/v1", api_key="x", max_retries=0, http_client=http)
    texts = [f"burst {i}" for i in range(200)]
    started = time.monotonic()
    try:
        answers = await asyncio.gather(
            *(
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": t}], extra_body={"fake_delay_ms": 50}
                )
                for t in texts
            )
        )
    finally:
        await http.aclose()
    answered_after = time.monotonic() - started
    for text, answer in zip(texts, answers):
        assert answer.choices[0].message.content == "".join(expected_chat_tokens(text, None)[0])

    launched = sum(d.launched for d in running.decisions)
    assert 1 <= launched <= 3  # up to max_agents, never more
    assert all(d.desired <= 3 for d in running.decisions)
    first = next(d for d in running.decisions if d.launched)
    assert first.backlog > 0 and "backlog" in first.reason

    # Idle agents leave on their own; the model goes back to zero and nothing is relaunched.
    await _wait(lambda: not scaler.launches and not scaler.directory.agents(model), timeout=60)
    await asyncio.sleep(1.0)
    assert not scaler.launches and sum(d.launched for d in running.decisions) == launched
    assert all(s["exit_reason"] == "idle" for s in scaler.summaries)
    assert sum(int(s["served"]) for s in scaler.summaries) == 200  # type: ignore[call-overload]
    print(f"200 answered in {answered_after:.1f} s with {launched} agent(s); decisions: {len(running.decisions)}")


@pytest.mark.model(min_hot=1, max_agents=2, idle_ttl_s=600)
async def test_min_hot_agent_is_replaced_and_exactly_one_stays(running: Running) -> None:
    scaler, model = running.scaler, running.model

    def hot() -> list[str]:
        return [a.agent_id for a in scaler.directory.agents(model) if a.state is AgentState.HOT]

    await _wait(lambda: len(hot()) == 1, timeout=30)
    first = hot()[0]
    pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--agent-id {first}"]).split()[0])
    os.kill(pid, signal.SIGKILL)
    await _wait(lambda: hot() and hot()[0] != first, timeout=30)
    await asyncio.sleep(2.0)  # no load: it stays at exactly one
    assert len(hot()) == 1 and len(scaler.launches) == 1
    assert sum(d.launched for d in running.decisions) == 2


def test_a_restarted_scaler_sizes_from_the_throughput_it_measured_before(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "scaler.db")
    log.record(Decision("m", 50, 2, 0, 0, 0.0, 2, 0, "", "before anything was measured"))
    log.record(Decision("m", 50, 2, 0, 0, 12.5, 2, 0, "", "measured"))
    log.record(Decision("m", 0, 0, 0, 0, 0.0, 0, 0, "", "all agents gone"))
    config = Config(models={})
    scaler = Scaler(config, {}, AgentDirectory(heartbeat_s=1.0), log)
    assert scaler._agent_rps("m", [], backlog=50) == 12.5  # not the cold guess

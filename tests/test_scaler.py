"""Issue 4 scenarios with the local launcher and the fake backend: cold start to zero, and min_hot."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika
import httpx
import openai
import pytest

from broker import topology
from broker.config import Config, load_config
from broker.connection import connect
from broker.jobstore import AsyncJobStore, JobStore
from broker.messages import AgentState, Endpoint, Lane
from hpc_agents.decisions import Decision, DecisionLog
from hpc_agents.directory import AgentDirectory
from hpc_agents.launchers.local import LocalLauncher
from hpc_agents.scaler import Scaler
from ops.processes import wait_until_async
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, expected_chat_tokens
from ops.testing.jobs import store_submitted_batch
from ops.testing.stack import Stack, write_config
from producers import bulk

QUIET_TICKS = 8  # how long "nothing happens" is watched: this many more scaler ticks


@dataclass
class Running:
    scaler: Scaler
    stack: Stack
    model: str
    config: Config
    decisions: list[Decision] = field(default_factory=list)
    ticks: int = 0  # how many times the scaler has looked so far

    async def wait(self, condition: Callable[[], object], what: str, timeout_s: float = EVENTUALLY_S) -> None:
        await wait_until_async(condition, timeout_s, what, poll_s=0.1)

    async def watch_quietly(self) -> None:
        """Let the scaler look QUIET_TICKS more times (a scaler that would act has then acted)."""
        until = self.ticks + QUIET_TICKS
        await self.wait(lambda: self.ticks >= until, f"{QUIET_TICKS} more scaler ticks")


@pytest.fixture
async def running(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest
) -> AsyncIterator[Running]:
    marker = request.node.get_closest_marker("model")
    assert marker is not None
    model = f"scaled-{request.node.name[5:25]}-{session_tag}"
    delete_test_queues.append(model)
    table = {"command": FAKE_BACKEND_COMMAND, "max_inflight": 4, **marker.kwargs}
    path = write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, heartbeat_s=1.0, max_queue_wait_s=120)
    config = load_config(path)
    stack = Stack(path, tmp_path)
    stack.start_api()
    connection = await connect(amqp_url, "test-scaler")
    directory = AgentDirectory(config.heartbeat_s)
    await directory.subscribe(connection)
    channel = await connection.channel()
    launcher = LocalLauncher("local", config, max_nodes=4, log_dir=tmp_path / "logs")
    scaler = Scaler(config, {"local": launcher}, directory, tick_s=0.25)
    running = Running(scaler, stack, model, config)
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            running.decisions.extend(await scaler.tick(channel))
            running.ticks += 1
            await asyncio.sleep(scaler.tick_s)

    ticking = asyncio.create_task(loop())
    try:
        yield running
    finally:
        stop.set()
        await ticking
        await asyncio.to_thread(launcher.shutdown)
        await connection.close()
        stack.close()


@pytest.mark.model(min_hot=0, max_agents=3, target_drain_s=2, idle_ttl_s=2.0)
async def test_cold_start_burst_then_back_to_zero(running: Running) -> None:
    scaler, model = running.scaler, running.model
    assert scaler.directory.agents(model) == [] and not scaler.launches
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=250), timeout=STARTUP_S + EVENTUALLY_S)
    # openai types `http_client` for httpx2; it takes an httpx client too
    client = openai.AsyncOpenAI(
        base_url=running.stack.url + "/v1",
        api_key="x",
        max_retries=0,
        http_client=http,  # type: ignore[arg-type]
    )
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
    await running.wait(lambda: not scaler.launches and not scaler.directory.agents(model), "every agent gone")
    await running.watch_quietly()
    assert not scaler.launches and sum(d.launched for d in running.decisions) == launched
    assert all(s["exit_reason"] == "idle" for s in scaler.summaries)
    assert sum(int(s["served"]) for s in scaler.summaries) == 200  # type: ignore[call-overload]
    print(f"200 answered in {answered_after:.1f} s with {launched} agent(s); decisions: {len(running.decisions)}")


@pytest.mark.model(min_hot=1, max_agents=2, idle_ttl_s=600)
async def test_min_hot_agent_is_replaced_and_exactly_one_stays(running: Running) -> None:
    scaler, model = running.scaler, running.model

    def hot() -> list[str]:
        return [a.agent_id for a in scaler.directory.agents(model) if a.state is AgentState.HOT]

    await running.wait(lambda: len(hot()) == 1, "one hot agent", STARTUP_S)
    first = hot()[0]
    pid = int(subprocess.check_output(["pgrep", "-f", "--", f"--agent-id {first}"]).split()[0])
    os.kill(pid, signal.SIGKILL)
    await running.wait(lambda: hot() and hot()[0] != first, "a new hot agent", STARTUP_S)
    await running.watch_quietly()  # no load: it stays at exactly one
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


@pytest.mark.model(min_hot=0, max_agents=3, target_drain_s=2, idle_ttl_s=2.0)
async def test_expired_batch_lines_in_an_unconsumed_queue_start_no_agent(
    running: Running, amqp_url: str, tmp_path: Path
) -> None:
    """Lines published after their batch expired, onto a lane nobody consumes, are dropped by RabbitMQ:
    the scaler sees no backlog and starts nobody (an agent would only find them expired)."""
    store = JobStore(tmp_path / "jobs")
    batch_id = f"batch_expired_{running.model[-12:]}"
    body = json.dumps({"model": running.model, "messages": [{"role": "user", "content": "too late"}]}).encode()
    store_submitted_batch(store, batch_id, running.model, "/v1/chat/completions", [body] * 50, "tester")
    connection = await aio_pika.connect_robust(amqp_url)
    try:
        published = await bulk.dispatch(
            connection, AsyncJobStore(store), batch_id, running.model, Endpoint.CHAT, time.time() - 1, "tester"
        )
        assert published == 50  # RabbitMQ took (and confirmed) every line
        await running.watch_quietly()
        assert not running.scaler.launches and sum(d.launched for d in running.decisions) == 0
        channel = await connection.channel()
        assert await topology.queue_depth(channel, running.model, Lane.BATCH) == (0, 0)
        await channel.queue_delete(topology.results_queue_name(batch_id))
    finally:
        await connection.close()
        store.close()

"""Issue 3 acceptance 2-6: the agent's lifecycle, with a non-vLLM backend command (the fake backend)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest

from broker import messages, topology
from broker.messages import AgentState, AgentStatus
from hpc_agents.agent import run_agent
from ops.processes import Child, pid_alive, wait_until, wait_until_async
from ops.testing.deadlines import EVENTUALLY_S, STOP_S
from ops.testing.fake_backend import FAKE_BACKEND_COMMAND, Hold, expected_chat_tokens, fake_stats
from ops.testing.http import openai_client
from ops.testing.stack import Stack, wait_for_event, write_config


@pytest.fixture
def model(session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest) -> str:
    name = f"agent-{request.node.name[:30]}-{session_tag}"
    delete_test_queues.append(name)
    return name


def _config(tmp_path: Path, amqp_url: str, model: str, **model_table: object) -> Path:
    table: dict[str, object] = {"command": FAKE_BACKEND_COMMAND, "max_inflight": 4, "reserved_interactive": 1}
    table.update(model_table)
    return write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, heartbeat_s=0.3)


@pytest.fixture
def api(tmp_path: Path, amqp_url: str, model: str) -> Iterator[Stack]:
    stack = Stack(_config(tmp_path, amqp_url, model, idle_ttl_s=600, drain_grace_s=10), tmp_path)
    stack.start_api()
    yield stack
    stack.close()


def _ask(stack: Stack, model: str, text: str, extra: dict[str, object] | None = None) -> str:
    answer = openai_client(stack.url + "/v1").chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=extra
    )
    return answer.choices[0].message.content or ""


def _backend_in_flight(agent: Child, count: int) -> str:
    """The URL of the agent's backend, once `count` requests are in it."""
    url = str(wait_for_event(agent, "backend_ready")["url"])
    wait_until(lambda: fake_stats(url)["active"] == count, EVENTUALLY_S, f"{count} requests in {url}", agent)
    return url


def test_idle_agent_exits_zero_and_leaves_no_backend(tmp_path: Path, amqp_url: str, model: str) -> None:
    stack = Stack(_config(tmp_path, amqp_url, model, idle_ttl_s=1.0), tmp_path)
    try:
        agent = stack.start_agent(model)
        assert agent.wait(timeout=EVENTUALLY_S) == 0
        backend_pid = wait_for_event(agent, "backend_started")["pid"]
        assert wait_for_event(agent, "backend_ready")  # it really ran
        assert wait_for_event(agent, "backend_stopped")["pid"] == backend_pid and not pid_alive(backend_pid)
        assert wait_for_event(agent, "agent_exit")["exit_reason"] == "idle"
    finally:
        stack.close()


def test_sigterm_hands_in_flight_back_at_once_and_requeues_the_rest(api: Stack, model: str, tmp_path: Path) -> None:
    hold = Hold(tmp_path / "release")
    first = api.start_agent(model)
    wait_for_event(first, "worker_started")
    texts = [f"drain request {i}" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        answers = [pool.submit(_ask, api, model, text, hold.field) for text in texts]
        _backend_in_flight(first, 4)  # four in the backend, eight waiting in the queue
        first.send_signal(signal.SIGTERM)
        assert wait_for_event(first, "worker_draining")["inflight"] == 4
        # The four in flight can be served again elsewhere: handed back at once, the agent leaves.
        assert first.wait(timeout=STOP_S) == 0
        hold.release()
        second = api.start_agent(model)
        results = [future.result(timeout=EVENTUALLY_S) for future in answers]
    assert first.wait(timeout=STOP_S) == 0
    for text, result in zip(texts, results):
        assert result == "".join(expected_chat_tokens(text, None)[0])
    served_first = wait_for_event(first, "agent_exit")["served"]
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=STOP_S) == 0
    served_second = wait_for_event(second, "agent_exit")["served"]
    assert served_first == 0 and served_second == 12  # all handed over, none twice


def test_backend_killed_under_load_is_restarted_and_every_request_answered(
    api: Stack, tmp_path: Path, model: str
) -> None:
    hold = Hold(tmp_path / "release")
    agent = api.start_agent(model)
    backend_pid = int(wait_for_event(agent, "backend_started")["pid"])
    wait_for_event(agent, "worker_started")
    texts = [f"crash request {i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        answers = [pool.submit(_ask, api, model, text, hold.field) for text in texts]
        _backend_in_flight(agent, 4)
        os.kill(backend_pid, signal.SIGKILL)
        wait_for_event(agent, "backend_died")
        assert int(wait_for_event(agent, "backend_started", count=2)["pid"]) != backend_pid
        hold.release()
        results = [future.result(timeout=EVENTUALLY_S) for future in answers]
    for text, result in zip(texts, results):
        assert result == "".join(expected_chat_tokens(text, None)[0])
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=STOP_S) == 0
    assert wait_for_event(agent, "agent_exit")["backend_restarts"] == 1


async def test_announcer_reports_states_and_heartbeats(api: Stack, model: str, amqp_url: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await topology.declare_exchanges(channel)
    events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
    watch = await channel.declare_queue(exclusive=True)
    await watch.bind(events, routing_key="agent.#")
    statuses: list[AgentStatus] = []

    async def take_statuses() -> None:
        while (message := await watch.get(no_ack=True, fail=False)) is not None:
            status = messages.decode_as(message.body, AgentStatus)
            if status.model == model:
                statuses.append(status)

    async def heartbeats_after_the_answers() -> bool:
        await take_statuses()
        return sum(1 for status in statuses if status.heartbeat and status.served == 3) >= 3

    agent = api.start_agent(model)
    await asyncio.to_thread(wait_for_event, agent, "worker_started")
    for i in range(3):
        await asyncio.to_thread(_ask, api, model, f"count me {i} please", {"fake_delay_ms": 200})
    await wait_until_async(heartbeats_after_the_answers, EVENTUALLY_S, "three heartbeats while hot", agent)
    agent.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agent.wait, STOP_S) == 0
    await take_statuses()
    await connection.close()

    changes = [s.state for s in statuses if not s.heartbeat]
    assert changes == [AgentState.STARTING, AgentState.LOADING, AgentState.HOT, AgentState.DRAINING, AgentState.STOPPED]
    beats = [s for s in statuses if s.heartbeat]
    assert len(beats) >= 3
    assert [b.uptime_s for b in beats] == sorted(b.uptime_s for b in beats)
    assert beats[-1].served == 3
    assert any(b.tokens_per_s > 0 for b in beats)  # 3 answers of 4 tokens each went by
    assert all(b.node == socket.gethostname() and b.backend.startswith("http://127.0.0.1:") for b in beats)
    assert all(0 <= b.inflight <= 4 for b in beats)


def test_run_agent_in_process_with_a_dict(api: Stack, amqp_url: str, model: str, tmp_path: Path) -> None:
    """As a Globus Compute task would: plain dict in, summary dict out, no signal handlers."""
    params = {
        "model": model,
        "cluster": "test-cluster",
        "config": {
            "amqp_url": amqp_url,
            "data_dir": str(tmp_path / "data"),
            "models": {model: {"command": FAKE_BACKEND_COMMAND, "idle_ttl_s": 1.5, "max_inflight": 2}},
        },
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_agent, params)
        assert _ask(api, model, "in process") == "echo: ni ssecorp"
        summary = running.result(timeout=EVENTUALLY_S)
    assert summary["exit_reason"] == "idle" and summary["served"] == 1
    assert summary["cluster"] == "test-cluster" and summary["backend_restarts"] == 0
    assert summary["completion_tokens"] == 3 and summary["backend_ready_s"] > 0

"""Issue 3 acceptance 2-6: the agent's lifecycle, with a non-vLLM backend command (the fake backend)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import openai
import pytest

from broker import messages, topology
from broker.messages import AgentState, AgentStatus
from hpc_agents.agent import run_agent
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import Stack, write_config

FAKE_COMMAND = ["{python}", "-m", "ops.testing.fake_backend", "--port", "{port}", "--model", "{model}"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def model(session_tag: str, delete_test_queues: list[str], request: pytest.FixtureRequest) -> str:
    name = f"agent-{request.node.name[:30]}-{session_tag}"
    delete_test_queues.append(name)
    return name


def _config(tmp_path: Path, amqp_url: str, model: str, **model_table: object) -> Path:
    table: dict[str, object] = {"command": FAKE_COMMAND, "max_inflight": 4, "reserved_interactive": 1}
    table.update(model_table)
    return write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, heartbeat_s=0.3)


def _start_agent(config: Path, model: str, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "agent", "--config", str(config), "--model", model],
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),
        cwd=ROOT,
    )


def _events(log: Path) -> list[dict[str, object]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


def _wait_event(log: Path, name: str, timeout: float = 30, count: int = 1) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [e for e in _events(log) if e.get("event") == name]
        if len(found) >= count:
            return found[count - 1]
        time.sleep(0.05)
    raise TimeoutError(f"{name} not logged:\n{log.read_text()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def api(tmp_path: Path, amqp_url: str, model: str) -> Iterator[tuple[Stack, Path]]:
    config = _config(tmp_path, amqp_url, model, idle_ttl_s=600, drain_grace_s=10)
    stack = Stack(config, tmp_path)
    stack.start_api()
    yield stack, config
    stack.close()


def _ask(stack: Stack, model: str, text: str, delay_ms: int = 0) -> str:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body={"fake_delay_ms": delay_ms}
    )
    return answer.choices[0].message.content or ""


def test_idle_agent_exits_zero_and_leaves_no_backend(tmp_path: Path, amqp_url: str, model: str) -> None:
    config = _config(tmp_path, amqp_url, model, idle_ttl_s=1.0)
    log = tmp_path / "agent.log"
    agent = _start_agent(config, model, log)
    backend_pid = int(_wait_event(log, "backend_started")["pid"])  # type: ignore[arg-type]
    assert _alive(backend_pid)
    assert agent.wait(timeout=30) == 0
    assert not _alive(backend_pid)
    assert _wait_event(log, "agent_exit")["exit_reason"] == "idle"


def test_sigterm_drains_in_flight_and_requeues_the_rest(api: tuple[Stack, Path], tmp_path: Path, model: str) -> None:
    stack, config = api
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = _start_agent(config, model, first_log)
    _wait_event(first_log, "worker_started")
    texts = [f"drain request {i}" for i in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        answers = [pool.submit(_ask, stack, model, text, 1500) for text in texts]
        time.sleep(0.8)  # four in the backend, eight waiting in the queue
        first.send_signal(signal.SIGTERM)
        second = _start_agent(config, model, second_log)
        results = [future.result(timeout=60) for future in answers]
    assert first.wait(timeout=30) == 0
    for text, result in zip(texts, results):
        assert result == "".join(expected_chat_tokens(text, None)[0])
    served_first = _wait_event(first_log, "agent_exit")["served"]
    second.send_signal(signal.SIGTERM)
    assert second.wait(timeout=30) == 0
    served_second = _wait_event(second_log, "agent_exit")["served"]
    assert served_first == 4 and served_second == 8  # in-flight finished, the rest requeued, none twice


def test_backend_killed_under_load_is_restarted_and_every_request_answered(
    api: tuple[Stack, Path], tmp_path: Path, model: str
) -> None:
    stack, config = api
    log = tmp_path / "agent.log"
    agent = _start_agent(config, model, log)
    backend_pid = int(_wait_event(log, "backend_started")["pid"])  # type: ignore[arg-type]
    _wait_event(log, "worker_started")
    texts = [f"crash request {i}" for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
        answers = [pool.submit(_ask, stack, model, text, 400) for text in texts]
        time.sleep(0.6)
        os.kill(backend_pid, signal.SIGKILL)
        results = [future.result(timeout=90) for future in answers]
    for text, result in zip(texts, results):
        assert result == "".join(expected_chat_tokens(text, None)[0])
    _wait_event(log, "backend_died")
    assert int(_wait_event(log, "backend_started", count=2)["pid"]) != backend_pid  # type: ignore[arg-type]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=30) == 0
    assert _wait_event(log, "agent_exit")["backend_restarts"] == 1


async def test_registry_reports_states_and_heartbeats(
    api: tuple[Stack, Path], tmp_path: Path, model: str, amqp_url: str
) -> None:
    stack, config = api
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    await topology.declare_exchanges(channel)
    events = await channel.get_exchange(topology.EVENTS_EXCHANGE)
    watch = await channel.declare_queue(exclusive=True)
    await watch.bind(events, routing_key="agent.#")
    log = tmp_path / "agent.log"
    agent = _start_agent(config, model, log)
    await asyncio.to_thread(_wait_event, log, "worker_started")
    for i in range(3):
        await asyncio.to_thread(_ask, stack, model, f"count me {i} please", 200)
    await asyncio.sleep(1.0)  # a few heartbeats while hot
    agent.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agent.wait, 30) == 0

    statuses: list[AgentStatus] = []
    while (message := await watch.get(no_ack=True, fail=False)) is not None:
        status = messages.decode_as(message.body, AgentStatus)
        if status.model == model:
            statuses.append(status)
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


def test_run_agent_in_process_with_a_dict(api: tuple[Stack, Path], amqp_url: str, model: str, tmp_path: Path) -> None:
    """As a Globus Compute task would: plain dict in, summary dict out, no signal handlers."""
    stack, _ = api
    params = {
        "model": model,
        "cluster": "test-cluster",
        "config": {
            "amqp_url": amqp_url,
            "data_dir": str(tmp_path / "data"),
            "models": {model: {"command": FAKE_COMMAND, "idle_ttl_s": 1.5, "max_inflight": 2}},
        },
    }
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(run_agent, params)
        assert _ask(stack, model, "in process") == "echo: ni ssecorp"
        summary = running.result(timeout=60)
    assert summary["exit_reason"] == "idle" and summary["served"] == 1
    assert summary["cluster"] == "test-cluster" and summary["backend_restarts"] == 0
    assert summary["completion_tokens"] == 3 and summary["backend_ready_s"] > 0

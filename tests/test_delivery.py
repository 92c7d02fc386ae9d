"""Acceptance 4, 5 and 7: at-least-once delivery, reconnects and cancellation, with real processes."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import openai
import pytest

from broker import topology
from broker.messages import Lane
from ops.testing.fake_backend import expected_chat_tokens, running_fake_backend
from ops.testing.stack import Stack, write_config
from tests import rabbitmq_roles


@pytest.fixture
def stack(
    tmp_path: Path, amqp_url: str, fake_model: str, fake_backend_url: str, delete_test_queues: list[str]
) -> Iterator[Stack]:
    """An API with no worker yet: each test places its workers itself."""
    delete_test_queues.append(fake_model)
    config = write_config(
        tmp_path / "hotq.toml",
        amqp_url,
        {fake_model: {"backend_url": fake_backend_url, "max_inflight": 4}},
        stream_flush_ms=0,
    )
    stack = Stack(config, tmp_path)
    stack.start_api()
    yield stack
    stack.close()


def _stats(backend_url: str) -> dict[str, object]:
    return httpx.get(backend_url + "/_stats").json()


def _wait_until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_killed_worker_non_streaming_request_is_answered_once_by_another(
    stack: Stack, fake_model: str, fake_backend_url: str
) -> None:
    first = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset")
    answers: list[object] = []
    call = threading.Thread(
        target=lambda: answers.append(
            _client(stack).chat.completions.create(
                model=fake_model,
                messages=[{"role": "user", "content": "survive this"}],
                extra_body={"fake_delay_ms": 1500},
            )
        )
    )
    call.start()
    _wait_until(lambda: _stats(fake_backend_url)["active"] == 1)  # the first worker holds it
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    call.join(timeout=30)
    assert not call.is_alive()
    assert len(answers) == 1
    tokens, _ = expected_chat_tokens("survive this", None)
    assert answers[0].choices[0].message.content == "".join(tokens)  # type: ignore[attr-defined]
    assert _stats(fake_backend_url)["started"] == 2  # computed twice, answered once


def test_killed_worker_mid_stream_gives_error_event(stack: Stack, fake_model: str) -> None:
    first = stack.start_worker(fake_model)
    stack.start_worker(fake_model)
    received: list[str] = []
    # Both workers can hold it; find which one does by killing only after output flowed.
    stream = _client(stack).chat.completions.create(
        model=fake_model,
        messages=[{"role": "user", "content": " ".join(["tok"] * 50)}],
        stream=True,
        extra_body={"fake_delay_ms": 100},
    )
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
            if len(received) == 3:
                for worker in stack.workers:  # kill whichever holds it: both
                    worker.send_signal(signal.SIGKILL)
                stack.start_worker(fake_model)  # someone to take the redelivery
    assert "worker_lost" in str(caught.value.body) or "lost" in caught.value.message
    assert len(received) >= 3
    del first


def test_request_succeeds_after_broker_connections_are_closed(stack: Stack, fake_model: str, amqp_url: str) -> None:
    stack.start_worker(fake_model)
    client = _client(stack)
    assert client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "before"}])
    rabbitmq_roles.close_connections(amqp_url, "hotq test: forced close")
    answer = client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "after it"}])
    assert answer.choices[0].message.content == "echo: retfa ti"
    for log in ("api.log", "worker1.log"):  # both really lost their connections, and came back
        assert "CONNECTION_FORCED - hotq test: forced close" in stack.log(log)


def test_client_disconnect_cancels_backend_call_within_a_second(
    stack: Stack, fake_model: str, fake_backend_url: str
) -> None:
    stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset")
    stream = _client(stack).chat.completions.create(
        model=fake_model,
        messages=[{"role": "user", "content": " ".join(["slow"] * 200)}],
        stream=True,
        extra_body={"fake_delay_ms": 50, "fake_tag": "walk-away"},
    )
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()
    closed_at = time.time()
    _wait_until(lambda: "walk-away" in _stats(fake_backend_url)["cancelled_tags"], timeout=5)  # type: ignore[operator]
    cancelled_at = _stats(fake_backend_url)["cancelled_tags"]["walk-away"]  # type: ignore[index]
    assert cancelled_at - closed_at < 1.0


def test_worker_sigterm_finishes_in_flight_then_exits_zero(stack: Stack, fake_model: str) -> None:
    worker = stack.start_worker(fake_model)
    answers: list[str] = []
    call = threading.Thread(
        target=lambda: answers.append(
            _client(stack)
            .chat.completions.create(
                model=fake_model,
                messages=[{"role": "user", "content": "finish me"}],
                extra_body={"fake_delay_ms": 1000},
            )
            .choices[0]
            .message.content
            or ""
        )
    )
    call.start()
    time.sleep(0.5)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    call.join(timeout=30)
    assert answers == ["echo: hsinif em"]


def test_request_expired_in_queue_is_never_computed(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    model = f"expiring-{session_tag}"
    delete_test_queues.append(model)
    with running_fake_backend([model]) as fake_backend_url:
        config = write_config(
            tmp_path / "hotq.toml", amqp_url, {model: {"backend_url": fake_backend_url}}, max_queue_wait_s=1
        )
        _expired_request_is_not_computed(Stack(config, tmp_path), model, fake_backend_url)


def _expired_request_is_not_computed(stack: Stack, model: str, fake_backend_url: str) -> None:
    try:
        stack.start_api()
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "too late"}])
        assert caught.value.status_code == 503
        httpx.post(fake_backend_url + "/_reset")
        stack.start_worker(model)
        time.sleep(1.0)
        assert _stats(fake_backend_url)["started"] == 0
        answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "in time"}])
        assert answer.choices[0].message.content == "echo: ni emit"
    finally:
        stack.close()


def _ready_messages(amqp_url: str, model: str) -> int:
    """Requests waiting in the model's interactive queue (exact, unlike RabbitMQ's sampled stats)."""

    async def depth() -> int:
        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            ready, _ = await topology.queue_depth(await connection.channel(), model, Lane.INTERACTIVE)
            return ready

    return asyncio.run(depth())


def test_requests_cancelled_before_they_start_give_their_slots_back(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    """Issue 15 §1: a cancel that reaches the worker before the request's handler has started
    must still settle the delivery, or each such request holds one of `max_inflight` for ever."""
    model = f"early-cancel-{session_tag}"
    delete_test_queues.append(model)
    with running_fake_backend([model]) as fake_backend_url:
        config = write_config(
            tmp_path / "hotq.toml", amqp_url, {model: {"backend_url": fake_backend_url, "max_inflight": 2}}
        )
        stack = Stack(config, tmp_path)
        try:
            stack.start_api()
            worker = stack.start_worker(model)
            body = {"model": model, "messages": [{"role": "user", "content": "never mind"}]}
            for left in (1, 2):
                worker.send_signal(signal.SIGSTOP)  # the delivery and the cancel both wait for it
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=0.3)
                _wait_until(lambda left=left: stack.log("api.log").count('"status": 499') >= left, timeout=60)
                worker.send_signal(signal.SIGCONT)
            # Both slots serve again: two slow requests run in the backend at once.
            httpx.post(fake_backend_url + "/_reset")
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)
            calls = [
                threading.Thread(
                    target=lambda: client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": "both at once"}],
                        extra_body={"fake_delay_ms": 3000},
                    )
                )
                for _ in range(2)
            ]
            for call in calls:
                call.start()
            _wait_until(lambda: _stats(fake_backend_url)["active"] == 2, timeout=60)
            for call in calls:
                call.join(timeout=120)
            assert _stats(fake_backend_url)["completed"] == 2
            # Every delivery was settled: a worker that leaves hands nothing back.
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=60) == 0
            assert _ready_messages(amqp_url, model) == 0
        finally:
            stack.close()

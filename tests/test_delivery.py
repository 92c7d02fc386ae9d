"""Acceptance 4, 5 and 7: at-least-once delivery, reconnects and cancellation, with real processes.

A stream whose worker dies mid-way: tests/test_stream_migration.py."""

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
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, STOP_S, in_growing_windows
from ops.testing.fake_backend import Hold, expected_chat_tokens, fake_stats, running_fake_backend
from ops.testing.stack import Stack, wait_for_event, write_config
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


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)


def _backend_sees(backend_url: str, what: str, condition: object) -> None:
    wait_until(lambda: condition(fake_stats(backend_url)), EVENTUALLY_S, what)  # type: ignore[operator]


def test_killed_worker_non_streaming_request_is_answered_once_by_another(
    stack: Stack, fake_model: str, fake_backend_url: str, tmp_path: Path
) -> None:
    first = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    hold = Hold(tmp_path / "release")  # the backend answers only once both workers have called it
    answers: list[object] = []
    call = threading.Thread(
        target=lambda: answers.append(
            _client(stack).chat.completions.create(
                model=fake_model, messages=[{"role": "user", "content": "survive this"}], extra_body=hold.field
            )
        )
    )
    call.start()
    _backend_sees(fake_backend_url, "the first worker's call", lambda stats: stats["active"] == 1)
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    _backend_sees(fake_backend_url, "the redelivery's call", lambda stats: stats["started"] == 2)
    hold.release()
    call.join(timeout=EVENTUALLY_S)
    assert not call.is_alive()
    assert len(answers) == 1
    tokens, _ = expected_chat_tokens("survive this", None)
    assert answers[0].choices[0].message.content == "".join(tokens)  # type: ignore[attr-defined]
    assert fake_stats(fake_backend_url)["started"] == 2  # computed twice, answered once


def test_request_succeeds_after_broker_connections_are_closed(stack: Stack, fake_model: str, amqp_url: str) -> None:
    stack.start_worker(fake_model)
    client = _client(stack)
    assert client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "before"}])
    rabbitmq_roles.close_connections(amqp_url, "hotq test: forced close")
    answer = client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "after it"}])
    assert answer.choices[0].message.content == "echo: retfa ti"
    for log in ("api.log", "worker1.log"):  # both really lost their connections, and came back
        assert "CONNECTION_FORCED - hotq test: forced close" in stack.log(log)


def test_client_disconnect_cancels_backend_call(stack: Stack, fake_model: str, fake_backend_url: str) -> None:
    stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    # 120 s of generation at 50 ms a token: a cancel that does not propagate lets it run out (or
    # the wait for the cancel ends first), however slow the machine. How soon the backend saw the
    # client leave (about a second on a quiet machine, acceptance 7) is printed, not asserted.
    words = 2400
    stream = _client(stack).chat.completions.create(
        model=fake_model,
        messages=[{"role": "user", "content": " ".join(["slow"] * words)}],
        stream=True,
        extra_body={"fake_delay_ms": 50, "fake_tag": "walk-away"},
    )
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    stream.close()
    closed_at = time.monotonic()  # CLOCK_MONOTONIC: the fake backend's process reads the same clock
    _backend_sees(fake_backend_url, "the call cancelled", lambda stats: "walk-away" in stats["cancelled_tags"])
    stats = fake_stats(fake_backend_url)
    assert stats["completed"] == 0 and stats["cancelled_after_tokens"]["walk-away"] < words  # cut, not run out
    took_s = stats["cancelled_tags_monotonic"]["walk-away"] - closed_at
    print(f"\nthe backend saw the client leave {took_s * 1000:.0f} ms after it closed the stream")


def test_worker_sigterm_hands_in_flight_back_then_exits_zero(
    stack: Stack, fake_model: str, fake_backend_url: str, tmp_path: Path
) -> None:
    worker = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    hold = Hold(tmp_path / "release")
    answers: list[str] = []
    call = threading.Thread(
        target=lambda: answers.append(
            _client(stack)
            .chat.completions.create(
                model=fake_model, messages=[{"role": "user", "content": "finish me"}], extra_body=hold.field
            )
            .choices[0]
            .message.content
            or ""
        )
    )
    call.start()
    _backend_sees(fake_backend_url, "the request in flight", lambda stats: stats["active"] == 1)
    worker.send_signal(signal.SIGTERM)
    assert wait_for_event(worker, "worker_draining")["inflight"] == 1
    # A request another worker can serve again is handed back at once: the worker leaves although
    # its request is still held in the backend (streams: tests/test_stream_migration.py).
    assert worker.wait(timeout=STOP_S) == 0
    stack.start_worker(fake_model)
    hold.release()
    call.join(timeout=EVENTUALLY_S)
    assert answers == ["echo: hsinif em"]


def test_request_expired_in_queue_is_never_computed(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> None:
    """The first request waits for a worker longer than max_queue_wait_s, in vain; the second, sent
    once one runs, must start within it (a running worker takes it at once, a slow machine may not)."""

    def attempt(queue_wait_s: float) -> str | None:
        # A model (so a queue) and a backend per attempt: nothing an earlier attempt left reaches this one.
        model = f"expiring-{queue_wait_s:g}-{session_tag}"
        delete_test_queues.append(model)
        workdir = tmp_path / model
        workdir.mkdir()
        with running_fake_backend([model]) as fake_backend_url:
            table = {model: {"backend_url": fake_backend_url}}
            config = write_config(workdir / "hotq.toml", amqp_url, table, max_queue_wait_s=queue_wait_s)
            return _expired_request_is_not_computed(Stack(config, workdir), model, fake_backend_url)

    in_growing_windows(attempt, first_s=4)


def _expired_request_is_not_computed(stack: Stack, model: str, fake_backend_url: str) -> str | None:
    """None, or why the wait was too short here: the request sent to a running worker expired too."""
    try:
        stack.start_api()
        client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "too late"}])
        assert caught.value.status_code == 503
        httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
        stack.start_worker(model)
        try:
            answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "in time"}])
        except openai.InternalServerError as error:
            if error.status_code == 503 and "no consumer took the request within" in error.message:
                return f"a running worker did not start a request (its log:\n{stack.workers[0].log_tail()})"
            raise
        assert answer.choices[0].message.content == "echo: ni emit"
        # The expired request was ahead of it in the queue, so the worker decided on it first: dropped.
        assert fake_stats(fake_backend_url)["started"] == 1
        wait_for_event(stack.workers[0], "request_dropped")
        return None
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
                # The worker is stopped, so no answer can come: the client gives up (and the API logs 499).
                with pytest.raises(httpx.TimeoutException):
                    httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=0.3)

                def logged(count: int = left) -> bool:
                    return stack.log("api.log").count('"status": 499') >= count

                wait_until(logged, EVENTUALLY_S, f"{left} request(s) logged as left by their client")
                worker.send_signal(signal.SIGCONT)
            # Both slots serve again: two requests are in the backend at once.
            httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
            hold = Hold(tmp_path / "release")
            client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)
            calls = [
                threading.Thread(
                    target=lambda: client.chat.completions.create(
                        model=model, messages=[{"role": "user", "content": "both at once"}], extra_body=hold.field
                    )
                )
                for _ in range(2)
            ]
            for call in calls:
                call.start()
            _backend_sees(fake_backend_url, "both requests in the backend", lambda stats: stats["active"] == 2)
            hold.release()
            for call in calls:
                call.join(timeout=EVENTUALLY_S)
            assert fake_stats(fake_backend_url)["completed"] == 2
            # Every delivery was settled: a worker that leaves hands nothing back.
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=STOP_S) == 0
            assert _ready_messages(amqp_url, model) == 0
        finally:
            stack.close()

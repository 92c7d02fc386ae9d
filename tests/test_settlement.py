"""Issue 15 §1 as a property: whatever happens to requests under load, every delivery is settled
and every backend slot comes back.

Client threads send a seeded random mix of requests through a real API and worker to the fake
backend: answered ones, streams read to the end, streams the client leaves after a few chunks,
requests the client drops before or while they run, streams whose backend connection breaks
mid-answer, backend errors. Meanwhile, at random points of the run, the worker is stopped
(SIGSTOP) while clients leave, so that the deliveries and their cancels reach it together, the
backend goes away mid-answer and comes back at the same address, and every AMQP connection of
the test's vhost is force-closed. Afterwards RabbitMQ itself must show
the model's queue empty, with nothing unacknowledged, and the worker must run `max_inflight`
requests at once again and answer them all. Nothing here depends on timing: when a client leaves
is random, and whatever it hits, the checks must hold. The seed is printed;
HOTQ_SETTLEMENT_SEED=N repeats a run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import topology
from broker.messages import Lane
from ops.processes import Child, free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S, STOP_S
from ops.testing.fake_backend import Hold, expected_chat_tokens, fake_stats, running_fake_backend
from ops.testing.stack import Stack, api_and_worker, ready_messages
from tests import rabbitmq_roles

MAX_INFLIGHT = 4
REQUESTS = 96
CLIENTS = 8
LEAVING_WHILE_STOPPED = 2  # clients that leave while the worker is stopped, per stop
ACTIONS = ("answer", "stream", "leave_stream", "leave_early", "backend_breaks", "backend_fails")
WORDS = "settle every delivery exactly once and give every slot back".split()


@dataclasses.dataclass(frozen=True)
class Plan:
    action: str
    words: int  # the reply has words + 1 tokens
    stream: bool
    after: int  # leave_stream: data lines read; backend_breaks: tokens before the break
    leave_after_s: float  # leave_early: when the client gives up


def _plans(rng: random.Random) -> list[Plan]:
    return [
        Plan(
            action=rng.choice(ACTIONS),
            words=rng.randint(2, len(WORDS)),
            stream=rng.random() < 0.5,
            after=rng.randint(0, 4),
            leave_after_s=rng.uniform(0.0, 0.4),
        )
        for _ in range(REQUESTS)
    ]


def _body(model: str, plan: Plan) -> dict[str, Any]:
    text = " ".join(WORDS[: plan.words])
    if plan.action == "backend_fails":
        text = "FAIL 500 " + text
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}], "fake_delay_ms": 20}
    if plan.action in ("stream", "leave_stream", "backend_breaks") or (plan.action == "leave_early" and plan.stream):
        body["stream"] = True
    if plan.action == "backend_breaks":
        body["fake_break_after"] = plan.after
    return body


def _act(client: httpx.Client, url: str, model: str, plan: Plan) -> None:
    """One client's request; what it gets back does not matter here, only what it leaves behind."""
    body = _body(model, plan)
    try:
        if plan.action == "leave_early":
            # The client gives up at a random moment: before the request is queued, while it is
            # queued, as it starts or while it runs.
            client.post(url, json=body, timeout=max(plan.leave_after_s, 0.001))
        elif body.get("stream"):
            with client.stream("POST", url, json=body, timeout=EVENTUALLY_S) as response:
                read = 0
                for line in response.iter_lines():
                    read += line.startswith("data:")
                    if plan.action == "leave_stream" and read > plan.after:
                        break  # leaving the block closes the connection mid-stream
        else:
            client.post(url, json=body, timeout=EVENTUALLY_S)
    except httpx.HTTPError:
        pass  # timeouts are the point of leave_early; the forced closes cut others


def _queue_counts(amqp_url: str, queue: str) -> tuple[int, int, int]:
    """(ready, unacknowledged, consumers) of `queue`, as RabbitMQ counts them."""
    vhost = rabbitmq_roles.vhost_of(amqp_url)
    columns = ("messages_ready", "messages_unacknowledged", "consumers")
    out = rabbitmq_roles.rabbitmqctl("list_queues", "-q", "-p", vhost, "name", *columns, "--formatter", "json")
    for row in json.loads(out[out.index("[") :]):
        if row["name"] == queue:
            ready, unacknowledged, consumers = (int(row[column]) for column in columns)
            return ready, unacknowledged, consumers
    raise AssertionError(f"no queue {queue} in RabbitMQ")


def _settled(amqp_url: str, queue: str) -> bool:
    ready, unacknowledged, _ = _queue_counts(amqp_url, queue)
    return ready == 0 and unacknowledged == 0


class _Load:
    """CLIENTS threads working through the plans; `done` counts the requests finished. `pause`
    lets the requests under way finish and starts no more until `resume`."""

    def __init__(self, stack: Stack, model: str, plans: list[Plan]) -> None:
        self._url = stack.url + "/v1/chat/completions"
        self._model = model
        self._plans = iter(plans)
        self._lock = threading.Lock()
        self._going = threading.Event()
        self._going.set()
        self.done = 0
        self.busy = 0
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finished(self) -> bool:
        return not any(thread.is_alive() for thread in self._threads)

    def wait_for(self, done: int) -> None:
        wait_until(lambda: self.done >= done or self.finished(), LONG_WORK_S, f"{done} requests done")

    def pause(self) -> None:
        self._going.clear()
        wait_until(lambda: self.busy == 0, LONG_WORK_S, "the requests under way finished")

    def resume(self) -> None:
        self._going.set()

    def _client(self) -> None:
        with httpx.Client() as client:
            while True:
                self._going.wait()
                with self._lock:
                    plan = next(self._plans, None)
                    self.busy += plan is not None
                if plan is None:
                    return
                try:
                    _act(client, self._url, self._model, plan)
                finally:
                    with self._lock:
                        self.done += 1
                        self.busy -= 1


def _leave_while_stopped(stack: Stack, backend: _Backend, worker: Child, model: str, amqp_url: str) -> None:
    """Stop the worker, let clients leave requests it has not seen, go on: it then receives the
    deliveries and their cancels together (the race of issue 15 §1). The rest of the load waits
    meanwhile, so that the worker has prefetch room for the deliveries (a leaked one excepted)."""
    queue = topology.request_queue_name(model, Lane.INTERACTIVE)
    # Consuming (again, after a forced close): else the API answers 503 at once, and nobody leaves.
    wait_until(lambda: _queue_counts(amqp_url, queue)[2] == 1, EVENTUALLY_S, "the worker consuming", worker)
    wait_until(lambda: fake_stats(backend.url)["active"] == 0, EVENTUALLY_S, "the backend idle", worker)
    left_before = stack.log("api.log").count('"status": 499')
    worker.send_signal(signal.SIGSTOP)
    try:
        body = {"model": model, "messages": [{"role": "user", "content": "never mind"}]}
        for _ in range(LEAVING_WHILE_STOPPED):
            with contextlib.suppress(httpx.TimeoutException):
                httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=0.3)
        wait_until(
            lambda: stack.log("api.log").count('"status": 499') >= left_before + LEAVING_WHILE_STOPPED,
            EVENTUALLY_S,
            "the API noticed the clients leave",
        )
    finally:
        worker.send_signal(signal.SIGCONT)


@pytest.fixture
def model(session_tag: str, delete_test_queues: list[str]) -> str:
    delete_test_queues.append(f"settlement-{session_tag}")
    return f"settlement-{session_tag}"


class _Backend:
    """The fake backend on a port of its own, so that it can go away and come back at the same URL."""

    def __init__(self, model: str) -> None:
        self._model = model
        self._port = free_port()
        self.url = f"http://127.0.0.1:{self._port}"
        self._running = contextlib.ExitStack()

    def start(self) -> None:
        self._running = contextlib.ExitStack()
        self._running.enter_context(running_fake_backend([self._model], port=self._port))

    def stop(self) -> None:
        """SIGTERM: what it is answering is cut off a moment later, with its connections."""
        self._running.close()


@pytest.fixture
def backend(model: str) -> Iterator[_Backend]:
    backend = _Backend(model)
    backend.start()
    try:
        yield backend
    finally:
        backend.stop()


@pytest.fixture
def stack(tmp_path: Path, amqp_url: str, model: str, backend: _Backend) -> Iterator[Stack]:
    table = {"backend_url": backend.url, "max_inflight": MAX_INFLIGHT}
    with api_and_worker(tmp_path, amqp_url, model, table, max_queue_wait_s=30) as stack:
        yield stack


def test_every_delivery_is_settled_and_every_slot_comes_back(
    stack: Stack, backend: _Backend, model: str, amqp_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("HOTQ_SETTLEMENT_SEED") or random.randrange(2**32))
    print(f"settlement seed {seed} (HOTQ_SETTLEMENT_SEED={seed} repeats this run)")
    rng = random.Random(seed)
    plans = _plans(rng)
    kinds = ["stop", "stop", "close", "close", "backend", "backend"]
    points = sorted(rng.sample(range(8, REQUESTS - 8), len(kinds)))
    chaos = dict(zip(points, rng.sample(kinds, len(kinds)), strict=True))
    print(f"actions {[plan.action for plan in plans]}, chaos after {chaos}")
    worker = stack.workers[0]

    load = _Load(stack, model, plans)
    load.start()
    for point, kind in chaos.items():
        load.wait_for(point)
        if kind == "stop":
            load.pause()
            _leave_while_stopped(stack, backend, worker, model, amqp_url)
            load.resume()
        elif kind == "backend":
            backend.stop()
            backend.start()
        else:
            rabbitmq_roles.close_connections(amqp_url, "hotq test: settlement")
    wait_until(load.finished, LONG_WORK_S, "every client finished", worker)

    queue = topology.request_queue_name(model, Lane.INTERACTIVE)
    wait_until(lambda: _settled(amqp_url, queue), EVENTUALLY_S, "an empty queue with nothing unacknowledged", worker)
    wait_until(lambda: fake_stats(backend.url)["active"] == 0, EVENTUALLY_S, "the backend idle", worker)

    # The worker's full capacity serves again: max_inflight requests in the backend at once.
    hold = Hold(tmp_path / "release")
    answers: list[httpx.Response] = []

    def held_request(index: int) -> None:
        body = {"model": model, "messages": [{"role": "user", "content": f"slot {index}"}], **hold.field}
        answers.append(httpx.post(stack.url + "/v1/chat/completions", json=body, timeout=EVENTUALLY_S))

    held = [threading.Thread(target=held_request, args=(index,)) for index in range(MAX_INFLIGHT)]
    for thread in held:
        thread.start()
    wait_until(
        lambda: fake_stats(backend.url)["active"] == MAX_INFLIGHT,
        EVENTUALLY_S,
        f"{MAX_INFLIGHT} requests in the backend at once",
        worker,
    )
    hold.release()
    for thread in held:
        thread.join(EVENTUALLY_S)
    assert sorted(answer.json()["choices"][0]["message"]["content"] for answer in answers) == sorted(
        "".join(expected_chat_tokens(f"slot {index}", None)[0]) for index in range(MAX_INFLIGHT)
    )

    # A worker that leaves now hands nothing back: it held nothing unsettled.
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=STOP_S) == 0
    assert ready_messages(amqp_url, queue) == 0

"""Shared fixtures: a real RabbitMQ, the fake backend, and hotq processes over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import subprocess
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aio_pika
import pytest

from broker import topology
from broker.messages import Lane
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, STARTUP_S
from ops.testing.fake_backend import reply_text, running_fake_backend
from ops.testing.stack import Stack, api_and_worker, worker_on_a_fake_backend
from tests.rabbitmq_roles import have_rabbitmqctl, rabbitmqctl, vhost_of

AMQP_URL = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@localhost:5672/")
# The private three-node cluster's fixtures, and the session's shared vLLM, for the tests that need
# them; how the suite is shared out between pytest-xdist's workers.
pytest_plugins = ["tests.rabbitmq_cluster", "tests.shared_vllm", "tests.worker_schedule"]


def _rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session", autouse=True)
def config_files_name_the_broker() -> Iterator[None]:
    """$HOTQ_AMQP_URL (the suite's vhost) overrides the amqp_url of every config hotq reads. The
    tests write it into their configs themselves, and some on purpose name another broker (a dead
    port, a vhost or RabbitMQ user of their own): while the suite runs, only the files say."""
    saved = os.environ.pop("HOTQ_AMQP_URL", None)
    yield
    if saved is not None:
        os.environ["HOTQ_AMQP_URL"] = saved


@pytest.fixture(scope="session")
def amqp_url(session_tag: str) -> Iterator[str]:
    """RabbitMQ must be real; `make test` starts it, this only checks.

    Under pytest-xdist (`make test` runs one per core, plus one) each worker has a vhost of its own, made here
    and deleted with everything in it at the end: some tests force-close every connection of their
    vhost, and one worker's queues must never meet the other's."""
    try:
        wait_until(_rabbitmq_up, STARTUP_S, "RabbitMQ listening on 127.0.0.1:5672 (make test starts it)", poll_s=0.5)
    except TimeoutError as exc:
        pytest.fail(str(exc))
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        yield AMQP_URL
        return
    base = vhost_of(AMQP_URL)
    vhost = f"{'hotq-test' if base == '/' else base}-{worker}-{session_tag}"
    user = urllib.parse.urlsplit(AMQP_URL).username or "guest"
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    yield urllib.parse.urlsplit(AMQP_URL)._replace(path="/" + urllib.parse.quote(vhost, safe="")).geturl()
    rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="session")
def session_tag() -> str:
    """Model names in tests carry this tag so queues never collide across runs."""
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="session")
def fake_model(session_tag: str) -> str:
    # Dots and slashes on purpose: queue names must be safe for any model name.
    return f"test-org/fake-model.v1-{session_tag}"


@pytest.fixture(scope="session")
def fake_backend_url(fake_model: str) -> Iterator[str]:
    with running_fake_backend([fake_model]) as url:
        yield url


@pytest.fixture(scope="session")
def delete_queues_named() -> list[str]:
    """Tests register here queues whose names carry no tag (a batch's results queue, say): they are
    deleted at the end with the others."""
    return []


@pytest.fixture(scope="session", autouse=True)
def delete_test_queues(amqp_url: str, session_tag: str, delete_queues_named: list[str]) -> Iterator[list[str]]:
    """Tests register their model names here; their queues are deleted at the end, and so is every
    queue of the suite's vhost named after this run's tag (pinned queues, batch results): a broker
    that keeps every run's quorum queues runs out of file handles."""
    models: list[str] = []
    yield models
    names = {topology.request_queue_name(model, lane) for model in models for lane in Lane}
    names.update(_queues_named_with(session_tag, amqp_url))
    names.update(delete_queues_named)

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            for name in sorted(names):
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except aio_pika.exceptions.AMQPError:
                    pass

    asyncio.run(delete())


def _queues_named_with(tag: str, amqp_url: str) -> list[str]:
    """The vhost's queues whose names hold `tag` (none when rabbitmqctl cannot list them)."""
    if not have_rabbitmqctl():
        return []
    try:
        listing = rabbitmqctl("list_queues", "-p", vhost_of(amqp_url), "-q", "--no-table-headers", "name")
    except (RuntimeError, OSError, subprocess.TimeoutExpired):
        return []
    return [name for name in listing.split() if tag in name]


@pytest.fixture(scope="module")
def fake_stack(
    tmp_path_factory: pytest.TempPathFactory,
    amqp_url: str,
    fake_model: str,
    fake_backend_url: str,
    delete_test_queues: list[str],
) -> Iterator[Stack]:
    """An API and one worker serving the fake model (shared by a test module)."""
    delete_test_queues.append(fake_model)
    with api_and_worker(
        tmp_path_factory.mktemp("stack"),
        amqp_url,
        fake_model,
        {"backend_url": fake_backend_url, "max_inflight": 64},
        max_queue_wait_s=30,
        stream_flush_ms=20,
    ) as stack:
        yield stack


@dataclasses.dataclass(frozen=True)
class FakeWorker:
    """A `hotq worker` (both lanes, no API) on a fake backend of its own."""

    config: Path  # its data directory beside it
    model: str
    backend_url: str
    log: Path


@pytest.fixture(scope="module")
def fake_worker(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    amqp_url: str,
    session_tag: str,
    delete_test_queues: list[str],
) -> Iterator[FakeWorker]:
    """A worker for the test module, on a model named after it."""
    model = f"test-org/{request.module.__name__.rsplit('.', 1)[-1]}.v1-{session_tag}"
    delete_test_queues.append(model)
    with worker_on_a_fake_backend(tmp_path_factory.mktemp("worker"), amqp_url, model, 32) as stack:
        assert stack.backend_url is not None
        yield FakeWorker(stack.config, model, stack.backend_url, stack.workers[0].log_path)


@dataclasses.dataclass(frozen=True)
class ContractWorker:
    """A worker on the fake backend, for tests that speak to it from broker/WIRE.md alone."""

    amqp_url: str
    model: str
    expected_reply: Callable[[str], str]  # the fake backend's answer to a chat whose user text is given
    eventually_s: float  # how long a test waits for what must happen


@pytest.fixture(scope="module")
def contract_worker(amqp_url: str, fake_worker: FakeWorker) -> ContractWorker:
    return ContractWorker(amqp_url, fake_worker.model, _fake_chat_reply, EVENTUALLY_S)


@dataclasses.dataclass(frozen=True)
class StreamContractWorker:
    """A worker on the fake backend whose holder of a stream a test can kill, for the
    migration records of broker/WIRE.md (`Resuming`, `Resume`)."""

    amqp_url: str
    model: str
    pause_file: Path  # a stream whose body names it (`fake_pause_file`) pauses after its first token until it exists
    replace: Callable[[], None]  # start another worker, then kill -9 the one that was serving
    expected_reply: Callable[[str], str]
    eventually_s: float


@pytest.fixture
def stream_contract_worker(
    tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[StreamContractWorker]:
    model = f"test-org/contract-stream.v1-{session_tag}-{uuid.uuid4().hex[:6]}"
    delete_test_queues.append(model)
    with worker_on_a_fake_backend(tmp_path, amqp_url, model, 4) as stack:

        def replace() -> None:
            holder = stack.workers[-1]
            stack.start_worker(model)
            holder.send_signal(signal.SIGKILL)

        yield StreamContractWorker(amqp_url, model, tmp_path / "go", replace, _fake_chat_reply, EVENTUALLY_S)


def _fake_chat_reply(text: str) -> str:
    return reply_text([{"role": "user", "content": text}], None)

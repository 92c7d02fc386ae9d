"""Shared fixtures: a real RabbitMQ, the fake backend, and hotq processes over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator

import aio_pika
import pytest

from broker import topology
from broker.messages import Lane
from tests.fake_backend import running_fake_backend
from tests.stack import Stack, api_and_worker

AMQP_URL = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@localhost:5672/")
# The private three-node cluster's fixtures, for the tests that need one.
pytest_plugins = ["tests.rabbitmq_cluster"]


def _rabbitmq_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5672), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ must be real; `make test` starts it, this only checks."""
    deadline = time.monotonic() + 30
    while not _rabbitmq_up():
        if time.monotonic() > deadline:
            pytest.fail("RabbitMQ is not listening on 127.0.0.1:5672 (make test starts it)")
        time.sleep(0.5)
    return AMQP_URL


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


@pytest.fixture(scope="session", autouse=True)
def delete_test_queues(amqp_url: str, session_tag: str) -> Iterator[list[str]]:
    """Tests register their model names here; their queues are deleted at the end."""
    models: list[str] = []
    yield models

    async def delete() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            for model in models:
                for lane in Lane:
                    channel = await connection.channel()
                    try:
                        await channel.queue_delete(topology.request_queue_name(model, lane))
                    except aio_pika.exceptions.AMQPError:
                        pass

    asyncio.run(delete())


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

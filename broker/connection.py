"""One robust AMQP connection per process.

aio-pika's robust connection reconnects after a broker restart or a dropped
socket and re-declares the queues and consumers made through it, so callers hold
on to one connection and its channels for the life of the process.
"""

from __future__ import annotations

import os
import socket

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from broker.errors import BrokerUnavailable


async def connect(amqp_url: str, role: str) -> AbstractRobustConnection:
    """Connect, naming the connection after the role, host and pid (what operators see)."""
    name = f"hotq-{role}@{socket.gethostname()}:{os.getpid()}"
    try:
        return await aio_pika.connect_robust(
            amqp_url,
            client_properties={"connection_name": name},
            reconnect_interval=1.0,
        )
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {_without_password(amqp_url)}: {exc}") from exc


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"

"""One robust AMQP connection per process.

aio-pika's robust connection reconnects after a broker restart or a dropped
socket and re-declares the queues and consumers made through it, so callers hold
on to one connection and its channels for the life of the process.

An ``amqps://`` URL connects over TLS: with `tls` (the config's ``amqp_ca_file``,
``amqp_cert_file``, ``amqp_key_file``) the broker is verified against that CA and
the client presents that certificate; without it, against the system's CAs.
Each role (api, agent, scaler) connects as its own RabbitMQ user with only the
permissions it needs: see ops/rabbitmq/.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection

from broker.config import AmqpTls
from broker.errors import BrokerUnavailable

log = structlog.get_logger("hotq.connection")

CONNECT_RETRY_S = 2.0


def ssl_context(tls: AmqpTls | None) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name (never turned off)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file if tls else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


async def connect(amqp_url: str, role: str, tls: AmqpTls | None = None) -> AbstractRobustConnection:
    """Connect, naming the connection after the role, host and pid (what operators see)."""
    name = f"hotq-{role}@{socket.gethostname()}:{os.getpid()}"
    try:
        # Without TLS files, aiormq verifies against the system's CAs (or the URL's ?cafile=...).
        context = ssl_context(tls) if tls is not None and amqp_url.startswith("amqps://") else None
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailable(f"cannot load the TLS files for RabbitMQ: {exc}") from exc
    try:
        return await aio_pika.connect_robust(
            amqp_url,
            client_properties={"connection_name": name},
            reconnect_interval=1.0,
            ssl_context=context,
        )
    except (OSError, aio_pika.exceptions.AMQPError) as exc:
        raise BrokerUnavailable(f"cannot reach RabbitMQ at {_without_password(amqp_url)}: {exc}") from exc


async def connect_until_up(
    amqp_url: str, role: str, tls: AmqpTls | None = None, retry_s: float = CONNECT_RETRY_S
) -> AbstractRobustConnection:
    """`connect`, trying again every `retry_s` while RabbitMQ cannot be reached (a process that
    serves while the broker is down, such as the API, waits here); once connected, the robust
    connection does its own reconnecting."""
    while True:
        try:
            return await connect(amqp_url, role, tls)
        except BrokerUnavailable as exc:
            log.warning("broker_unreachable_retrying", role=role, error=exc.message, retry_in_s=retry_s)
            await asyncio.sleep(retry_s)


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"

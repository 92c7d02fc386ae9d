"""One robust AMQP connection per process, to any node of a RabbitMQ cluster.

aio-pika's robust connection reconnects after a broker restart or a dropped
socket and re-declares the queues and consumers made through it, so callers hold
on to one connection and its channels for the life of the process. With several
broker addresses (``amqp_url`` as a list: the nodes of one cluster) each connection
attempt takes the next address, so a process whose node goes away reconnects to
another and re-declares what it owns there.

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
from collections.abc import Sequence
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from yarl import URL

from broker.config import DEFAULT_AMQP_HEARTBEAT_S, DEFAULT_QUORUM_REPLICAS, AmqpTls, Config
from broker.errors import BrokerUnavailable

log = structlog.get_logger("hotq.connection")

CONNECT_RETRY_S = 2.0
# One attempt to one node: a host that swallows packets must not hold up trying the next.
CONNECT_TIMEOUT_S = 15.0
# What a channel operation may raise while its connection moves to another node: worth a retry.
BROKER_LOST = (
    aio_pika.exceptions.AMQPError,
    aio_pika.exceptions.ChannelInvalidStateError,
    ConnectionError,
    TimeoutError,
)


class ConnectionClosedMeanwhile(ConnectionError):
    """The connection closed again between its reconnect and a channel's opening (aiormq says so
    with a bare RuntimeError, which callers catching `BROKER_LOST` would not expect)."""


async def plain_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel of its own on `connection`, once it is connected: plain even on a robust
    connection, so nothing is restored on it after a reconnect (probes, short-lived work)."""
    await connection.connected.wait()  # while a robust connection reconnects
    try:
        return await aio_pika.Channel(connection)
    except RuntimeError as closed:
        raise ConnectionClosedMeanwhile(str(closed)) from closed


class ClusterConnection(RobustConnection):
    """A robust connection over the addresses of one cluster's nodes, tried in turn.

    aio-pika reads ``url`` once per connection attempt (``Connection.connect``, on the first
    connect and on every reconnect), so each read hands out the next address: after losing its
    node the connection tries the others first. It also carries the quorum queues' replication
    factor for what is declared through it (broker/topology.py).
    """

    def __init__(self, urls: Sequence[URL], quorum_replicas: int, **kwargs: Any) -> None:
        self._urls = list(urls)
        self._attempt = 0
        self._node: str | None = None  # host:port connected to last
        self.quorum_replicas = quorum_replicas
        super().__init__(self._urls[0], **kwargs)
        self._attempt = 0  # the base class read the first address for its query parameters

    @property
    def url(self) -> URL:
        url = self._urls[self._attempt % len(self._urls)]
        self._attempt += 1
        return url

    @url.setter
    def url(self, value: URL) -> None:
        # Set at construction (the first address) and by update_secret (a new password for all).
        self._urls = [url.with_password(value.password) for url in self._urls]

    async def _on_connected(self) -> None:
        url = self.transport.connection.url if self.transport is not None else None
        node = f"{url.host}:{url.port}" if url is not None else None
        if self.connection_attempt:
            log.info("broker_reconnected", node=node, moved=node != self._node)
        self._node = node
        # Publishes nacked while quorum leaders move are retried on new channels (broker/publisher.py).
        await super()._on_connected()

    def __str__(self) -> str:  # what aio-pika logs; reading `url` would skip an address
        return ",".join(str(url.with_password("******") if url.password else url) for url in self._urls)


def ssl_context(tls: AmqpTls | None) -> ssl.SSLContext:
    """A client context that verifies the broker's certificate and host name (never turned off)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file if tls else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls is not None and tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context


async def connect(
    amqp_url: str | Sequence[str],
    role: str,
    tls: AmqpTls | None = None,
    heartbeat_s: int = DEFAULT_AMQP_HEARTBEAT_S,
    quorum_replicas: int = DEFAULT_QUORUM_REPLICAS,
) -> AbstractRobustConnection:
    """Connect to the first reachable of the addresses, naming the connection after the role,
    host and pid (what operators see). `heartbeat_s`: a node that hangs silently is given up
    after two or three times this."""
    name = f"hotq-{role}@{socket.gethostname()}:{os.getpid()}"
    addresses = [amqp_url] if isinstance(amqp_url, str) else list(amqp_url)
    # A heartbeat in the URL itself wins (aiormq reads it from there).
    urls = [URL(url) % {"heartbeat": URL(url).query.get("heartbeat", str(heartbeat_s))} for url in addresses]
    try:
        # Without TLS files, aiormq verifies against the system's CAs (or the URL's ?cafile=...).
        context = ssl_context(tls) if tls is not None and addresses[0].startswith("amqps://") else None
    except (OSError, ssl.SSLError) as exc:
        raise BrokerUnavailable(f"cannot load the TLS files for RabbitMQ: {exc}") from exc
    errors = []
    for first in range(len(urls)):
        connection = ClusterConnection(
            urls[first:] + urls[:first],
            quorum_replicas,
            client_properties={"connection_name": name},
            reconnect_interval=1.0,
            ssl_context=context,
        )
        try:
            await connection.connect(timeout=CONNECT_TIMEOUT_S)
            return connection
        except (OSError, RuntimeError, aio_pika.exceptions.AMQPError) as exc:
            errors.append(f"{_without_password(addresses[first])}: {exc}")
            await connection.close()
    raise BrokerUnavailable(f"cannot reach RabbitMQ at {'; '.join(errors)}")


async def connect_with(config: Config, role: str) -> AbstractRobustConnection:
    """`connect` with the config's addresses, TLS files, heartbeat and replication factor."""
    return await connect(config.amqp_urls, role, config.amqp_tls, config.amqp_heartbeat_s, config.quorum_replicas)


async def connect_until_up(config: Config, role: str, retry_s: float = CONNECT_RETRY_S) -> AbstractRobustConnection:
    """`connect_with`, trying again every `retry_s` while no node can be reached (a process that
    serves while the broker is down, such as the API, waits here); once connected, the robust
    connection does its own reconnecting."""
    while True:
        try:
            return await connect_with(config, role)
        except BrokerUnavailable as exc:
            log.warning("broker_unreachable_retrying", role=role, error=exc.message, retry_in_s=retry_s)
            await asyncio.sleep(retry_s)


def quorum_replicas_of(channel: AbstractChannel) -> int:
    """The replication factor new quorum queues declared on `channel` get: its connection's, or
    the default on a connection not made by `connect` (a test's, a benchmark's)."""
    connection = getattr(channel, "_connection", None)  # aio-pika keeps no public reference
    return connection.quorum_replicas if isinstance(connection, ClusterConnection) else DEFAULT_QUORUM_REPLICAS


def _without_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}"

"""Confirmed publishing that survives a quorum queue's leader moving to another node.

RabbitMQ nacks a publish it could not take (a quorum queue without a leader, during a failover).
A channel of RabbitMQ 3.10 that published to a quorum queue while its leader died keeps talking
to the dead leader and has every later publish to that queue nacked: only a new channel finds the
new leader. So a nack here renews the channel and publishes again, a few times, before giving up.
A return (``Basic.Return``: no queue took the message) is not retried: it raises `PublishError`.
"""

from __future__ import annotations

import asyncio

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from broker.connection import plain_channel

log = structlog.get_logger("hotq.publisher")

# A failover elects new leaders well within a second; a few renewals cover a slow machine.
NACK_RETRIES = 5
NACK_RETRY_PAUSE_S = 0.2  # times the nacks so far: 0.2, 0.4, 0.6, 0.8 (2 s in all)


class ConfirmingPublisher:
    """Publishes to one exchange with confirms and `mandatory`, on a channel of its own that it
    renews when RabbitMQ nacks (see the module's docstring)."""

    def __init__(self, connection: AbstractRobustConnection, exchange_name: str) -> None:
        self._connection = connection
        self._exchange_name = exchange_name
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._renewing = asyncio.Lock()

    @classmethod
    async def open(cls, connection: AbstractRobustConnection, exchange_name: str) -> ConfirmingPublisher:
        publisher = cls(connection, exchange_name)
        await publisher._renew(None)
        return publisher

    async def publish(self, message: aio_pika.Message, routing_key: str, mandatory: bool = True) -> None:
        """Publish `message`, confirmed. Raises `PublishError` if it was returned, `DeliveryError`
        if it was still nacked after `NACK_RETRIES` renewed channels, and the channel's errors if
        the connection is lost."""
        nacks = 0
        while True:
            channel, exchange = self._current()
            try:
                await exchange.publish(message, routing_key, mandatory=mandatory)
                return
            except aio_pika.exceptions.PublishError:
                raise  # returned: no queue by that name (a nack is a DeliveryError that is not this)
            except aio_pika.exceptions.DeliveryError:
                nacks += 1
                if nacks == NACK_RETRIES:
                    raise
                if channel is self._channel:
                    log.warning("publish_nacked_renewing_channel", routing_key=routing_key, nacks=nacks)
                    await self._renew(channel)
                await asyncio.sleep(NACK_RETRY_PAUSE_S * nacks)
            except (aio_pika.exceptions.AMQPError, aio_pika.exceptions.ChannelInvalidStateError):
                if channel is self._channel:
                    raise  # the connection went: the caller decides
                # Another task renewed the channel under this publish: again, on the new one.

    async def queue_consumers(self, name: str) -> int | None:
        """How many consumers queue `name` has now; None when there is no such queue (a passive
        declare on a channel of its own: a miss closes it)."""
        probe = await plain_channel(self._connection)
        try:
            declared = await probe.declare_queue(name, passive=True)
            return declared.declaration_result.consumer_count or 0
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return None
        finally:
            if not probe.is_closed:
                await probe.close()

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    def _current(self) -> tuple[AbstractChannel, AbstractExchange]:
        assert self._channel is not None and self._exchange is not None, "open() first"
        return self._channel, self._exchange

    async def _renew(self, nacked: AbstractChannel | None) -> None:
        """A new channel in place of `nacked`, unless another task renewed it already."""
        async with self._renewing:
            if self._channel is not nacked:
                return
            channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(self._exchange_name, ensure=False)
            self._channel, self._exchange = channel, exchange  # together: a publish takes both
            # Closed only now: publishes still waiting on it for a confirm go again on the new one.
            if nacked is not None and not nacked.is_closed:
                await nacked.close()

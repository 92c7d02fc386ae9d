"""Publishing one request's reply frames to the caller's reply queue."""

from __future__ import annotations

import aio_pika
from aio_pika.abc import AbstractExchange

from broker import messages
from broker.messages import ReplyFrame


class CallerGone(Exception):
    """The reply queue no longer exists: the API process that asked has gone away."""


class ReplySender:
    """Sends frames in order with publisher confirms, `mandatory` so a vanished caller is noticed."""

    def __init__(self, exchange: AbstractExchange, reply_to: str, request_id: str) -> None:
        self._exchange = exchange
        self._reply_to = reply_to
        self._request_id = request_id

    async def send(self, frame: ReplyFrame) -> None:
        message = aio_pika.Message(
            body=messages.encode(frame),
            content_type="application/x-msgpack",
            correlation_id=self._request_id,
        )
        try:
            await self._exchange.publish(message, self._reply_to, mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:
            raise CallerGone(self._reply_to) from exc

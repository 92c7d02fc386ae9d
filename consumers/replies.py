"""Publishing one request's reply frames to the caller's reply queue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
from aio_pika.abc import AbstractExchange

from broker import messages
from broker.messages import ANNOUNCE_AFTER_S, Abandoned, ReplyFrame, Started


class CallerGone(Exception):
    """The reply queue no longer exists: the API process that asked has gone away."""


class ReplySender:
    """Sends frames in order with publisher confirms, `mandatory` so a vanished caller is noticed."""

    def __init__(self, exchange: AbstractExchange, reply_to: str, request_id: str) -> None:
        self._exchange = exchange
        self._reply_to = reply_to
        self._request_id = request_id
        self._announce_timer: asyncio.TimerHandle | None = None
        self._announcing: asyncio.Task[None] | None = None
        self.caller_gone = False

    def announce_later(self, started: Started, on_caller_gone: Callable[[], object]) -> None:
        """Send `started` if no other frame went out within `ANNOUNCE_AFTER_S`.

        It tells the API that the request is being worked on (so its queue-wait
        limit no longer applies); `on_caller_gone` runs if the caller has left.
        """

        async def announce() -> None:
            try:
                await self._publish(started)
            except CallerGone:
                self.caller_gone = True
                on_caller_gone()

        def start() -> None:
            self._announcing = asyncio.ensure_future(announce())

        self._announce_timer = asyncio.get_running_loop().call_later(ANNOUNCE_AFTER_S, start)

    async def send(self, frame: ReplyFrame | Abandoned) -> None:
        if self._announce_timer is not None:
            self._announce_timer.cancel()
            self._announce_timer = None
        if self._announcing is not None:
            await self._announcing  # `Started` must reach the caller before anything else
            self._announcing = None
        if self.caller_gone:
            raise CallerGone(self._reply_to)
        await self._publish(frame)

    def close(self) -> None:
        """Drop a pending announcement (the request ended without a frame)."""
        if self._announce_timer is not None:
            self._announce_timer.cancel()
        if self._announcing is not None:
            self._announcing.cancel()

    async def _publish(self, frame: ReplyFrame | Abandoned) -> None:
        message = aio_pika.Message(
            body=messages.encode(frame),
            content_type=messages.CONTENT_TYPE,
            correlation_id=self._request_id,
        )
        try:
            await self._exchange.publish(message, self._reply_to, mandatory=True)
        except aio_pika.exceptions.DeliveryError as exc:
            self.caller_gone = True
            raise CallerGone(self._reply_to) from exc

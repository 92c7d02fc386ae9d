"""Publishing one request's reply frames to the caller's reply queue.

Only a reply queue that is really gone means the caller left. A nack (RabbitMQ could not take the
frame now: a batch's results queue without a leader during a failover) is retried on a renewed
channel by `ConfirmingPublisher` and, if it persists, raised as the broker error it is, so the
consumer hands the request back to be served again; a return for a queue that still exists
(re-declared meanwhile) is published again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aio_pika
import structlog

from broker import messages, topology
from broker.messages import ANNOUNCE_AFTER_S, Abandoned, ReplyFrame, Started
from broker.publisher import ConfirmingPublisher

log = structlog.get_logger("hotq.replies")

# Returns for a queue that exists when asked: published again this often, then handed back.
RETURNED_RETRIES = 3


class CallerGone(Exception):
    """The reply queue no longer exists: the API process that asked has gone away."""


class ReplySender:
    """Sends frames in order with publisher confirms, `mandatory` so a vanished caller is noticed."""

    def __init__(self, publisher: ConfirmingPublisher, reply_to: str, request_id: str) -> None:
        self._publisher = publisher
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

    async def ensure_listened(self) -> None:
        """Raise `CallerGone` unless an API process reads the reply queue now.

        For a stream taken over from another consumer, before asking its API how far it got: an API
        that lost its broker connection answered its streams in flight with a 503 and reads a reply
        queue of a new name from then on. Its old queue lingers unread until it expires, so a
        `Resuming` sent there is never answered, and the consumer would hold a backend slot for
        `RESUME_WAIT_S` (30 s) waiting for it (seen: a worker with every slot so held took no work
        for 30 s after each forced reconnect)."""
        if self._reply_to.startswith(topology.REPLY_QUEUE_PREFIX) and not await self._publisher.queue_consumers(
            self._reply_to
        ):
            self.caller_gone = True
            raise CallerGone(self._reply_to)

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
        for returns in range(1, RETURNED_RETRIES + 1):
            try:
                await self._publisher.publish(message, self._reply_to, mandatory=True)
                return
            except aio_pika.exceptions.PublishError:
                if await self._publisher.queue_consumers(self._reply_to) is None:
                    self.caller_gone = True
                    raise CallerGone(self._reply_to) from None
                log.warning("reply_returned_queue_exists", reply_to=self._reply_to, returns=returns)
                if returns == RETURNED_RETRIES:
                    raise  # a broker error, not a caller gone: the request is served again

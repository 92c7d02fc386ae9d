"""Dead-lettering a delivery the consumer cannot serve, with the reason in a header.

RabbitMQ's own dead-lettering (a `reject`) records only "rejected", so an operator, or a
producer in another language, cannot tell why. Instead the consumer publishes a copy of
the message to ``hotq.dead`` with ``x-hotq-dead-reason`` (confirmed), then acks the
original; if that publish fails the delivery is rejected, which dead-letters it without
a reason rather than losing it.
"""

from __future__ import annotations

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker import topology

log = structlog.get_logger("hotq.dead_letters")

DEAD_REASON_HEADER = "x-hotq-dead-reason"
DEAD_QUEUE_HEADER = "x-hotq-dead-queue"  # the queue the message was taken from
MAX_REASON_CHARS = 500


async def dead_letter(channel: AbstractChannel, message: AbstractIncomingMessage, reason: str) -> None:
    """Move `message` to the dead-letter queue with `reason`; never lose it (`channel` confirms publishes)."""
    headers = dict(message.headers or {})
    headers[DEAD_REASON_HEADER] = reason[:MAX_REASON_CHARS]
    headers[DEAD_QUEUE_HEADER] = message.routing_key or ""
    copy = aio_pika.Message(
        body=message.body,
        headers=headers,
        content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        reply_to=message.reply_to,
    )
    try:
        exchange = await channel.get_exchange(topology.DEAD_LETTER_EXCHANGE, ensure=False)
        await exchange.publish(copy, routing_key="")
    except Exception as exc:  # a broker outage: RabbitMQ's own dead-lettering keeps the message
        log.warning("dead_letter_publish_failed", error=repr(exc), reason=reason)
        await message.reject(requeue=False)
        return
    await message.ack()

"""Dead-lettering a delivery the consumer cannot serve, with the reason in a header.

RabbitMQ's own dead-lettering (a `reject`) records only "rejected", so an operator, or a
producer in another language, cannot tell why. Instead the consumer publishes a copy of
the message to ``hotq.dead`` with ``x-hotq-dead-reason``, on the channel it was delivered
on (in confirm mode), then acks the original; if the copy is not confirmed the delivery is
rejected, which dead-letters it without a reason rather than losing it (broker/WIRE.md).
"""

from __future__ import annotations

import aiormq
import structlog
from aio_pika.abc import AbstractIncomingMessage

from broker import topology

log = structlog.get_logger("hotq.dead_letters")

DEAD_REASON_HEADER = "x-hotq-dead-reason"
DEAD_QUEUE_HEADER = "x-hotq-dead-queue"  # the queue the message was taken from
MAX_REASON_CHARS = 500


async def dead_letter(message: AbstractIncomingMessage, reason: str) -> None:
    """Move `message` to the dead-letter queue with `reason`; never lose it."""
    headers = dict(message.headers or {})
    headers[DEAD_REASON_HEADER] = reason[:MAX_REASON_CHARS]
    headers[DEAD_QUEUE_HEADER] = message.routing_key or ""
    properties = aiormq.spec.Basic.Properties(
        headers=headers,
        content_type=message.content_type,
        delivery_mode=2,  # persistent
        correlation_id=message.correlation_id,
        message_id=message.message_id,
        reply_to=message.reply_to,
    )
    try:
        confirmation = await message.channel.basic_publish(
            message.body, exchange=topology.DEAD_LETTER_EXCHANGE, routing_key="", properties=properties
        )
        copied = isinstance(confirmation, aiormq.spec.Basic.Ack)
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        log.warning("dead_letter_copy_failed", error=repr(exc), reason=reason)
        copied = False
    if copied:
        await message.ack()
    else:  # RabbitMQ's own dead-lettering keeps the message, without the reason
        await message.reject(requeue=False)

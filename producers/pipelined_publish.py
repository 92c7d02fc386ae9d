"""Publishing a chunk of persistent messages with every confirm in flight, as hand-written frames.

aiormq's `basic_publish` costs a coroutine, a lock round and a full pamqp marshal per
message, which caps one producer well below 20,000/s. Every message of a batch has the
same method frame and nearly the same header, so the frames are built here (the method
frame once, the header by hand) and written as one buffer per few hundred messages
through the channel's internals, registering each delivery tag's confirmation the way
`basic_publish` does (aiormq is pinned to a minor version for this). tests/test_frames.py
checks the frames against pamqp's own encoder. A body too large for one frame goes
through `basic_publish`, which splits it, still pipelined; when RabbitMQ refuses such a
message as larger than its `max_message_size`, the result says that limit.
"""

from __future__ import annotations

import asyncio
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import aiormq
import pamqp.frame
from aiormq.abc import ChannelFrame

from broker.messages import CONTENT_TYPE

MAX_INLINE_BODY = 120_000  # one body frame: below RabbitMQ's default frame_max (131,072) minus framing
MESSAGES_PER_WRITE = 256
_CONTENT_TYPE = CONTENT_TYPE.encode()
# The header properties set: content_type, delivery_mode, correlation_id, reply_to, expiration,
# message_id (AMQP's flag bits, and the order the values follow in).
_PROPERTY_FLAGS = (1 << 15) | (1 << 12) | (1 << 10) | (1 << 9) | (1 << 8) | (1 << 7)
_FRAME_END = b"\xce"
_HEADER, _BODY = 2, 3  # frame types
_BASIC_CLASS = 60


# How RabbitMQ words the channel error for a message over its max_message_size.
_REFUSED_SIZE = re.compile(r"larger than configured max size (\d+)")


@dataclass(frozen=True, slots=True)
class Published:
    acked: list[bool]  # per message, in order: whether RabbitMQ confirmed it
    broker_max_size: int | None = None  # RabbitMQ's max_message_size, when it refused a message over it


@dataclass(frozen=True, slots=True)
class Outgoing:
    message_id: str  # also its correlation id: the request id its answer carries
    body: bytes


def method_frame(channel_number: int, exchange: str, routing_key: str) -> bytes:
    return pamqp.frame.marshal(aiormq.spec.Basic.Publish(exchange=exchange, routing_key=routing_key), channel_number)


def header_frame(channel_number: int, body_size: int, message_id: bytes, reply_to: bytes, expiration: bytes) -> bytes:
    """A persistent message's content header, its properties in the order AMQP lists them."""
    payload = b"".join(
        (
            struct.pack(">HHQH", _BASIC_CLASS, 0, body_size, _PROPERTY_FLAGS),
            bytes((len(_CONTENT_TYPE),)),
            _CONTENT_TYPE,
            b"\x02",  # delivery_mode: persistent
            bytes((len(message_id),)),
            message_id,  # correlation_id
            bytes((len(reply_to),)),
            reply_to,
            bytes((len(expiration),)),
            expiration,
            bytes((len(message_id),)),
            message_id,  # message_id
        )
    )
    return struct.pack(">BHI", _HEADER, channel_number, len(payload)) + payload + _FRAME_END


def body_frame(channel_number: int, body: bytes) -> bytes:
    return struct.pack(">BHI", _BODY, channel_number, len(body)) + body + _FRAME_END


async def publish_confirmed(
    channel: aiormq.Channel,
    exchange: str,
    routing_key: str,
    reply_to: str,
    ttl_ms: int,
    messages: Sequence[Outgoing],
) -> Published:
    """Publish `messages` (on a channel in confirm mode), each expiring `ttl_ms` after it was
    queued (RabbitMQ drops it unconsumed then); whether RabbitMQ confirmed each."""
    if not messages:
        return Published([])
    expiration = str(max(0, ttl_ms))
    if max(len(message.body) for message in messages) > MAX_INLINE_BODY:
        return await _publish_plainly(channel, exchange, routing_key, reply_to, expiration, messages)
    number = channel.number
    method = method_frame(number, exchange, routing_key)
    reply_to_bytes, expiration_bytes = reply_to.encode(), expiration.encode()
    confirmations: list[asyncio.Future[object]] = []
    async with channel.lock:  # the lock basic_publish holds: delivery tags stay in order
        buffer = bytearray()
        for index, message in enumerate(messages):
            channel.delivery_tag += 1
            confirmation = channel.create_future()
            channel.confirmations[channel.delivery_tag] = confirmation
            confirmations.append(confirmation)
            buffer += method
            buffer += header_frame(
                number, len(message.body), message.message_id.encode(), reply_to_bytes, expiration_bytes
            )
            buffer += body_frame(number, message.body)
            if index % MESSAGES_PER_WRITE == MESSAGES_PER_WRITE - 1:
                await channel.write_queue.put(ChannelFrame(payload=bytes(buffer), should_close=False))
                buffer.clear()
        if buffer:
            await channel.write_queue.put(ChannelFrame(payload=bytes(buffer), should_close=False))
    return _published(await asyncio.gather(*confirmations, return_exceptions=True))


async def _publish_plainly(
    channel: aiormq.Channel,
    exchange: str,
    routing_key: str,
    reply_to: str,
    expiration: str,
    messages: Sequence[Outgoing],
) -> Published:
    pending = [
        asyncio.ensure_future(
            channel.basic_publish(
                message.body,
                exchange=exchange,
                routing_key=routing_key,
                properties=aiormq.spec.Basic.Properties(
                    content_type=CONTENT_TYPE,
                    delivery_mode=2,
                    correlation_id=message.message_id,
                    message_id=message.message_id,
                    reply_to=reply_to,
                    expiration=expiration,
                ),
                wait=False,
            )
        )
        for message in messages
    ]
    return _published(await asyncio.gather(*pending, return_exceptions=True))


def _published(outcomes: Sequence[object]) -> Published:
    acked = [isinstance(outcome, aiormq.spec.Basic.Ack) for outcome in outcomes]
    for outcome in outcomes:
        if isinstance(outcome, aiormq.exceptions.ChannelPreconditionFailed):
            match = _REFUSED_SIZE.search(str(outcome))
            if match:
                return Published(acked, int(match.group(1)))
    return Published(acked)

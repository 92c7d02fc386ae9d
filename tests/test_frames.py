"""The frames the pipelined publisher writes by hand are the frames pamqp (aiormq's encoder) writes.

No broker: each message's method, header and body frames are compared byte for byte
with pamqp's, and decoded back with pamqp's decoder.
"""

from __future__ import annotations

import pamqp.body
import pamqp.commands
import pamqp.frame
import pamqp.header
import pytest

from broker.messages import CONTENT_TYPE
from producers.pipelined_publish import MAX_INLINE_BODY, body_frame, header_frame, method_frame

MESSAGES = [  # channel, message id, body, reply_to, expiration (ms, as RabbitMQ reads it)
    (1, "0f3a9c", b"\x95\x01\x02abc", "hotq.results.batch_1", "86400000"),
    (7, "r" * 255, b"", "q", "0"),  # the longest short string AMQP allows, an empty body, already expired
    (65535, "éü-ids-are-utf8", bytes(range(256)) * 40, "hotq.results." + "x" * 200, "1500"),
    (2, "big", b"\x00" * MAX_INLINE_BODY, "hotq.results.big", "60000"),  # the largest body sent in one frame
]


def _pamqp_properties(message_id: str, reply_to: str, expiration: str) -> pamqp.commands.Basic.Properties:
    return pamqp.commands.Basic.Properties(
        content_type=CONTENT_TYPE,
        delivery_mode=2,
        correlation_id=message_id,
        message_id=message_id,
        reply_to=reply_to,
        expiration=expiration,
    )


@pytest.mark.parametrize(
    ("channel", "message_id", "body", "reply_to", "expiration"), MESSAGES, ids=lambda v: str(v)[:12]
)
def test_frames_match_pamqp(channel: int, message_id: str, body: bytes, reply_to: str, expiration: str) -> None:
    header = pamqp.header.ContentHeader(0, len(body), _pamqp_properties(message_id, reply_to, expiration))
    written = header_frame(channel, len(body), message_id.encode(), reply_to.encode(), expiration.encode())
    assert written == pamqp.frame.marshal(header, channel)
    assert body_frame(channel, body) == pamqp.frame.marshal(pamqp.body.ContentBody(body), channel)
    publish = pamqp.commands.Basic.Publish(exchange="hotq.requests", routing_key="hotq.req.m.batch")
    assert method_frame(channel, "hotq.requests", "hotq.req.m.batch") == pamqp.frame.marshal(publish, channel)


def test_a_message_decodes_as_written() -> None:
    """The three frames of one message, written back to back, read back with pamqp's decoder."""
    channel, message_id, body, reply_to, expiration = MESSAGES[0]
    data = method_frame(channel, "hotq.requests", "k") + header_frame(
        channel, len(body), message_id.encode(), reply_to.encode(), expiration.encode()
    )
    data += body_frame(channel, body)
    frames = []
    while data:
        consumed, frame_channel, frame = pamqp.frame.unmarshal(data)
        assert frame_channel == channel
        frames.append(frame)
        data = data[consumed:]
    method, header, content = frames
    assert isinstance(method, pamqp.commands.Basic.Publish) and method.routing_key == "k"
    assert isinstance(header, pamqp.header.ContentHeader) and header.body_size == len(body)
    assert header.properties == _pamqp_properties(message_id, reply_to, expiration)
    assert isinstance(content, pamqp.body.ContentBody) and content.value == body

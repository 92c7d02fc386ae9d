"""A peer of an older wire version fails clearly: its records are refused by name, never misread.

Version 3 added fields to `AgentStatus` (version 2 had added `Abandoned` and `UsageReport`); a peer
of the version before cannot take part.
"""

from __future__ import annotations

import time
import uuid

import aio_pika
import msgpack
import pytest

from broker import messages, topology
from broker.errors import WireError
from broker.messages import WIRE_VERSION, Endpoint, Lane, RequestEnvelope, Started
from ops.testing.stack import Stack, wait_for_event

OLDER = WIRE_VERSION - 1


def _as_older_peer(record: messages.Record) -> bytes:
    """`record` as a peer one wire version older sends it (the same fields, its version number)."""
    version, *rest = msgpack.unpackb(messages.encode(record), raw=False)
    assert version == WIRE_VERSION
    return msgpack.packb([OLDER, *rest], use_bin_type=True)


@pytest.mark.parametrize(
    "record",
    [
        Started("r1", "att", "node:1"),
        RequestEnvelope("r1", "m", Endpoint.CHAT, b"{}", False, 2.0, 1.0, "ada", Lane.INTERACTIVE, 1.0),
    ],
    ids=lambda r: type(r).__name__,
)
def test_an_older_peer_s_record_is_refused_by_version(record: messages.Record) -> None:
    """Even a record whose shape did not change: its sender may not understand the reply."""
    with pytest.raises(WireError, match=f"unsupported wire version {OLDER} \\(this build speaks {WIRE_VERSION}\\)"):
        messages.decode(_as_older_peer(record))


async def test_a_consumer_dead_letters_an_older_api_s_request_and_says_why(
    fake_stack: Stack, fake_model: str, amqp_url: str
) -> None:
    request_id = uuid.uuid4().hex
    envelope = RequestEnvelope(
        request_id, fake_model, Endpoint.CHAT, b"{}", False, time.time() + 60, time.time() + 60, "ada",
        Lane.INTERACTIVE, time.time(),
    )  # fmt: skip
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE)
        await exchange.publish(
            aio_pika.Message(
                _as_older_peer(envelope),
                content_type=messages.CONTENT_TYPE,
                message_id=request_id,
                correlation_id=request_id,
                reply_to="nobody",
            ),
            routing_key=topology.request_queue_name(fake_model, Lane.INTERACTIVE),
        )
    event = wait_for_event(fake_stack.workers[0], "request_undecodable", message_id=request_id)
    assert event["error"] == f"unsupported wire version {OLDER} (this build speaks {WIRE_VERSION})"

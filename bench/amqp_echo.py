"""A bare aio-pika RPC echo server: the RabbitMQ floor that `bench.core_path` measures hotq against.

Run:  python -m bench.amqp_echo --url AMQP_URL --queue NAME --mode {minimal,hotq-like}

It consumes requests from one queue and answers each on its ``reply_to`` queue with the
request's ``correlation_id``, like a hotq worker but without any HTTP or hotq code. It
prints ``AMQP_ECHO_READY`` once consuming and runs until SIGTERM/SIGINT.

Modes (the client side, in `bench.core_path`, uses the same settings):

* ``minimal``: classic transient queue, transient messages, no publisher confirms, no
  consumer acks, one reply per request. The cheapest request/reply RabbitMQ offers.
* ``hotq-like``: what hotq's messaging costs without its HTTP hops and application code:
  a durable quorum request queue, persistent ``mandatory`` publishes with publisher
  confirms on both sides, manual ack after the answer is confirmed, and two replies per
  request (a small "started" frame, then the answer), as hotq sends ``Started`` + ``Final``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Sequence
from typing import Final

import aio_pika
import uvloop
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

READY_LINE: Final = "AMQP_ECHO_READY"
MODES: Final = ("minimal", "hotq-like")
STARTED_TYPE: Final = "started"
ANSWER_TYPE: Final = "answer"
# About the size of a small non-streaming chat.completion body.
ANSWER_BODY: Final = (
    b'{"id":"chatcmpl-0123456789abcdef0123456789abcdef","object":"chat.completion","created":1700000000,'
    b'"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant","content":'
    b'"echo: yaS olleh ot eht kramhcneb"},"finish_reason":"stop","logprobs":null}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":6,"total_tokens":11}}'
)
STARTED_BODY: Final = b"started"


def is_durable(mode: str) -> bool:
    return mode == "hotq-like"


async def declare_request_queue(channel: AbstractChannel, name: str, mode: str) -> AbstractQueue:
    """Declare the request queue the way `mode` wants it (client and server call this alike)."""
    if is_durable(mode):
        return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
    return await channel.declare_queue(name, durable=False)


async def serve(url: str, queue_name: str, mode: str, prefetch: int) -> None:
    durable = is_durable(mode)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=durable, on_return_raises=durable)
        await channel.set_qos(prefetch_count=prefetch)
        queue = await declare_request_queue(channel, queue_name, mode)
        exchange = channel.default_exchange

        async def reply(message: AbstractIncomingMessage, body: bytes, kind: str) -> None:
            assert message.reply_to is not None
            answer = aio_pika.Message(body, correlation_id=message.correlation_id, type=kind)
            await exchange.publish(answer, routing_key=message.reply_to, mandatory=durable)

        async def on_request(message: AbstractIncomingMessage) -> None:
            # aiormq runs each delivery's callback in its own task, so requests overlap.
            if message.reply_to is None:
                return
            if durable:
                await reply(message, STARTED_BODY, STARTED_TYPE)
            await reply(message, ANSWER_BODY, ANSWER_TYPE)
            if durable:
                await message.ack()

        await queue.consume(on_request, no_ack=not durable)
        print(READY_LINE, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.amqp_echo", description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="AMQP URL")
    parser.add_argument("--queue", required=True, help="request queue to consume")
    parser.add_argument("--mode", choices=MODES, default="minimal")
    parser.add_argument("--prefetch", type=int, default=64)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.url, args.queue, args.mode, args.prefetch))


if __name__ == "__main__":
    main()

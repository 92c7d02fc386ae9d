"""One consumer draining its queues through the fake backend: requests/s by the mix of queues.

Run from the repository root::

    .venv/bin/python -m bench.consumer_intake [--requests 2000] [--max-inflight 32] [--rounds 3]

For each mix (all interactive, all pinned to the consumer's cluster, all batch, and interactive
and batch alternating), N requests wait in the queues before a `Consumer` (in this process, on a
fake backend answering at once) starts; measured is the time from its start to the last final
answer. It shows what dealing prefetch across the queues (`consumers/intake.py`) costs when the
backend is the bottleneck (instant answers make the broker side count most). The mixes alternate
round by round, as the machine is shared: compare runs on it, do not read capacity from them.

Results: a table on stdout and JSON in ``bench/results/consumer_intake-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from bench.common import DEFAULT_AMQP_URL, RESULTS_DIR
from broker import messages, topology
from broker.connection import connect
from broker.messages import Endpoint, ErrorReply, Final, Lane, RequestEnvelope
from consumers.backend_client import BackendClient
from consumers.consumer import Consumer
from consumers.handler import RequestHandler
from ops.testing.deadlines import LONG_WORK_S
from ops.testing.fake_backend import running_fake_backend

CLUSTER = "bench"
MIXES: dict[str, list[tuple[Lane, str | None]]] = {
    "interactive": [(Lane.INTERACTIVE, None)],
    "pinned": [(Lane.INTERACTIVE, CLUSTER)],
    "batch": [(Lane.BATCH, None)],
    "interactive+batch": [(Lane.INTERACTIVE, None), (Lane.BATCH, None)],
}


async def _drain(amqp_url: str, backend_url: str, model: str, mix: str, requests: int, max_inflight: int) -> float:
    """Seconds one consumer takes to answer `requests` queued in `mix`'s queues."""
    connection = await connect(amqp_url, "bench-intake")
    backend = BackendClient(backend_url, max_connections=max_inflight)
    try:
        channel = await connection.channel()
        await topology.declare_model_queues(channel, [model], pinned={model: [CLUSTER]})
        replies = await channel.declare_queue(f"bench-intake-{uuid.uuid4().hex}", exclusive=True)
        await topology.bind_reply_queue(channel, replies)
        answered = 0
        all_answered = asyncio.Event()

        async def on_reply(message: AbstractIncomingMessage) -> None:
            nonlocal answered
            if isinstance(messages.decode(message.body), Final | ErrorReply):
                answered += 1
                if answered == requests:
                    all_answered.set()

        await replies.consume(on_reply, no_ack=True)
        exchange = await channel.get_exchange(topology.REQUEST_EXCHANGE, ensure=False)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello queues"}]}).encode()
        now = time.time()
        for i in range(requests):
            lane, cluster = MIXES[mix][i % len(MIXES[mix])]
            request_id = uuid.uuid4().hex
            envelope = RequestEnvelope(
                request_id, model, Endpoint.CHAT, body, False, now + 3600, now + 3600, "b", lane, now
            )
            message = aio_pika.Message(
                messages.encode(envelope),
                content_type=messages.CONTENT_TYPE,
                correlation_id=request_id,
                reply_to=replies.name,
            )
            await exchange.publish(message, topology.request_queue_name(model, lane, cluster))
        handler = RequestHandler(backend, flush_interval_s=0.05)
        consumer = Consumer(connection, model, handler, max_inflight, lanes=tuple(Lane), cluster=CLUSTER)
        started = time.perf_counter()
        await consumer.start()
        await asyncio.wait_for(all_answered.wait(), LONG_WORK_S)
        took = time.perf_counter() - started
        await consumer.stop(grace_s=5)
        for lane, cluster in [(Lane.INTERACTIVE, None), (Lane.INTERACTIVE, CLUSTER), (Lane.BATCH, None)]:
            await channel.queue_delete(topology.request_queue_name(model, lane, cluster))
        return took
    finally:
        await backend.close()
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--max-inflight", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    args = parser.parse_args()
    model = f"bench/intake-{uuid.uuid4().hex[:6]}"
    seconds: dict[str, list[float]] = {mix: [] for mix in MIXES}
    with running_fake_backend([model]) as backend_url:
        for _ in range(args.rounds):
            for mix in MIXES:
                took = asyncio.run(_drain(args.amqp_url, backend_url, model, mix, args.requests, args.max_inflight))
                seconds[mix].append(took)
    rates = {mix: args.requests / statistics.median(runs) for mix, runs in seconds.items()}
    print(f"{args.requests} requests, max_inflight {args.max_inflight}, median of {args.rounds} rounds")
    for mix, rate in rates.items():
        print(f"  {mix:<18} {rate:8.0f} requests/s")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"consumer_intake-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"args": vars(args), "seconds": seconds, "requests_per_s": rates}, indent=2))
    print(f"results: {out}")


if __name__ == "__main__":
    main()

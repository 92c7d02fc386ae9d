"""broker/WIRE.md is enough: a producer that knows only the contract publishes requests and
collects their answers, a malformed request is dead-lettered with its reason, and a producer of
streams answers `Resuming` with `Resume` so that a stream whose consumer died goes on.

On purpose this module imports no hotq code: everything it sends and reads is built from
the contract page with plain aio-pika and msgpack (the `contract_worker` and
`stream_contract_worker` fixtures run the workers it talks to).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import aio_pika
import msgpack
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

if TYPE_CHECKING:  # the fixtures' types only: this module runs without importing hotq
    from tests.conftest import ContractWorker, StreamContractWorker

WIRE_VERSION = 3
CONTENT_TYPE = "application/x-msgpack"
REQUEST_TAG, STARTED_TAG, CHUNKS_TAG, FINAL_TAG, ERROR_TAG = 1, 2, 3, 4, 5
RESUMING_TAG, RESUME_TAG = 11, 12


def batch_queue(model: str, lane: str = "batch") -> str:
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_.")[:120] or "model"
    return f"hotq.req.{readable}.{hashlib.sha256(model.encode()).hexdigest()[:10]}.{lane}"


def envelope(
    request_id: str, model: str, endpoint: str, body: dict[str, Any], stream: bool = False, lane: str = "batch"
) -> bytes:
    now = time.time()
    fields = [request_id, model, endpoint, json.dumps(body).encode(), stream, now + 600, now + 600, "contract-test",
              lane, now]  # fmt: skip
    return msgpack.packb([WIRE_VERSION, REQUEST_TAG, *fields], use_bin_type=True)


async def results_queue(channel: AbstractChannel, job_id: str) -> AbstractQueue:
    queue = await channel.declare_queue(f"hotq.results.{job_id}", durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind("hotq.replies", routing_key=queue.name)
    return queue


async def publish(
    channel: AbstractChannel, routing_key: str, body: bytes, request_id: str, reply_to: str | None
) -> None:
    exchange = await channel.get_exchange("hotq.requests")
    message = aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=request_id,
        correlation_id=request_id,
        reply_to=reply_to,
    )
    await exchange.publish(message, routing_key, mandatory=True)  # confirmed: the channel is in confirm mode


async def collect(queue: AbstractQueue, request_ids: set[str], deadline_s: float) -> dict[str, list[Any]]:
    """The first final frame (Final or ErrorReply) of each request, as [tag, field, ...]."""
    answers: dict[str, list[Any]] = {}
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        version, tag, *fields = msgpack.unpackb(message.body, raw=False)
        assert version == WIRE_VERSION and message.content_type == CONTENT_TYPE
        assert fields[0] == message.correlation_id  # every frame names its request twice
        if tag in (FINAL_TAG, ERROR_TAG):
            answers.setdefault(fields[0], [tag, *fields])  # a repeat (a redelivered request) is dropped
        else:
            assert tag == STARTED_TAG and len(fields) == 3, (tag, fields)
        await message.ack()  # after recording it
        if request_ids <= answers.keys():
            done.set()

    tag = await queue.consume(on_message)
    await asyncio.wait_for(done.wait(), deadline_s)
    await queue.cancel(tag)
    return answers


async def test_a_job_published_from_the_contract_alone_is_answered(contract_worker: ContractWorker) -> None:
    model, job_id = contract_worker.model, f"contract-{uuid.uuid4().hex[:8]}"
    texts = {uuid.uuid4().hex: f"line {n} of the contract job" for n in range(12)}
    unknown_model = uuid.uuid4().hex  # the backend answers it with an error, which comes back as ErrorReply
    connection = await aio_pika.connect(contract_worker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await results_queue(channel, job_id)
        for request_id, text in texts.items():
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            await publish(channel, batch_queue(model), envelope(request_id, model, "chat/completions", body),
                          request_id, queue.name)  # fmt: skip
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}
        await publish(channel, batch_queue(model), envelope(unknown_model, model, "chat/completions", body),
                      unknown_model, queue.name)  # fmt: skip

        answers = await collect(queue, {*texts, unknown_model}, contract_worker.eventually_s)
        await queue.delete(if_unused=False, if_empty=False)

    for request_id, text in texts.items():
        tag, _, attempt, _seq, status, response, usage = answers[request_id]
        assert tag == FINAL_TAG and status == 200 and isinstance(attempt, str)
        reply = json.loads(response)
        assert reply["choices"][0]["message"]["content"] == contract_worker.expected_reply(text)
        assert usage is not None and usage["completion_tokens"] > 0
    tag, _, _attempt, status, error_type, message, code, _param = answers[unknown_model]
    assert tag == ERROR_TAG and status == 404 and code == "model_not_found", answers[unknown_model]
    assert error_type == "invalid_request_error" and "no-such-model" in message


async def test_a_malformed_request_is_dead_lettered_with_its_reason(contract_worker: ContractWorker) -> None:
    model = contract_worker.model
    good = envelope("placeholder", model, "chat/completions", {"model": model, "messages": []})
    _, _, *fields = msgpack.unpackb(good, raw=False)
    wrong_type = msgpack.packb([WIRE_VERSION, REQUEST_TAG, *fields[:5], "tomorrow", *fields[6:]], use_bin_type=True)
    bad = {
        uuid.uuid4().hex: (b"\xc1 not msgpack", "reply-nowhere", "undecodable"),
        uuid.uuid4().hex: (wrong_type, "reply-nowhere", "deadline has the wrong type"),
        uuid.uuid4().hex: (msgpack.packb([1, REQUEST_TAG, *fields]), "reply-nowhere", "unsupported wire version 1"),
        uuid.uuid4().hex: (good, None, "no reply_to"),
    }
    connection = await aio_pika.connect(contract_worker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        watch = await channel.declare_queue(exclusive=True)  # a copy of every dead letter from now on
        await watch.bind("hotq.dead")
        for request_id, (body, reply_to, _) in bad.items():
            await publish(channel, batch_queue(model), body, request_id, reply_to)

        dead: dict[str, AbstractIncomingMessage] = {}
        seen_all = asyncio.Event()

        async def on_dead(message: AbstractIncomingMessage) -> None:
            if message.message_id in bad:
                dead[message.message_id] = message
            if dead.keys() == bad.keys():
                seen_all.set()

        await watch.consume(on_dead, no_ack=True)
        await asyncio.wait_for(seen_all.wait(), contract_worker.eventually_s)

        for request_id, (body, _, reason) in bad.items():
            headers = dead[request_id].headers
            assert reason in str(headers["x-hotq-dead-reason"]), headers
            assert headers["x-hotq-dead-queue"] == batch_queue(model)
            assert dead[request_id].body == body  # kept whole, for whoever looks into it

        # The worker took all that in its stride: a good request right after is answered.
        queue = await results_queue(channel, f"contract-after-{uuid.uuid4().hex[:8]}")
        request_id = uuid.uuid4().hex
        body_json = {"model": model, "messages": [{"role": "user", "content": "still here"}]}
        await publish(channel, batch_queue(model), envelope(request_id, model, "chat/completions", body_json),
                      request_id, queue.name)  # fmt: skip
        answers = await collect(queue, {request_id}, contract_worker.eventually_s)
        await queue.delete(if_unused=False, if_empty=False)
    assert answers[request_id][0] == FINAL_TAG
    assert json.loads(answers[request_id][5])["choices"][0]["message"]["content"] == contract_worker.expected_reply(
        "still here"
    )


async def test_a_request_in_an_affinity_queue_nobody_takes_spills_to_the_shared_queue(
    contract_worker: ContractWorker,
) -> None:
    """An affinity queue declared with the page's arguments (an agent that has gone away): a request
    placed there with a short `expiration` moves to the model's shared queue and is answered."""
    model, job_id = contract_worker.model, f"contract-aff-{uuid.uuid4().hex[:8]}"
    shared = batch_queue(model)
    affinity_queue = f"{shared}.agent.gone-agent-{uuid.uuid4().hex[:6]}"
    arguments: dict[str, Any] = {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "hotq.requests",
        "x-dead-letter-routing-key": shared,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 5,
        "x-expires": 300000,
    }
    request_id = uuid.uuid4().hex
    connection = await aio_pika.connect(contract_worker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        placed = await channel.declare_queue(affinity_queue, durable=True, arguments=arguments)
        await placed.bind("hotq.requests", routing_key=affinity_queue)
        results = await results_queue(channel, job_id)
        body = {"model": model, "messages": [{"role": "user", "content": "placed then spilled"}]}
        exchange = await channel.get_exchange("hotq.requests")
        message = aio_pika.Message(
            envelope(request_id, model, "chat/completions", body),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=request_id,
            correlation_id=request_id,
            reply_to=results.name,
            expiration=0.3,  # aio-pika sends it as the string "300" (ms)
            headers={"x-hotq-spill-at": time.time() + 0.3},
        )
        await exchange.publish(message, affinity_queue, mandatory=True)
        answers = await collect(results, {request_id}, contract_worker.eventually_s)
        await placed.delete(if_unused=False, if_empty=False)
        await results.delete(if_unused=False, if_empty=False)
    assert answers[request_id][0] == FINAL_TAG


def sse_chunks(data: bytes) -> list[dict[str, Any]]:
    """The JSON chunks of a `ChunkBatch`'s (or a stream's `Final`'s) SSE events."""
    events = [event for event in data.split(b"\n\n") if event.startswith(b"data: ")]
    return [json.loads(event[len(b"data: ") :]) for event in events if event != b"data: [DONE]"]


def content(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])


async def test_a_producer_answers_resuming_and_its_stream_goes_on(
    stream_contract_worker: StreamContractWorker,
) -> None:
    """A stream's consumer dies after its first token; the one that takes the redelivery asks with
    `Resuming`, the producer answers `Resume` with what its client got, and the stream goes on after it."""
    worker, request_id = stream_contract_worker, uuid.uuid4().hex
    text = "a producer that sends streams answers the consumer that asks"
    frames: asyncio.Queue[list[Any]] = asyncio.Queue()
    connection = await aio_pika.connect(worker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        replies = await channel.declare_queue(exclusive=True)
        await replies.bind("hotq.replies", routing_key=replies.name)

        async def on_frame(message: AbstractIncomingMessage) -> None:
            version, tag, *fields = msgpack.unpackb(message.body, raw=False)
            assert version == WIRE_VERSION and fields[0] == request_id == message.correlation_id
            await frames.put([tag, *fields])

        await replies.consume(on_frame, no_ack=True)

        async def next_frame(*tags: int) -> list[Any]:
            while True:
                frame = await asyncio.wait_for(frames.get(), worker.eventually_s)
                assert frame[0] != ERROR_TAG, frame
                if frame[0] in tags:
                    return frame

        body = {"model": worker.model, "messages": [{"role": "user", "content": text}], "stream": True,
                "fake_pause_file": str(worker.pause_file)}  # fmt: skip
        await publish(channel, batch_queue(worker.model, "interactive"),
                      envelope(request_id, worker.model, "chat/completions", body, stream=True, lane="interactive"),
                      request_id, replies.name)  # fmt: skip

        got: list[dict[str, Any]] = []  # what "the client" got from the first consumer
        while not content(got):
            got += sse_chunks((await next_frame(CHUNKS_TAG))[4])
        await asyncio.to_thread(worker.replace)

        _, _, attempt, _worker = await next_frame(RESUMING_TAG)
        stream_id, created = got[0]["id"], got[0]["created"]
        resume = [WIRE_VERSION, RESUME_TAG, request_id, attempt, 1, content(got), stream_id, created]
        control = await channel.get_exchange("hotq.control")
        await control.publish(aio_pika.Message(msgpack.packb(resume, use_bin_type=True)), routing_key="")
        worker.pause_file.touch()  # the continuation pauses after its first token too

        rest: list[dict[str, Any]] = []
        while True:
            frame = await next_frame(CHUNKS_TAG, FINAL_TAG)
            assert frame[2] == attempt  # only the attempt that asked goes on
            rest += sse_chunks(frame[4] if frame[0] == CHUNKS_TAG else frame[5])
            if frame[0] == FINAL_TAG:
                break

    assert content(got) + content(rest) == worker.expected_reply(text)
    assert {(chunk["id"], chunk["created"]) for chunk in rest} == {(stream_id, created)}  # the same stream
    assert not [chunk for chunk in rest if chunk["choices"] and "role" in chunk["choices"][0]["delta"]]

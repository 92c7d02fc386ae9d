"""The consumer's SSE handling: event splitting and folding vLLM's finish-only chunk."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest

from broker.messages import ChunkBatch, Endpoint, Final, Lane, RequestEnvelope
from consumers.backend_client import BackendClient
from consumers.handler import AttemptProgress, RequestHandler, split_events
from consumers.stream_usage import ClientUsage, StreamUsage

DONE = b"data: [DONE]\n\n"


def _as_is(event: bytes) -> bytes:
    return event


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(content: str, finish: str | None = None) -> bytes:
    return _event({"id": "c", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})


def test_finish_only_chunk_is_folded_into_the_last_content_chunk() -> None:
    events = split_events(_chunk("Hello") + _chunk(" world") + _chunk("", "stop") + b"data: [DONE]\n\n", _as_is)
    assert len(events) == 3
    folded = json.loads(events[1].removeprefix(b"data: "))
    assert folded["choices"][0] == {"index": 0, "delta": {"content": " world"}, "finish_reason": "stop"}
    assert events[2] == b"data: [DONE]\n\n"


def test_chunks_already_in_openai_shape_pass_through_byte_for_byte() -> None:
    data = _chunk("Hello") + _chunk(" world", "length")
    assert b"".join(split_events(data, _as_is)) == data


def test_finish_chunk_after_role_only_chunk_is_kept() -> None:
    role = _event({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    events = split_events(role + _chunk("", "stop"), _as_is)
    assert len(events) == 2  # no content to carry the finish_reason: leave the stream alone


class _Content:
    def __init__(self, pieces: list[bytes], gaps_s: list[float]) -> None:
        self._timed = list(zip(pieces, gaps_s))

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece, gap_s in self._timed:
            await asyncio.sleep(gap_s)
            yield piece


class _Response:
    status = 200

    def __init__(self, pieces: list[bytes], gaps_s: list[float]) -> None:
        self.content = _Content(pieces, gaps_s)


class _Replies:
    def __init__(self) -> None:
        self.frames: list[object] = []

    async def send(self, frame: object) -> None:
        self.frames.append(frame)


@pytest.mark.parametrize(
    "gaps_s",
    [
        [0.0] * 6,
        [0.03] * 6,
        [0.06] * 6,
        # Three events arrive within one flush interval, then the finish chunk after it.
        [0.0, 0.06, 0.01, 0.01, 0.06, 0.01],
    ],
)
async def test_relayed_stream_keeps_every_byte_whatever_the_flush_timing(gaps_s: list[float]) -> None:
    """vLLM's finish-only chunk arriving just after a flush must not cut or garble the stream."""
    pieces = [_chunk(word) for word in ("Hello", " brave", " new", " world")] + [_chunk("", "stop"), DONE]
    handler = RequestHandler(BackendClient("http://unused", 1), flush_interval_s=0.05)
    envelope = RequestEnvelope(
        "r", "m", Endpoint.CHAT, b"{}", True, time.time() + 60, time.time() + 60, "a", Lane.INTERACTIVE, 0.0
    )
    replies = _Replies()
    progress = AttemptProgress()
    progress.stream_usage = StreamUsage(ClientUsage.NONE, 1)
    await handler._relay_stream(envelope, "att", _Response(pieces, gaps_s), replies, progress)  # type: ignore[arg-type]
    data = b"".join(f.data if isinstance(f, ChunkBatch) else f.body for f in replies.frames)  # type: ignore[attr-defined]
    events = [json.loads(e.removeprefix(b"data: ")) for e in data.split(b"\n\n") if e]
    assert "".join(e["choices"][0]["delta"]["content"] for e in events) == "Hello brave new world"
    # The finish_reason ends the stream: folded into the last content chunk when both came together,
    # else in vLLM's own finish-only chunk (OpenAI's shape too), never holding content back for it.
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, None]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])
    assert isinstance(replies.frames[-1], Final) and b"[DONE]" not in data

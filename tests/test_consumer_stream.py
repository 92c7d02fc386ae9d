"""The consumer's SSE handling: event splitting and folding vLLM's finish-only chunk."""

from __future__ import annotations

import json

from consumers.handler import split_events, usage_of_stream_tail


def _event(payload: dict[str, object]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(content: str, finish: str | None = None) -> bytes:
    return _event({"id": "c", "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})


def test_finish_only_chunk_is_folded_into_the_last_content_chunk() -> None:
    events = split_events(_chunk("Hello") + _chunk(" world") + _chunk("", "stop") + b"data: [DONE]\n\n")
    assert len(events) == 3
    folded = json.loads(events[1].removeprefix(b"data: "))
    assert folded["choices"][0] == {"index": 0, "delta": {"content": " world"}, "finish_reason": "stop"}
    assert events[2] == b"data: [DONE]\n\n"


def test_chunks_already_in_openai_shape_pass_through_byte_for_byte() -> None:
    data = _chunk("Hello") + _chunk(" world", "length")
    assert b"".join(split_events(data)) == data


def test_finish_chunk_after_role_only_chunk_is_kept() -> None:
    role = _event({"id": "c", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    events = split_events(role + _chunk("", "stop"))
    assert len(events) == 2  # no content to carry the finish_reason: leave the stream alone


def test_usage_comes_from_the_last_event() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    tail = _chunk("x") + _event({"id": "c", "choices": [], "usage": usage})
    assert usage_of_stream_tail(tail) == usage
    assert usage_of_stream_tail(_chunk("x")) is None

"""The consumer asks the backend for running usage and gives the client the stream it asked for."""

from __future__ import annotations

import json
from typing import Any

import pytest

from consumers.stream_usage import ClientUsage, StreamUsage, backend_request


def _compact(payload: dict[str, Any]) -> bytes:
    """As vLLM writes a chunk (pydantic's model_dump_json: no spaces, fields in declaration order)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _spaced(payload: dict[str, Any]) -> bytes:
    """As other backends may write it (Python's json.dumps defaults)."""
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "completion_tokens_details": None,
    }


def _chunk(index: int, content: str, usage: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
    chunk: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return chunk | {"choices": [choice], "usage": usage} | extra


def _stream(prompt: int, words: list[str]) -> list[dict[str, Any]]:
    """A continuous-usage stream of one choice: a chunk per word, then the usage-only chunk."""
    chunks = [_chunk(0, word, _usage(prompt, n)) for n, word in enumerate(words, start=1)]
    final = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}
    return chunks + [final | {"usage": _usage(prompt, len(words))}]


def _without_usage(chunk: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in chunk.items() if key != "usage"}


@pytest.mark.parametrize("encode", [_compact, _spaced], ids=["vllm-compact", "spaced"])
def test_client_without_include_usage_gets_no_usage_at_all(encode: Any) -> None:
    stream = _stream(7, ["a", "b", "c"])
    usage = StreamUsage(ClientUsage.NONE, 1)
    out = [usage.client_event(encode(chunk)) for chunk in stream]
    assert out[-1] is None  # the usage-only chunk is left out
    events = [event for event in out[:-1] if event is not None]
    assert [json.loads(event.removeprefix(b"data: ")) for event in events] == [_without_usage(c) for c in stream[:-1]]
    assert usage.usage == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_vllm_chunks_are_cut_not_reencoded() -> None:
    """The fast path: the running usage is cut out of the bytes, the rest stays byte for byte."""
    chunk = _chunk(0, "x", _usage(7, 1), prompt_token_ids=None)  # a field after usage, as vLLM's first chunk
    event = _compact(chunk)
    assert StreamUsage(ClientUsage.NONE, 1).client_event(event) == _compact(_without_usage(chunk))
    assert StreamUsage(ClientUsage.FINAL, 1).client_event(event) == _compact(chunk | {"usage": None})
    assert StreamUsage(ClientUsage.CONTINUOUS, 1).client_event(event) == event


@pytest.mark.parametrize("encode", [_compact, _spaced], ids=["vllm-compact", "spaced"])
def test_client_with_include_usage_gets_openai_s_shape(encode: Any) -> None:
    stream = _stream(7, ["a", "b"])
    usage = StreamUsage(ClientUsage.FINAL, 1)
    out = [json.loads(usage.client_event(encode(chunk)).removeprefix(b"data: ")) for chunk in stream]  # type: ignore[union-attr]
    assert [chunk["usage"] for chunk in out] == [None, None, _usage(7, 2)]
    assert out[-1]["choices"] == []


def test_client_asking_for_continuous_usage_gets_the_backend_s_stream() -> None:
    usage = StreamUsage(ClientUsage.CONTINUOUS, 1)
    for chunk in _stream(4, ["a", "b"]):
        assert usage.client_event(_compact(chunk)) == _compact(chunk)
    assert usage.usage == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_a_stream_cut_short_counts_what_the_backend_generated() -> None:
    usage = StreamUsage(ClientUsage.NONE, 1)
    assert usage.usage is None  # nothing from the backend yet
    for chunk in _stream(9, ["a", "b", "c", "d"])[:2]:
        usage.client_event(_compact(chunk))
    assert usage.usage == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}


def test_several_choices_count_each_choice_s_tokens() -> None:
    """With n > 1 vLLM's running usage counts the tokens of the chunk's own choice."""
    usage = StreamUsage(ClientUsage.NONE, 2)
    for step in (1, 2, 3):
        for index in (0, 1):
            if index == 1 and step == 3:
                continue  # choice 1 finished after two tokens
            event = usage.client_event(_compact(_chunk(index, "w", _usage(5, step))))
            assert event is not None and b"usage" not in event
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_done_and_non_json_events_pass_through() -> None:
    usage = StreamUsage(ClientUsage.NONE, 1)
    assert usage.client_event(b"data: [DONE]\n\n") == b"data: [DONE]\n\n"
    assert usage.client_event(b": keep-alive\n\n") == b": keep-alive\n\n"
    assert usage.client_event(b'data: {"usage": broken\n\n') == b'data: {"usage": broken\n\n'


def test_several_prompts_count_each_prompt_once() -> None:
    """/v1/completions with a list of prompts: choice p * n + i belongs to prompt p."""
    _, usage = backend_request(json.dumps({"model": "m", "prompt": ["a b c", "d"], "n": 2, "stream": True}).encode())
    for index, prompt, completion in ((0, 3, 2), (1, 3, 1), (2, 1, 4), (3, 1, 3), (0, 3, 3)):
        chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m"}
        choice = {"index": index, "text": "w", "logprobs": None, "finish_reason": None}
        assert usage.client_event(_compact(chunk | {"choices": [choice], "usage": _usage(prompt, completion)}))
    assert usage.usage == {"prompt_tokens": 4, "completion_tokens": 3 + 1 + 4 + 3, "total_tokens": 15}


def test_backend_request_asks_for_running_usage_and_keeps_the_rest() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "é ✓"}], "stream": True, "temperature": 0.1}
    sent, usage = backend_request(json.dumps(body).encode())
    assert json.loads(sent) == body | {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    assert usage.asked is ClientUsage.NONE

    with_usage = body | {"stream_options": {"include_usage": True}, "n": 3}
    sent, usage = backend_request(json.dumps(with_usage).encode())
    assert json.loads(sent)["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert usage.asked is ClientUsage.FINAL

    continuous = json.dumps(body | {"stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    sent, usage = backend_request(continuous.encode())
    assert sent == continuous.encode() and usage.asked is ClientUsage.CONTINUOUS
    for refused_by_the_backend in (b"[1, 2]", b"{not json"):  # sent as they are: the backend refuses them
        sent, usage = backend_request(refused_by_the_backend)
        assert sent == refused_by_the_backend and usage.asked is ClientUsage.NONE


def _plain(index: int, content: str) -> dict[str, Any]:
    """A chunk as a backend without running usage writes it (OpenAI's API, llama.cpp, ...)."""
    return _without_usage(_chunk(index, content, None))


def test_a_backend_without_running_usage_is_estimated_from_what_was_streamed() -> None:
    """Issue 15 §5: the prompt from its text (4 characters a token), the completion a token a chunk."""
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "stream": True}
    _, usage = backend_request(json.dumps(body).encode())
    assert usage.usage == {"prompt_tokens": 100, "completion_tokens": 0, "total_tokens": 100}  # nothing streamed yet
    role = _plain(0, "") | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert usage.client_event(_spaced(role)) == _spaced(role)  # no output: not counted
    for word in ("a", "b", "c"):
        assert usage.client_event(_compact(_plain(0, word))) == _compact(_plain(0, word))
    assert usage.usage == {"prompt_tokens": 100, "completion_tokens": 3, "total_tokens": 103}
    usage.client_event(_compact(_plain(0, "y" * 40)))  # a server that sends several tokens a chunk
    assert usage.usage == {"prompt_tokens": 100, "completion_tokens": 11, "total_tokens": 111}  # 43 characters


def test_the_final_usage_chunk_replaces_the_estimate() -> None:
    body = {"model": "m", "prompt": [1, 2, 3, 4, 5], "stream": True, "stream_options": {"include_usage": True}}
    _, usage = backend_request(json.dumps(body).encode())
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "usage": None}
    for text in ("p", "q"):
        event = _compact(chunk | {"choices": [{"index": 0, "text": text, "finish_reason": None}]})
        assert usage.client_event(event) == event  # include_usage asked: "usage": null stays
    assert usage.usage == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}  # the token ids given
    assert usage.client_event(_compact(chunk | {"choices": [], "usage": _usage(6, 2)}))
    assert usage.usage == {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}  # the backend's count

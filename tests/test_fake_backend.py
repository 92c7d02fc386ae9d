"""Checks the fake backend against the official openai client (it stands in for vLLM)."""

from __future__ import annotations

import base64
import concurrent.futures
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam

from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import (
    Hold,
    expected_chat_tokens,
    expected_completion_tokens,
    expected_embedding,
    fake_stats,
    running_fake_backend,
)

MODEL = "fake-model"


@pytest.fixture(scope="module")
def backend_url() -> Iterator[str]:
    with running_fake_backend([MODEL, "other-model"]) as url:
        yield url


@pytest.fixture()
def client(backend_url: str) -> Iterator[openai.OpenAI]:
    # max_retries=0: error-injection tests must see the first failure, not retry it.
    with openai.OpenAI(base_url=backend_url + "/v1", api_key="x", max_retries=0) as c:
        yield c


def test_expected_tokens_rule() -> None:
    assert expected_chat_tokens("hello world", None) == (["echo:", " olleh", " dlrow"], "stop")
    assert expected_chat_tokens("hello world", 2) == (["echo:", " olleh"], "length")
    assert expected_chat_tokens("hello world", 3) == (["echo:", " olleh", " dlrow"], "stop")
    assert expected_completion_tokens("", None) == (["echo:"], "stop")


def test_health_and_models(backend_url: str, client: openai.OpenAI) -> None:
    assert httpx.get(backend_url + "/health", timeout=EVENTUALLY_S).status_code == 200
    assert [m.id for m in client.models.list()] == [MODEL, "other-model"]


def test_chat_non_stream(client: openai.OpenAI) -> None:
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "hello big world"},
    ]
    resp = client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    tokens, finish = expected_chat_tokens("hello big world", None)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    assert resp.choices[0].message.content == "".join(tokens) == "echo: olleh gib dlrow"
    assert resp.choices[0].finish_reason == finish == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (5, 4, 9)

    short = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, n=2)  # type: ignore[arg-type]
    assert [c.index for c in short.choices] == [0, 1]
    assert all(c.message.content == "echo: olleh" and c.finish_reason == "length" for c in short.choices)


def test_chat_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "a bc def"}], stream=True
    )
    chunks = list(stream)
    tokens, finish = expected_chat_tokens("a bc def", None)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content_chunks = chunks[1:]
    assert [c.choices[0].delta.content for c in content_chunks] == tokens
    assert [c.choices[0].finish_reason for c in content_chunks] == [None] * (len(tokens) - 1) + [finish]
    assert all(c.usage is None for c in chunks)


def test_chat_stream_include_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        max_tokens=3,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (3, 3, 6)
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "echo: eno owt"
    assert chunks[-2].choices[0].finish_reason == "length"


def test_chat_stream_continuous_usage(client: openai.OpenAI) -> None:
    """vLLM's continuous_usage_stats: every chunk carries the usage so far."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "one two three"}],
        stream=True,
        max_tokens=3,
        # continuous_usage_stats is vLLM's, unknown to OpenAI's types
        stream_options=cast(ChatCompletionStreamOptionsParam, {"include_usage": True, "continuous_usage_stats": True}),
    )
    chunks = list(stream)
    counted = [(c.usage.prompt_tokens, c.usage.completion_tokens) for c in chunks if c.usage is not None]
    assert counted == [(3, 0), (3, 1), (3, 2), (3, 3), (3, 3)]  # role chunk, 3 tokens, the final usage chunk
    assert chunks[-1].choices == []


def test_completions(client: openai.OpenAI) -> None:
    resp = client.completions.create(model=MODEL, prompt="abc de", max_tokens=2)
    tokens, finish = expected_completion_tokens("abc de", 2)
    assert resp.object == "text_completion" and resp.choices[0].text == "".join(tokens) == "echo: cba"
    assert resp.choices[0].finish_reason == finish == "length"

    chunks = list(
        client.completions.create(model=MODEL, prompt="abc de", stream=True, stream_options={"include_usage": True})
    )
    tokens, finish = expected_completion_tokens("abc de", None)
    assert [c.choices[0].text for c in chunks[:-1]] == tokens
    assert chunks[-2].choices[0].finish_reason == finish and chunks[0].choices[0].finish_reason is None
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 5


def test_embeddings(backend_url: str, client: openai.OpenAI) -> None:
    texts = ["hello world", "other"]
    resp = client.embeddings.create(model=MODEL, input=texts)  # client requests base64 by default
    for item, text in zip(resp.data, texts, strict=True):
        assert item.embedding == pytest.approx(expected_embedding(text), abs=1e-6)
    assert resp.usage.prompt_tokens == 3

    raw = httpx.post(
        backend_url + "/v1/embeddings",
        json={"model": MODEL, "input": "x", "encoding_format": "base64"},
        timeout=EVENTUALLY_S,
    )
    decoded = struct.unpack("<8f", base64.b64decode(raw.json()["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(expected_embedding("x"), abs=1e-6)
    floats = client.embeddings.create(model=MODEL, input="x", encoding_format="float")
    assert floats.data[0].embedding == expected_embedding("x")


def test_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as rate:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "FAIL 429 please"}])
    assert rate.value.status_code == 429 and rate.value.code == "fake_429"
    with pytest.raises(openai.InternalServerError):
        client.completions.create(model=MODEL, prompt="FAIL 503")
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"


def test_cancel_is_counted(backend_url: str, client: openai.OpenAI) -> None:
    httpx.post(backend_url + "/_reset", timeout=EVENTUALLY_S).raise_for_status()
    sent_at, sent_at_monotonic = time.time(), time.monotonic()
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": " ".join(["w"] * 50)}],
        stream=True,
        extra_body={"fake_delay_ms": 50, "fake_tag": "t-cancel"},
    )
    seen = 0
    for _ in stream:
        seen += 1
        if seen == 2:
            break
    stream.close()

    wait_until(lambda: fake_stats(backend_url)["cancelled"] >= 1, EVENTUALLY_S, "the cancel counted")
    stats = fake_stats(backend_url)
    assert stats["cancelled"] == 1 and stats["started"] == 1 and stats["completed"] == 0
    assert stats["active"] == 0
    # When the backend saw it: a time between the request and now, on both clocks.
    assert sent_at <= stats["cancelled_tags"]["t-cancel"] <= time.time()
    assert sent_at_monotonic <= stats["cancelled_tags_monotonic"]["t-cancel"] <= time.monotonic()
    assert stats["started_order"] == {"t-cancel": 1}


def test_a_held_request_waits_for_its_file(backend_url: str, client: openai.OpenAI, tmp_path: Path) -> None:
    httpx.post(backend_url + "/_reset", timeout=EVENTUALLY_S).raise_for_status()
    hold = Hold(tmp_path / "release")

    def ask(stream: bool) -> str:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "wait for it"}]
        extra = hold.field | {"fake_tag": f"held-{stream}"}
        if not stream:
            answer = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
            return answer.choices[0].message.content or ""
        chunks = client.chat.completions.create(model=MODEL, messages=messages, stream=True, extra_body=extra)
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = [pool.submit(ask, stream) for stream in (False, True)]
        try:
            wait_until(lambda: fake_stats(backend_url)["active"] == 2, EVENTUALLY_S, "both requests in the backend")
            assert not any(future.done() for future in held)  # neither answer has ended
        finally:
            hold.release()
        assert [future.result(timeout=EVENTUALLY_S) for future in held] == ["echo: tiaw rof ti"] * 2
    stats = fake_stats(backend_url)
    assert (stats["completed"], stats["active"]) == (2, 0)
    assert sorted(stats["started_order"].values()) == [1, 2]


def test_a_held_request_whose_client_leaves_is_cancelled(backend_url: str, tmp_path: Path) -> None:
    httpx.post(backend_url + "/_reset", timeout=EVENTUALLY_S).raise_for_status()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "never"}], "fake_tag": "gone"}
    with pytest.raises(httpx.TimeoutException):  # nobody releases it: the client gives up
        httpx.post(backend_url + "/v1/chat/completions", json=body | Hold(tmp_path / "never").field, timeout=0.5)
    wait_until(lambda: "gone" in fake_stats(backend_url)["cancelled_tags"], EVENTUALLY_S, "the held request cancelled")
    assert fake_stats(backend_url)["active"] == 0


def test_without_running_usage_only_the_last_chunk_counts() -> None:
    """`--no-running-usage`: continuous_usage_stats is ignored, as most servers but vLLM do."""
    with running_fake_backend([MODEL], running_usage=False) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options=cast(
                ChatCompletionStreamOptionsParam, {"include_usage": True, "continuous_usage_stats": True}
            ),
        )
        chunks = list(stream)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_a_stream_can_break_mid_answer(backend_url: str) -> None:
    """`fake_break_after`: the connection drops after that many tokens, with no end to the body."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "one two three"}], "stream": True}
    with httpx.stream("POST", backend_url + "/v1/chat/completions", json={**body, "fake_break_after": 2}) as answer:
        lines: list[str] = []
        with pytest.raises(httpx.RemoteProtocolError):
            lines.extend(answer.iter_lines())
    contents = [line for line in lines if '"content":' in line]
    assert len(contents) == 3 and not any("[DONE]" in line for line in lines)  # the role chunk and 2 tokens

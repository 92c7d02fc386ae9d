"""Acceptance 1: the official openai client through hotq, against the deterministic fake backend."""

from __future__ import annotations

import base64
import json
import socket
import struct

import openai
import pytest

from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import expected_chat_tokens, expected_completion_tokens, expected_embedding
from ops.testing.stack import Stack
from tests.rabbitmq_roles import rabbitmqctl, vhost_of


@pytest.fixture(scope="module")
def client(fake_stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake_stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)


def test_chat_non_streaming(client: openai.OpenAI, fake_model: str) -> None:
    response = client.chat.completions.create(
        model=fake_model, messages=[{"role": "user", "content": "the quick brown fox"}]
    )
    tokens, finish = expected_chat_tokens("the quick brown fox", None)
    assert response.choices[0].message.content == "".join(tokens)
    assert response.choices[0].finish_reason == finish
    assert response.usage is not None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (4, len(tokens))


def test_chat_streaming(client: openai.OpenAI, fake_model: str) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    chunks = list(
        client.chat.completions.create(
            model=fake_model, messages=[{"role": "user", "content": text}], stream=True, max_tokens=30
        )
    )
    tokens, finish = expected_chat_tokens(text, 30)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert content == tokens  # every token, in order, none twice
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == finish == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_chat_streaming_include_usage(client: openai.OpenAI, fake_model: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=fake_model,
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    tokens, _ = expected_chat_tokens("one two three", None)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(tokens)
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (5, 4, 9)


def test_completions_both_ways(client: openai.OpenAI, fake_model: str) -> None:
    prompt = "alpha beta gamma delta"
    tokens, finish = expected_completion_tokens(prompt, 3)
    whole = client.completions.create(model=fake_model, prompt=prompt, max_tokens=3)
    assert whole.choices[0].text == "".join(tokens) and whole.choices[0].finish_reason == finish
    streamed = list(client.completions.create(model=fake_model, prompt=prompt, max_tokens=3, stream=True))
    assert [c.choices[0].text for c in streamed] == tokens
    assert streamed[-1].choices[0].finish_reason == finish


def test_embeddings(client: openai.OpenAI, fake_model: str) -> None:
    inputs = ["first text", "second text"]
    result = client.embeddings.create(model=fake_model, input=inputs)  # base64 on the wire by default
    assert [item.index for item in result.data] == [0, 1]
    for item, text in zip(result.data, inputs):
        assert item.embedding == pytest.approx(expected_embedding(text), abs=1e-6)
    raw = client.embeddings.create(model=fake_model, input="first text", encoding_format="base64")
    encoded = raw.data[0].embedding
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == pytest.approx(
        expected_embedding("first text"), abs=1e-6
    )


def test_models_list_shows_queue_depth_and_consumers(client: openai.OpenAI, fake_model: str) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [fake_model]
    extension = models[0].model_extra["hotq"]  # type: ignore[index]
    # Without a scaler the capacity comes from the consumers alone: no starting agents or estimate known.
    assert extension == {
        "queue_depth": 0,
        "consumers": 1,
        "state": "hot",
        "agents_starting": None,
        "expected_hot_s": None,
    }


def test_the_api_holds_one_amqp_connection(
    client: openai.OpenAI, fake_stack: Stack, fake_model: str, amqp_url: str
) -> None:
    """Requests, batch runners, usage and the ops sampler all share the API process's one connection."""
    client.chat.completions.create(model=fake_model, messages=[{"role": "user", "content": "one connection"}])
    assert fake_stack.api is not None
    suffix = f"@{socket.gethostname()}:{fake_stack.api.pid}"
    listing = rabbitmqctl("list_connections", "-p", vhost_of(amqp_url), "client_properties", "--formatter", "json")
    names = [
        value  # rabbitmqctl lists each client property as [key, type, value]
        for connection in json.loads(listing)
        for key, _type, value in connection["client_properties"]
        if key == "connection_name" and value.endswith(suffix)
    ]
    assert names == [f"hotq-api{suffix}"]

"""Issue 10 §2: a stream relays each token as soon as the backend produced it, and what keeps a
waiting stream alive is something every OpenAI client parses: vLLM's benchmark client, the
`openai` client and a plain line reader. The fake backend holds a request (`fake_hold_file`)
until the test has seen keep-alives, or pauses a stream after its first token
(`fake_pause_file`) until the test has seen that token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest
from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_chat_completions

from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import Stack, api_and_worker_on_a_fake_backend

KEEPALIVES_FIRST = 2  # a held request is released only after its stream carried this many keep-alives


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory, amqp_url: str, session_tag: str, delete_test_queues: list[str]
) -> Iterator[tuple[Stack, str]]:
    model = f"relay-{session_tag}"
    delete_test_queues.append(model)
    workdir = tmp_path_factory.mktemp("relay")
    with api_and_worker_on_a_fake_backend(
        workdir, amqp_url, model, {"max_inflight": 8}, keepalive_s=0.3, stream_flush_ms=0
    ) as stack:
        yield stack, model


def _is_keepalive(data: dict[str, object]) -> bool:
    return data.get("choices") == [] and "usage" not in data


def test_a_token_reaches_the_client_before_the_next_one_exists(relay: tuple[Stack, str], tmp_path: Path) -> None:
    stack, model = relay
    pause = tmp_path / "pause"
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=EVENTUALLY_S)
    text = "one two three four"
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": text}],
        stream=True,
        extra_body={"fake_pause_file": str(pause)},
    )
    content = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
            if len(content) == 1:  # the backend now waits: this token came without its successor
                pause.touch()
    assert content == expected_chat_tokens(text, None)[0]


def test_keepalives_are_skipped_by_a_plain_line_reader(relay: tuple[Stack, str], tmp_path: Path) -> None:
    stack, model = relay
    hold = tmp_path / "hold"
    body = {"model": model, "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    keepalives, content = 0, ""
    with httpx.stream(
        "POST", stack.url + "/v1/chat/completions", json=body | {"fake_hold_file": str(hold)}, timeout=EVENTUALLY_S
    ) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                assert line == "" or line == "data: [DONE]", line  # no comments, nothing else
                continue
            data = json.loads(line.removeprefix("data: "))
            if _is_keepalive(data):
                keepalives += 1
                if keepalives == KEEPALIVES_FIRST:
                    hold.touch()
                continue
            content += data["choices"][0]["delta"].get("content") or ""
    assert keepalives >= KEEPALIVES_FIRST
    assert content == "".join(expected_chat_tokens("a b c", None)[0])


def test_keepalives_are_skipped_by_the_openai_client(relay: tuple[Stack, str], tmp_path: Path) -> None:
    stack, model = relay
    hold = tmp_path / "hold"
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=EVENTUALLY_S)
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "a b c"}],
        stream=True,
        extra_body={"fake_hold_file": str(hold)},
    )
    keepalives, content = 0, ""
    for chunk in stream:
        if not chunk.choices:
            keepalives += 1
            if keepalives == KEEPALIVES_FIRST:
                hold.touch()
            continue
        content += chunk.choices[0].delta.content or ""
    assert keepalives >= KEEPALIVES_FIRST
    assert content == "".join(expected_chat_tokens("a b c", None)[0])


async def test_keepalives_are_skipped_by_vllms_benchmark_client(relay: tuple[Stack, str], tmp_path: Path) -> None:
    """vLLM's `StreamedResponseHandler` strips each network read and concatenates: after an SSE
    comment nothing parsed until the end, and the text was only the last token (issue 10)."""
    stack, model = relay
    hold = tmp_path / "hold"
    seen = {"keepalives": 0}

    async def counted(reads: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for read in reads:  # each network read, as the benchmark client gets it
            seen["keepalives"] += read.count(b'"choices":[]}') + read.count(b": keep-alive")  # either form
            if seen["keepalives"] >= KEEPALIVES_FIRST:
                hold.touch()
            yield read

    class Content:
        """The response's stream reader, its network reads counted on the way to the client."""

        def __init__(self, reader: aiohttp.StreamReader) -> None:
            self._reader = reader

        def iter_any(self) -> AsyncIterator[bytes]:
            return counted(self._reader.iter_any())

        def __getattr__(self, name: str) -> object:
            return getattr(self._reader, name)

    class Watched(aiohttp.ClientResponse):
        async def start(self, connection: aiohttp.connector.Connection) -> aiohttp.ClientResponse:
            started = await super().start(connection)
            self.content = Content(self.content)  # type: ignore[assignment]
            return started

    request = RequestFuncInput(
        prompt="a b c",
        api_url=stack.url + "/v1/chat/completions",
        prompt_len=3,
        output_len=16,
        model=model,
        extra_body={"fake_hold_file": str(hold)},
    )
    async with aiohttp.ClientSession(
        response_class=Watched, timeout=aiohttp.ClientTimeout(total=EVENTUALLY_S)
    ) as session:
        output = await async_request_openai_chat_completions(request, session)
    assert seen["keepalives"] >= KEEPALIVES_FIRST
    assert output.success, output.error
    tokens = expected_chat_tokens("a b c", 16)[0]
    assert output.generated_text == "".join(tokens)
    assert len(output.itl) == len(tokens)  # every token parsed on its own: the role chunk, then one per token

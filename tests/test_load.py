"""Acceptance 6: 500 concurrent streams over one API process and two workers."""

from __future__ import annotations

import asyncio

import httpx
import openai

from ops.testing.deadlines import EVENTUALLY_S, LONG_WORK_S
from ops.testing.fake_backend import expected_chat_tokens
from ops.testing.stack import Stack

STREAMS = 500


async def _one_stream(client: openai.AsyncOpenAI, model: str, index: int) -> tuple[list[str], str | None, str]:
    text = f"request{index} " + " ".join(f"w{index}x{k}" for k in range(12))
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True
    )
    tokens: list[str] = []
    finish: str | None = None
    async for chunk in stream:
        if chunk.choices:
            tokens.extend([chunk.choices[0].delta.content] if chunk.choices[0].delta.content else [])
            finish = chunk.choices[0].finish_reason or finish
    return tokens, finish, text


async def test_500_concurrent_streams_complete_in_order(
    fake_stack: Stack, fake_model: str, fake_backend_url: str
) -> None:
    if len(fake_stack.workers) < 2:
        fake_stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=STREAMS + 10), timeout=LONG_WORK_S)
    # openai types `http_client` for httpx2; it takes an httpx client too
    client = openai.AsyncOpenAI(
        base_url=fake_stack.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=http,  # type: ignore[arg-type]
    )
    try:
        results = await asyncio.gather(*(_one_stream(client, fake_model, i) for i in range(STREAMS)))
    finally:
        await http.aclose()
    for tokens, finish, text in results:
        expected, expected_finish = expected_chat_tokens(text, None)
        assert tokens == expected  # complete, in order, nothing from another stream
        assert finish == expected_finish
    stats = httpx.get(fake_backend_url + "/_stats", timeout=EVENTUALLY_S).json()
    assert stats["started"] == STREAMS  # none lost, none computed twice

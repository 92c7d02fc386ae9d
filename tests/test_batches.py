"""Issue 5 acceptance 1, 2 and 5: the OpenAI Files and Batches API through the official client.

A stack (API + one worker on the fake backend) of its own, with a dedicated model and
the default 24 h batch window; the expiry test runs a stack of its own with a short one.
Batch lines that must not finish before the test says so are held in the fake backend
(`Hold`), not slowed down: how long work takes is never what a test relies on.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import aio_pika
import httpx
import openai
import pytest
from openai.types import Batch

from broker import topology
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, in_growing_windows
from ops.testing.fake_backend import Hold, expected_embedding, reply_text
from ops.testing.stack import Stack, api_and_worker_on_a_fake_backend

MODEL_TABLE = {"max_inflight": 16, "reserved_interactive": 2}


@pytest.fixture(scope="module")
def batch_model(session_tag: str, delete_test_queues: list[str]) -> str:
    model = f"test-org/batch-api.v1-{session_tag}"
    delete_test_queues.append(model)
    return model


@pytest.fixture(scope="module")
def batch_stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, batch_model: str) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("batch-api")
    with api_and_worker_on_a_fake_backend(workdir, amqp_url, batch_model, MODEL_TABLE) as stack:
        yield stack


def _client_of(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)


@pytest.fixture(scope="module")
def client(batch_stack: Stack) -> openai.OpenAI:
    return _client_of(batch_stack)


def _line(custom_id: str, body: Mapping[str, object], url: str = "/v1/chat/completions") -> dict[str, object]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def _jsonl(lines: Sequence[object]) -> bytes:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines).encode()


def _upload(client: openai.OpenAI, lines: Sequence[object]) -> str:
    return client.files.create(file=("input.jsonl", _jsonl(lines)), purpose="batch").id


def _wait(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...], timeout: float = EVENTUALLY_S) -> Batch:
    """The batch once its status is one of `statuses`."""
    batch = client.batches.retrieve(batch_id)

    def reached() -> bool:
        nonlocal batch
        batch = client.batches.retrieve(batch_id)
        return batch.status in statuses

    wait_until(reached, timeout, f"batch {batch_id} {' or '.join(statuses)}", poll_s=0.2)
    return batch


def _wait_for_completed(client: openai.OpenAI, batch_id: str, count: int, timeout: float = EVENTUALLY_S) -> int:
    """How many lines of the batch are completed, once at least `count` are."""
    completed = 0

    def enough() -> bool:
        nonlocal completed
        counts = client.batches.retrieve(batch_id).request_counts
        completed = 0 if counts is None else counts.completed
        return completed >= count

    wait_until(enough, timeout, f"{count} lines of batch {batch_id} completed", poll_s=0.05)
    return completed


def _records(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:  # JSON records
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def test_files_lifecycle(client: openai.OpenAI) -> None:
    content = _jsonl([{"hello": "world"}])
    file = client.files.create(file=("mine.jsonl", content), purpose="batch")
    assert (file.object, file.purpose, file.filename, file.bytes) == ("file", "batch", "mine.jsonl", len(content))
    assert client.files.retrieve(file.id).id == file.id
    assert client.files.content(file.id).content == content
    assert file.id in [f.id for f in client.files.list(purpose="batch")]
    deleted = client.files.delete(file.id)
    assert deleted.deleted and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("x.jsonl", content), purpose="fine-tune")
    assert raised.value.body["param"] == "purpose"  # type: ignore[index]


def test_batch_lifecycle_exact_output(client: openai.OpenAI, batch_model: str) -> None:
    texts = [f"question number {i} about queues" for i in range(20)]
    lines: list[object] = [
        _line(f"req-{i}", {"model": batch_model, "messages": [{"role": "user", "content": text}], "max_tokens": 4})
        for i, text in enumerate(texts)
    ]
    lines.append(_line("bad-1", {"model": batch_model, "messages": [{"role": "user", "content": "FAIL 400 no"}]}))
    lines.append(_line("bad-2", {"model": batch_model, "messages": [{"role": "user", "content": "FAIL 503 x"}]}))
    input_id = _upload(client, lines)
    batch = client.batches.create(
        input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"run": "one"}
    )
    assert batch.status == "in_progress" and batch.in_progress_at and batch.metadata == {"run": "one"}
    assert batch.request_counts is not None and batch.request_counts.total == 22
    done = _wait(client, batch.id, ("completed",))
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (22, 20, 2)
    assert done.finalizing_at and done.completed_at and done.model == batch_model
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at  # type: ignore[operator]
    assert done.usage is not None  # the 20 answers' tokens (the failed lines have none)
    assert (done.usage.input_tokens, done.usage.output_tokens, done.usage.total_tokens) == (20 * 5, 20 * 4, 20 * 9)

    outputs = _records(client, done.output_file_id)
    assert [r["custom_id"] for r in outputs] == [f"req-{i}" for i in range(20)]
    for record, text in zip(outputs, texts):
        assert set(record) == {"id", "custom_id", "response", "error"} and record["error"] is None
        response = record["response"]
        assert isinstance(response, dict) and response["status_code"] == 200
        assert record["id"] == f"batch_req_{response['request_id']}"
        body = response["body"]
        assert body["object"] == "chat.completion" and body["model"] == batch_model
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": reply_text([{"role": "user", "content": text}], 4),
        }
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}

    errors = {r["custom_id"]: r for r in _records(client, done.error_file_id)}
    assert set(errors) == {"bad-1", "bad-2"}
    for custom_id, status in (("bad-1", 400), ("bad-2", 503)):
        response = errors[custom_id]["response"]
        assert isinstance(response, dict) and response["status_code"] == status
        assert response["body"]["error"]["code"] == f"fake_{status}"
        assert errors[custom_id]["error"] is None

    assert done.id in [b.id for b in client.batches.list(limit=100)]


def test_embeddings_batch_and_all_failed(client: openai.OpenAI, batch_model: str) -> None:
    url: Literal["/v1/embeddings"] = "/v1/embeddings"
    ok = _upload(
        client,
        [
            _line(f"e{i}", {"model": batch_model, "input": f"text {i}", "encoding_format": "float"}, url)
            for i in range(5)
        ],
    )
    batch = client.batches.create(input_file_id=ok, endpoint=url, completion_window="24h")
    done = _wait(client, batch.id, ("completed",))
    for i, record in enumerate(_records(client, done.output_file_id)):
        assert record["custom_id"] == f"e{i}"
        assert record["response"]["body"]["data"][0]["embedding"] == expected_embedding(f"text {i}")

    failing = _upload(client, [_line(f"f{i}", {"model": batch_model, "input": "FAIL 500 boom"}, url) for i in range(3)])
    batch = client.batches.create(input_file_id=failing, endpoint=url, completion_window="24h")
    done = _wait(client, batch.id, ("completed",))
    assert done.output_file_id is None and done.error_file_id is not None
    assert done.request_counts is not None and done.request_counts.failed == 3
    assert len(_records(client, done.error_file_id)) == 3
    # Paging one at a time (the client follows `after`) lists every batch once, newest first.
    paged = [b.id for b in client.batches.list(limit=1)]
    assert paged == [b.id for b in client.batches.list(limit=100)] and len(paged) >= 3
    assert paged[0] == batch.id


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["{not json", "BODY"], [(1, "invalid_json_line")]),
        (
            ["BODY", {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions"}],
            [(2, "missing_required_parameter")],
        ),
        (["BODY", "BODY"], [(2, "duplicate_custom_id")]),
        (["BODY", "OTHER_MODEL"], [(2, "mismatched_model")]),
        (
            ["BODY", "WRONG_URL", "{", "BODY"],
            [(2, "invalid_url"), (3, "invalid_json_line"), (4, "duplicate_custom_id")],
        ),
        ([{"custom_id": "g", "method": "GET", "url": "/v1/chat/completions", "body": {}}], [(1, "invalid_method")]),
    ],
)
def test_invalid_batch_files_fail_with_line_numbers(
    client: openai.OpenAI, batch_stack: Stack, batch_model: str, lines: list[object], expected: list[tuple[int, str]]
) -> None:
    body = {"model": batch_model, "messages": [{"role": "user", "content": "hi"}]}
    replacements: dict[str, object] = {
        "BODY": _line("same", body),
        "OTHER_MODEL": _line("other", dict(body, model="some-other-model")),
        "WRONG_URL": _line("wrong", body, "/v1/completions"),
    }
    input_id = _upload(client, [replacements.get(line, line) if isinstance(line, str) else line for line in lines])
    depth_before = _batch_queue_depth(batch_stack)
    batch = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.status == "failed" and batch.failed_at and batch.in_progress_at is None
    assert batch.errors is not None and batch.errors.data is not None
    assert [(e.line, e.code) for e in batch.errors.data] == expected
    assert all(e.message for e in batch.errors.data)
    assert batch.request_counts is not None and batch.request_counts.total == 0
    assert client.batches.retrieve(batch.id).status == "failed"
    assert _batch_queue_depth(batch_stack) == depth_before  # nothing was dispatched


def _batch_queue_depth(stack: Stack) -> int:
    models = httpx.get(stack.url + "/v1/models", timeout=EVENTUALLY_S).json()["data"]
    return sum(m["hotq"]["queue_depth"] or 0 for m in models)


def test_bad_create_requests(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError) as raised:
        client.batches.create(input_file_id="x", endpoint="/v1/moderations", completion_window="24h")
    assert raised.value.body["param"] == "endpoint"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.cancel("batch_nope")


def _quick_then_held(model: str, prefix: str, quick: int, held: int, hold: Hold) -> list[dict[str, object]]:
    """`quick` lines the backend answers at once, then `held` lines it holds until `hold` is released."""
    body = {"model": model, "messages": [{"role": "user", "content": "a line"}]}
    return [_line(f"{prefix}{i}", body) for i in range(quick)] + [
        _line(f"{prefix}{i}", body | hold.field) for i in range(quick, quick + held)
    ]


def test_cancel(client: openai.OpenAI, batch_model: str, tmp_path: Path) -> None:
    hold = Hold(tmp_path / "release")
    quick, held = 20, 180
    input_id = _upload(client, _quick_then_held(batch_model, "c", quick, held, hold))
    batch = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
    try:
        assert _wait_for_completed(client, batch.id, quick) == quick  # the rest are held: it cannot finish
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = _wait(client, batch.id, ("cancelled",))
    finally:
        hold.release()  # the held lines in flight finish, too late to count; the queued ones are dropped
    assert done.cancelled_at and done.completed_at is None
    counts = done.request_counts
    assert counts is not None and counts.completed == quick
    outputs = _records(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in outputs) == sorted(f"c{i}" for i in range(quick))  # partial, no duplicates
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(_wait(client, _tiny_batch(client, batch_model), ("completed",)).id)


def test_expiry(tmp_path: Path, amqp_url: str, session_tag: str, delete_test_queues: list[str]) -> None:
    """A stack of its own, whose batches expire a window after they are created: its quick lines must be
    answered within the window (they take milliseconds here), and its held lines cannot be (they are
    released only after it)."""
    model = f"test-org/batch-expiry-{session_tag}"
    delete_test_queues.append(model)
    quick, held = 5, 95
    quick_ids = {f"x{i}" for i in range(quick)}

    def attempt(window_s: float) -> str | None:
        done, outputs, errors = _expire_a_batch(
            tmp_path / f"window-{window_s:g}", amqp_url, model, window_s, quick, held
        )
        assert done.expired_at and done.completed_at is None
        answered = [r["custom_id"] for r in outputs]
        assert len(answered) == len(set(answered)) and set(answered) <= quick_ids, answered  # no held line answered
        assert len(errors) == quick + held - len(answered)
        assert len({r["custom_id"] for r in outputs + errors}) == quick + held
        expired = [r for r in errors if r["error"] is not None]
        assert expired and all(r["response"] is None and r["error"]["code"] == "batch_expired" for r in expired)
        if len(answered) < quick:
            return f"{quick - len(answered)} quick lines were not answered"
        assert sorted(answered) == sorted(quick_ids)
        counts = done.request_counts
        assert counts is not None and (counts.completed, counts.failed) == (quick, held)
        return None

    in_growing_windows(attempt, first_s=3)


def _expire_a_batch(
    workdir: Path, amqp_url: str, model: str, window_s: float, quick: int, held: int
) -> tuple[Batch, list[dict[str, Any]], list[dict[str, Any]]]:
    """A batch of `quick` lines, then `held` ones the backend holds until the batch has expired; its
    state and its output and error records."""
    workdir.mkdir()
    hold = Hold(workdir / "release")
    with api_and_worker_on_a_fake_backend(workdir, amqp_url, model, MODEL_TABLE, batch_window_s=window_s) as stack:
        client = _client_of(stack)
        input_id = _upload(client, _quick_then_held(model, "x", quick, held, hold))
        batch = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h")
        assert batch.expires_at is not None and batch.expires_at - batch.created_at <= window_s
        try:
            done = _wait(client, batch.id, ("expired",), timeout=window_s + EVENTUALLY_S)
        finally:
            hold.release()
        return done, _records(client, done.output_file_id), _records(client, done.error_file_id)


def _tiny_batch(client: openai.OpenAI, model: str) -> str:
    input_id = _upload(client, [_line("t", {"model": model, "messages": [{"role": "user", "content": "t"}]})])
    return client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions", completion_window="24h").id


def _results_waiting(amqp_url: str, batch_id: str) -> int:
    """Answers waiting in the batch's results queue."""

    async def count() -> int:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(topology.results_queue_name(batch_id), passive=True)
            return queue.declaration_result.message_count or 0

    return asyncio.run(count())


def test_api_killed_mid_batch_loses_and_duplicates_nothing(
    client: openai.OpenAI, batch_stack: Stack, batch_model: str, amqp_url: str
) -> None:
    """Acceptance 3: SIGKILL the API (and so its collector) half-way through 5,000 lines; restart it."""
    lines: list[object] = [
        _line(f"k{i}", {"model": batch_model, "messages": [{"role": "user", "content": f"n {i}"}], "fake_delay_ms": 5})
        for i in range(5000)
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines), endpoint="/v1/chat/completions", completion_window="24h"
    )
    completed = _wait_for_completed(client, batch.id, 1000)
    assert batch_stack.api is not None
    batch_stack.api.kill()
    batch_stack.api.wait()
    assert completed < 5000, "the batch finished before the API was killed"
    # Answers keep arriving in the batch's durable results queue while no API collects them.
    wait_until(lambda: _results_waiting(amqp_url, batch.id) > 0, EVENTUALLY_S, "answers queued while the API is down")
    batch_stack.start_api()
    done = _wait(client, batch.id, ("completed",))
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (5000, 0)
    outputs = _records(client, done.output_file_id)
    assert len(outputs) == 5000
    assert sorted(r["custom_id"] for r in outputs) == sorted(f"k{i}" for i in range(5000))
    assert done.error_file_id is None


def test_batch_create_body_over_the_limit_is_413(batch_stack: Stack) -> None:
    """Batch creation reads its body through the same size limit as every other route."""
    huge = {"input_file_id": "file-x", "endpoint": "/v1/chat/completions", "metadata": {"pad": "x" * (11 << 20)}}
    response = httpx.post(batch_stack.url + "/v1/batches", json=huge, timeout=EVENTUALLY_S)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"

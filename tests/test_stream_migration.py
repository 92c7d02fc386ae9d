"""Issue 12: a stream whose consumer dies or drains continues on another one, and the client never notices.

Each stream here is held by the fake backend after its first content token (`fake_pause_file`),
and so is every continuation of it, until the test releases it: a consumer is killed or drained
while it holds the stream, whatever the machine's speed, and each continuation shows itself with
exactly one token before the test goes on.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from broker import topology
from broker.messages import Lane
from ops.processes import Child, wait_until
from ops.testing.deadlines import EVENTUALLY_S, STOP_S
from ops.testing.fake_backend import (
    FAKE_BACKEND_COMMAND,
    Hold,
    expected_chat_tokens,
    expected_completion_tokens,
    fake_stats,
)
from ops.testing.stack import Stack, log_events, ready_messages, run_hotq, wait_for_event, write_config
from tests import rabbitmq_roles

TEXT = "streams survive the agent that started them and the client never notices"


@pytest.fixture
def stack(
    tmp_path: Path, amqp_url: str, fake_model: str, fake_backend_url: str, delete_test_queues: list[str]
) -> Iterator[Stack]:
    """An API with no worker yet: each test places its workers itself."""
    delete_test_queues.append(fake_model)
    table = {"backend_url": fake_backend_url, "max_inflight": 4, "drain_grace_s": 600}
    config = write_config(tmp_path / "hotq.toml", amqp_url, {fake_model: table}, stream_flush_ms=0, max_migrations=2)
    stack = Stack(config, tmp_path)
    stack.start_api()
    yield stack
    stack.close()


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=EVENTUALLY_S)


class Reader:
    """Reads a stream's chunks on demand: `until(n)` returns once `n` content pieces came."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.request_id = stream.response.headers.get("x-request-id")
        self._chunks = iter(stream)
        self.chunks: list[Any] = []

    def pieces(self) -> list[str]:
        return [_piece(chunk) for chunk in self.chunks if _piece(chunk)]

    def until(self, count: int) -> None:
        while len(self.pieces()) < count:
            self.chunks.append(next(self._chunks))

    def rest(self) -> None:
        self.chunks.extend(self._chunks)

    def close(self) -> None:
        self._stream.close()


def _piece(chunk: Any) -> str:
    if not chunk.choices:
        return ""
    choice = chunk.choices[0]
    return (choice.delta.content if hasattr(choice, "delta") else choice.text) or ""


def _start(stack: Stack, model: str, pause: Path, endpoint: str = "chat", options: Any = None, **extra: Any) -> Reader:
    body = {"fake_pause_file": str(pause), **extra}
    options = options or {"include_usage": True}
    client = _client(stack)
    if endpoint == "chat":
        messages: Any = [{"role": "user", "content": TEXT}]
        stream: Any = client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options=options, extra_body=body
        )
    else:
        stream = client.completions.create(
            model=model, prompt=TEXT, max_tokens=50, stream=True, stream_options=options, extra_body=body
        )
    return Reader(stream)


def _resumed_by(stack: Stack, count: int) -> Child:
    """The worker that logged the `count`-th `stream_resumed` of the test (once one has)."""
    holders: list[Child] = []

    def found() -> bool:
        holders[:] = [w for w in stack.workers for e in log_events(w.log_path) if e.get("event") == "stream_resumed"]
        return len(holders) >= count

    wait_until(found, EVENTUALLY_S, f"{count} streams resumed")
    return holders[count - 1]


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_killed_worker_mid_stream_the_stream_goes_on_elsewhere(
    stack: Stack, fake_model: str, tmp_path: Path, endpoint: str
) -> None:
    """Acceptance 1 (fake backend): the client's text equals the uninterrupted answer, one
    finish_reason, one role, one stream id, usage counting the prompt once and every token."""
    first = stack.start_worker(fake_model)
    pause = tmp_path / "go"
    reader = _start(stack, fake_model, pause, endpoint)
    reader.until(1)
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    reader.until(2)  # the continuation's first token
    pause.touch()
    reader.rest()
    if endpoint == "chat":
        tokens, finish = expected_chat_tokens(TEXT, None)
    else:
        tokens, finish = expected_completion_tokens(TEXT, 50)
    assert "".join(reader.pieces()) == "".join(tokens)
    finishes = [c.choices[0].finish_reason for c in reader.chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finish]
    assert len({chunk.id for chunk in reader.chunks}) == 1 and len({chunk.created for chunk in reader.chunks}) == 1
    if endpoint == "chat":
        assert sum(1 for c in reader.chunks if c.choices and c.choices[0].delta.role) == 1
    usage = reader.chunks[-1].usage
    assert usage is not None and sum(1 for chunk in reader.chunks if chunk.usage) == 1
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(TEXT.split()), len(tokens))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert wait_for_event(_resumed_by(stack, 1), "stream_resumed")["tokens"] == 1


def test_two_kills_are_survived_and_a_third_ends_with_an_error(stack: Stack, fake_model: str, tmp_path: Path) -> None:
    """Acceptance 2: max_migrations = 2."""
    holder = stack.start_worker(fake_model)
    pause = tmp_path / "go"
    reader = _start(stack, fake_model, pause)
    for migration in (1, 2):
        reader.until(migration)
        stack.start_worker(fake_model)
        holder.send_signal(signal.SIGKILL)
        reader.until(migration + 1)
        holder = _resumed_by(stack, migration)
    stack.start_worker(fake_model)
    holder.send_signal(signal.SIGKILL)
    with pytest.raises(openai.APIError) as caught:
        reader.rest()
    assert "max_migrations" in caught.value.message
    tokens, _ = expected_chat_tokens(TEXT, None)
    assert "".join(reader.pieces()) == "".join(tokens[:3])  # nothing repeated, nothing lost
    metrics = httpx.get(stack.url + "/metrics", timeout=EVENTUALLY_S).text
    assert f'hotq_stream_migrations_total{{model="{fake_model}",outcome="resumed"}} 2.0' in metrics
    assert f'hotq_stream_migrations_total{{model="{fake_model}",outcome="refused"}} 1.0' in metrics
    assert f'hotq_stream_resume_gap_seconds_count{{model="{fake_model}"}} 2.0' in metrics
    moved = httpx.get(stack.url + "/ops/data", timeout=EVENTUALLY_S).json()["migrations"][fake_model]
    assert (moved["resumed"], moved["finished"], moved["refused"]) == (2, 0, 1) and moved["mean_gap_s"] > 0


def test_draining_agent_hands_its_stream_over_and_leaves_at_once(
    tmp_path: Path, amqp_url: str, fake_model: str, delete_test_queues: list[str]
) -> None:
    """Acceptance 3: an agent told to stop (SIGTERM) with a stream in flight leaves without waiting
    for it (drain_grace_s = 1); the stream completes on another agent."""
    model = f"{fake_model}-drain"
    delete_test_queues.append(model)
    table = {"command": FAKE_BACKEND_COMMAND, "max_inflight": 4, "reserved_interactive": 1, "drain_grace_s": 1}
    stack = Stack(write_config(tmp_path / "hotq.toml", amqp_url, {model: table}, stream_flush_ms=0), tmp_path)
    try:
        stack.start_api()
        first = stack.start_agent(model)
        wait_for_event(first, "worker_started")
        pause = tmp_path / "go"
        reader = _start(stack, model, pause)
        reader.until(1)
        second = stack.start_agent(model)
        wait_for_event(second, "worker_started")
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=STOP_S) == 0  # the stream is still held: only a handover lets it leave
        assert wait_for_event(first, "agent_exit")["exit_reason"] == "signal"
        reader.until(2)
        pause.touch()
        reader.rest()
        tokens, _ = expected_chat_tokens(TEXT, None)
        assert "".join(reader.pieces()) == "".join(tokens)
    finally:
        stack.close()


def test_worker_sigterm_hands_streams_and_requests_over_without_waiting(
    stack: Stack, fake_model: str, fake_backend_url: str, tmp_path: Path
) -> None:
    """`hotq worker` on SIGTERM (drain_grace_s 600 here) hands over a stream and a non-streaming
    request at once; each completes once on another worker (acceptance 3 and 6)."""
    first = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    hold = Hold(tmp_path / "release")
    answers: list[str] = []
    call = threading.Thread(
        target=lambda: answers.append(
            _client(stack)
            .chat.completions.create(
                model=fake_model, messages=[{"role": "user", "content": "once"}], extra_body=hold.field
            )
            .choices[0]
            .message.content
            or ""
        )
    )
    call.start()
    pause = tmp_path / "go"
    reader = _start(stack, fake_model, pause)
    reader.until(1)
    wait_until(lambda: fake_stats(fake_backend_url)["active"] == 2, EVENTUALLY_S, "both in the backend")
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=STOP_S) == 0
    hold.release()
    reader.until(2)
    pause.touch()
    reader.rest()
    call.join(timeout=EVENTUALLY_S)
    assert answers == ["echo: ecno"]
    assert "".join(reader.pieces()) == "".join(expected_chat_tokens(TEXT, None)[0])


def test_client_leaving_while_the_stream_waits_for_a_consumer_cancels_it(
    stack: Stack, fake_model: str, fake_backend_url: str, tmp_path: Path, amqp_url: str
) -> None:
    """Acceptance 4: the client leaves while its stream's request waits in the queue after its
    consumer died; the consumer that takes it stops at once, and the backend is never called again."""
    first = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    reader = _start(stack, fake_model, tmp_path / "go")
    reader.until(1)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=STOP_S)
    reader.close()
    wait_for_event(stack.api, "request_done")  # type: ignore[arg-type]
    queue = topology.request_queue_name(fake_model, Lane.INTERACTIVE)
    wait_until(lambda: ready_messages(amqp_url, queue) == 1, EVENTUALLY_S, "the request back in its queue")
    stack.start_worker(fake_model)
    wait_until(lambda: ready_messages(amqp_url, queue) == 0, EVENTUALLY_S, "the request taken")
    # The second worker asked, was told to stop, and settled it: the backend saw one call only.
    second = stack.workers[-1]
    wait_until(lambda: second.poll() is None and fake_stats(fake_backend_url)["active"] == 0, EVENTUALLY_S, "idle")
    assert fake_stats(fake_backend_url)["started"] == 1
    assert not [e for e in log_events(second.log_path) if e.get("event") == "stream_resumed"]


def test_client_leaving_a_continued_stream_cancels_the_continuation(
    stack: Stack, fake_model: str, fake_backend_url: str, tmp_path: Path
) -> None:
    """Acceptance 4: the client leaves a stream that moved: the continuation is cancelled in the
    backend, and what the backend made (the tokens sent before the move too) is charged."""
    first = stack.start_worker(fake_model)
    httpx.post(fake_backend_url + "/_reset", timeout=EVENTUALLY_S)
    reader = _start(stack, fake_model, tmp_path / "go", fake_tag="leave-moved")
    reader.until(1)
    second = stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    reader.until(2)
    reader.close()
    wait_until(
        lambda: "leave-moved" in fake_stats(fake_backend_url)["cancelled_tags"], EVENTUALLY_S, "continuation cut"
    )
    wait_for_event(second, "request_cancelled_by_client")
    # Recorded as one request cancelled, with the tokens the client got from both consumers.
    rows: list[dict[str, Any]] = []

    def recorded() -> bool:
        done = run_hotq(stack.config, "usage", "--model", fake_model, "--json")
        rows[:] = json.loads(done.stdout)["data"] if done.returncode == 0 else []
        return bool(rows)

    wait_until(recorded, EVENTUALLY_S, "the continuation's usage recorded")
    assert [(row["requests"], row["cancelled"]) for row in rows] == [(1, 1)]
    assert (rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (len(TEXT.split()), 2)


@pytest.mark.parametrize(
    "extra",
    [{"n": 2}, {"logprobs": True}, {"response_format": {"type": "json_object"}}],
    ids=["n2", "logprobs", "json"],
)
def test_streams_that_cannot_be_continued_end_with_an_error_event(
    stack: Stack, fake_model: str, tmp_path: Path, extra: dict[str, Any]
) -> None:
    """Acceptance 5: as before migration existed."""
    first = stack.start_worker(fake_model)
    pause = tmp_path / "go"
    reader = _start(stack, fake_model, pause, **extra)
    reader.until(1)
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    pause.touch()  # a redelivery served from the start would run to its end: the API must refuse it
    with pytest.raises(openai.APIError) as caught:
        reader.rest()
    assert "lost" in caught.value.message


@pytest.mark.parametrize("running_usage", [False, True], ids=["include_usage", "continuous_usage_stats"])
def test_a_stream_whose_finish_went_out_gets_its_usage_chunk_from_the_api(
    stack: Stack, fake_model: str, tmp_path: Path, running_usage: bool
) -> None:
    """Point 3 of the i12 follow-up: the consumer dies after the finish_reason went out and
    before the usage chunk did; the API ends the stream itself with the usage the client asked for:
    the completion tokens it got, the prompt from its running usage if it had one, else estimated."""
    first = stack.start_worker(fake_model)
    pause = tmp_path / "go"
    options: Any = {"include_usage": True, **({"continuous_usage_stats": True} if running_usage else {})}
    # One token: it carries the finish_reason, and the backend pauses right after it.
    reader = _start(stack, fake_model, pause, options=options, max_tokens=1)
    reader.until(1)
    assert reader.chunks[-1].choices[0].finish_reason == "length"
    stack.start_worker(fake_model)
    first.send_signal(signal.SIGKILL)
    reader.rest()  # ends without an error event
    tokens, _ = expected_chat_tokens(TEXT, 1)
    assert "".join(reader.pieces()) == "".join(tokens)
    usage_chunks = [chunk for chunk in reader.chunks if not chunk.choices and chunk.usage]
    assert len(usage_chunks) == 1 and reader.chunks[-1] is usage_chunks[0]
    usage = usage_chunks[0].usage
    prompt = len(TEXT.split()) if running_usage else -(-len(TEXT) // 4)  # the backend's count, or the estimate
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 1, prompt + 1)
    assert usage_chunks[0].id == reader.chunks[0].id and usage_chunks[0].created == reader.chunks[0].created
    metrics = httpx.get(stack.url + "/metrics", timeout=EVENTUALLY_S).text
    assert f'hotq_stream_migrations_total{{model="{fake_model}",outcome="finished"}} 1.0' in metrics


def test_a_stream_whose_api_reconnected_is_not_waited_for(
    stack: Stack, fake_model: str, tmp_path: Path, amqp_url: str
) -> None:
    """Every connection of the vhost is force-closed under a stream: its API answers the client with an
    error and reads a reply queue of a new name from then on, and the stream's request comes back to
    the worker. Nobody reads the old queue, so the worker must not ask there how far the stream got
    (no answer would come for 30 s, a backend slot held meanwhile): it drops the request as its caller
    gone, and serves new work at once."""
    worker = stack.start_worker(fake_model)
    pause = tmp_path / "go"
    reader = _start(stack, fake_model, pause)
    reader.until(1)
    request_id = reader.request_id
    rabbitmq_roles.close_connections(amqp_url, "hotq test: an API reconnects under its stream")
    with contextlib.suppress(openai.APIError, httpx.HTTPError):
        reader.rest()  # the API ends it (an error event): its connection to the worker's answers went

    def dropped_as_caller_gone() -> bool:
        return any(
            e.get("event") == "caller_gone" and e.get("request_id") == request_id for e in log_events(worker.log_path)
        )

    wait_until(dropped_as_caller_gone, EVENTUALLY_S, f"the worker dropping {request_id} as its caller gone", worker)
    waited = [e for e in log_events(worker.log_path) if e.get("event") == "resume_unanswered"]
    assert not waited, waited  # it dropped the request at once, without asking the unread queue first
    pause.touch()
    answer = _client(stack).chat.completions.create(model=fake_model, messages=[{"role": "user", "content": TEXT}])
    assert answer.choices[0].message.content == "".join(expected_chat_tokens(TEXT, None)[0])

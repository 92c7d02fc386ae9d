"""Issue 6, usage accounting (acceptance 5): every request's tokens, as the backend counted them,
recorded per user, model, lane and day, a stream cancelled by its client included.

The stack runs in a vhost of its own: usage reports go to one queue per vhost, and an API of
another test module must not record this module's reports in its own job store.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from broker.jobstore import JobStore, Result, since_day
from broker.messages import UsageRow
from broker.openai_objects import batch_object
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import fake_stats
from ops.testing.stack import Stack, api_and_worker_on_a_fake_backend, create_key, run_hotq
from tests import rabbitmq_roles

ADMIN = "ops-admin"


@pytest.fixture(scope="module")
def vhost_url(amqp_url: str, session_tag: str) -> Iterator[str]:
    vhost = f"hotq-test-usage-{session_tag}"
    user = urllib.parse.urlsplit(amqp_url).username or "guest"
    rabbitmq_roles.rabbitmqctl("add_vhost", vhost)
    rabbitmq_roles.rabbitmqctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    try:
        yield urllib.parse.urlsplit(amqp_url)._replace(path="/" + urllib.parse.quote(vhost, safe="")).geturl()
    finally:
        rabbitmq_roles.rabbitmqctl("delete_vhost", vhost)


@pytest.fixture(scope="module")
def model(session_tag: str) -> str:
    return f"test-org/usage-{session_tag}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, vhost_url: str, model: str) -> Iterator[Stack]:
    auth = {"modes": ["api_key"], "admins": [ADMIN]}
    workdir = tmp_path_factory.mktemp("usage")
    with api_and_worker_on_a_fake_backend(
        workdir, vhost_url, model, {}, max_queue_wait_s=30, stream_flush_ms=20, auth=auth
    ) as stack:
        yield stack


_keys: dict[str, str] = {}


def _key(stack: Stack, user: str) -> str:
    if user not in _keys:
        _keys[user] = create_key(stack.config, user)
    return _keys[user]


def _client(stack: Stack, user: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=_key(stack, user), max_retries=0, timeout=EVENTUALLY_S)


def _usage(stack: Stack, **params: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {_key(stack, ADMIN)}"}
    return httpx.get(stack.url + "/v1/usage", params=params, headers=headers, timeout=EVENTUALLY_S)


def _rows_when(stack: Stack, ready: Callable[[list[dict[str, Any]]], bool], **params: str) -> list[dict[str, Any]]:
    """The usage rows once `ready` says they are complete (reports arrive about once a second)."""
    rows: list[dict[str, Any]] = []

    def complete() -> bool:
        answer = _usage(stack, **params)
        assert answer.status_code == 200, answer.text
        rows[:] = answer.json()["data"]
        return ready(rows)

    wait_until(complete, EVENTUALLY_S, f"usage rows for {params}", poll_s=0.2)
    return rows


def _words(count: int) -> str:
    return " ".join(f"w{n}" for n in range(count))


def test_a_stream_cancelled_mid_way_is_recorded_with_the_backend_s_counts(stack: Stack, model: str) -> None:
    backend = str(stack.backend_url)
    alice = _client(stack, "alice")
    prompt_words = 40  # the fake backend answers a token per word, and counts a prompt token per word
    stream = alice.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": _words(prompt_words)}],
        stream=True,
        extra_body={"fake_delay_ms": 50, "fake_tag": "usage-walk-away"},
    )
    received = 0
    for chunk in stream:
        assert chunk.usage is None  # alice did not ask for usage: the consumer's running usage stays out
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 5:
            break
    stream.close()  # alice leaves mid-way

    wait_until(
        lambda: "usage-walk-away" in fake_stats(backend)["cancelled_after_tokens"],
        EVENTUALLY_S,
        "the backend seeing the stream cancelled",
    )
    generated = fake_stats(backend)["cancelled_after_tokens"]["usage-walk-away"]
    assert generated < prompt_words + 1  # cut short, not run to its end

    (row,) = _rows_when(stack, lambda rows: bool(rows), user="alice")
    assert (row["model"], row["lane"], row["requests"], row["cancelled"]) == (model, "interactive", 1, 1)
    assert row["prompt_tokens"] == prompt_words  # the backend's count of the prompt
    # The backend's own running count when the consumer cut the call: the tokens the backend had
    # written, give or take the one on the wire as the cancel came.
    assert received <= row["completion_tokens"] and abs(row["completion_tokens"] - generated) <= 1
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
    assert row["day"] == since_day("1d")  # today (UTC)


def test_every_kind_of_request_counts_against_its_user(stack: Stack, model: str) -> None:
    bob = _client(stack, "bob")
    answer = bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "one two three"}])
    expected = {"prompt_tokens": answer.usage.prompt_tokens, "completion_tokens": answer.usage.completion_tokens}  # type: ignore[union-attr]
    streamed = list(
        bob.completions.create(model=model, prompt="four five", max_tokens=2, stream=True)  # no include_usage
    )
    assert all(chunk.usage is None for chunk in streamed) and all(chunk.choices for chunk in streamed)
    expected["prompt_tokens"] += 2
    expected["completion_tokens"] += 2
    with pytest.raises(openai.InternalServerError):  # the backend's error: still a request it handled
        bob.chat.completions.create(model=model, messages=[{"role": "user", "content": "FAIL 500"}])
    with pytest.raises(openai.BadRequestError):  # refused by the API: never reached a backend
        bob.chat.completions.create(model=model, messages=[{"role": "nobody", "content": "x"}])  # type: ignore[misc, list-item]

    (row,) = _rows_when(stack, lambda rows: bool(rows) and rows[0]["requests"] >= 3, user="bob", model=model)
    assert (row["requests"], row["cancelled"]) == (3, 0)
    assert {key: row[key] for key in expected} == expected

    # Bulk work counts against whoever submitted it, on the batch lane.
    body = {"method": "POST", "url": "/v1/completions"}
    lines = [
        json.dumps(body | {"custom_id": str(n), "body": {"prompt": _words(n + 1), "max_tokens": 8}}) for n in range(3)
    ]
    requests = stack.workdir / "carol.jsonl"
    requests.write_text("\n".join(lines) + "\n")
    out = stack.workdir / "carol-out.jsonl"
    done = run_hotq(stack.config, "submit", str(requests), "--model", model, "--out", str(out), "--user", "carol")
    assert done.returncode == 0, done.stderr
    usages = [json.loads(line)["response"]["body"]["usage"] for line in out.read_text().splitlines()]
    (row,) = _rows_when(stack, lambda rows: bool(rows) and rows[0]["requests"] >= 3, user="carol")
    assert (row["lane"], row["requests"], row["cancelled"]) == ("batch", 3, 0)
    assert row["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages) == 1 + 2 + 3
    assert row["completion_tokens"] == sum(u["completion_tokens"] for u in usages)

    # The operator's view: the same rows from the CLI, as JSON and as a table.
    listed = run_hotq(stack.config, "usage", "--user", "carol", "--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["data"] == [row]
    table = run_hotq(stack.config, "usage", "--since", "7d")
    assert table.returncode == 0, table.stderr
    for user in ("alice", "bob", "carol"):
        assert user in table.stdout
    assert f"{row['completion_tokens']:,}" in table.stdout and "total" in table.stdout


def test_usage_is_for_admins_only(stack: Stack, model: str) -> None:
    denied = httpx.get(
        stack.url + "/v1/usage", headers={"Authorization": f"Bearer {_key(stack, 'bob')}"}, timeout=EVENTUALLY_S
    )
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert httpx.get(stack.url + "/v1/usage", timeout=EVENTUALLY_S).status_code == 401
    bad = _usage(stack, since="last tuesday")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"
    assert _usage(stack, since="2999-01-01").json() == {"object": "list", "data": []}
    assert _usage(stack, model="no-such-model").json()["data"] == []


def test_a_report_is_recorded_once(tmp_path: Path) -> None:
    """A report delivered again (an API that died before its ack) is not added twice."""
    store = JobStore(tmp_path)
    rows = [UsageRow("2026-01-02", "dan", "m", "interactive", 2, 1, 30, 40)]
    assert store.usage.record("report-1", rows)
    assert not store.usage.record("report-1", rows)
    assert store.usage.record("report-2", [UsageRow("2026-01-02", "dan", "m", "interactive", 1, 0, 5, 6)])
    (row,) = store.usage.totals(user="dan")
    assert (row["requests"], row["cancelled"], row["prompt_tokens"], row["completion_tokens"]) == (3, 1, 35, 46)
    assert store.usage.totals(since="2026-01-03") == []


def test_since_takes_a_day_or_a_number_of_days() -> None:
    import datetime

    today = datetime.date(2026, 3, 10)
    assert since_day("1d", today) == "2026-03-10"
    assert since_day("7d", today) == "2026-03-04"
    assert since_day("2026-02-01", today) == "2026-02-01"
    for bad in ("0d", "yesterday", "2026-13-01", "-3d", "100000000d"):
        with pytest.raises(ValueError):
            since_day(bad, today)


def test_a_batch_counts_each_line_s_tokens_once(tmp_path: Path) -> None:
    """A redelivered answer (the same custom_id again) adds neither a result nor its tokens."""
    store = JobStore(tmp_path)
    lines = [(1, "a", b"{}"), (2, "b", b"{}")]
    store.batches.create(
        batch_id="b1", endpoint="/v1/completions", model="m", input_file_id="f", window_s=60, metadata=None,
        source="api", owner="dan", lines=lines,
    )  # fmt: skip
    assert store.results.record("b1", [Result("a", 1, True, "{}", 3, 4), Result("a", 1, True, "{}", 9, 9)]) == (1, 0)
    assert store.results.record("b1", [Result("a", 1, True, "{}", 9, 9), Result("b", 2, False, "{}")]) == (0, 1)
    batch = store.batches.get("b1", owner="dan")
    assert batch is not None and (batch.completed, batch.failed) == (1, 1)
    usage = batch_object(batch)["usage"]
    assert usage["input_tokens"] == 3 and usage["output_tokens"] == 4 and usage["total_tokens"] == 7
    assert store.batches.get("b1", owner="eve") is None  # someone else's

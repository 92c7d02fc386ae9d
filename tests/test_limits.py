"""Issue 6, per-user limits and fair share (acceptance 3 and 4), through a real `hotq serve` process.

Users are API keys made with `hotq keys create`; each model carries its own `limits = {...}`, so
every test runs against the one limit it is about. The fake backend sleeps `fake_delay_ms` before
answering, and the fair-share model's worker takes at most two requests at once (max_inflight = 2).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from api.limits import Limiter
from broker import messages
from broker.config import parse_config
from broker.errors import RateLimited
from broker.messages import Abandoned, Final
from ops.testing.fake_backend import running_fake_backend
from ops.testing.stack import Stack
from producers.request_client import RequestClient

ROOT = Path(__file__).resolve().parent.parent
DELAY_MS = 300  # the fake backend's time per request in the fair-share tests


@pytest.fixture(scope="module")
def models(session_tag: str, delete_test_queues: list[str]) -> dict[str, str]:
    names = {kind: f"test-org/limits-{kind}-{session_tag}" for kind in ("rpm", "tpm", "fair", "open")}
    delete_test_queues.extend(names.values())
    return names


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, models: dict[str, str]) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("limits")
    limits = {
        "rpm": "{ requests_per_minute = 3 }",
        "tpm": "{ tokens_per_minute = 5 }",
        "fair": "{ max_concurrent_per_user = 1 }",
        "open": "{}",  # replaces the top-level [limits]: unlimited
    }
    with running_fake_backend(list(models.values())) as backend:
        lines = [f'amqp_url = "{amqp_url}"', f'data_dir = "{workdir / "data"}"', "max_queue_wait_s = 30"]
        lines += ["[auth]", 'modes = ["api_key"]', "[limits]", "requests_per_minute = 1"]  # overridden per model
        for kind, name in models.items():
            lines += [f'[models."{name}"]', f'backend_url = "{backend}"', f"limits = {limits[kind]}"]
            if kind in ("fair", "open"):
                lines.append("max_inflight = 2")
        config = workdir / "hotq.toml"
        config.write_text("\n".join(lines) + "\n")
        stack = Stack(config, workdir)
        try:
            stack.start_api()
            for name in models.values():
                stack.start_worker(name)
            yield stack
        finally:
            stack.close()


def _client(stack: Stack, user: str) -> openai.OpenAI:
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "keys", "create", "--user", user, "--config", str(stack.config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip().splitlines()[-1]
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _chat(client: openai.OpenAI, model: str, text: str = "hi", delay_ms: int = 0) -> str:
    extra = {"fake_delay_ms": delay_ms} if delay_ms else None
    answer = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], extra_body=extra)
    return answer.choices[0].message.content or ""


def _retry_after(error: openai.RateLimitError) -> int:
    assert error.status_code == 429
    assert error.code == "rate_limit_exceeded" and error.type == "rate_limit_error"
    return int(error.response.headers["retry-after"])


def test_requests_per_minute(stack: Stack, models: dict[str, str]) -> None:
    alice, bob = _client(stack, "alice-rpm"), _client(stack, "bob-rpm")
    for _ in range(3):
        assert _chat(alice, models["rpm"])  # under the limit: served
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(alice, models["rpm"])
    assert 1 <= _retry_after(caught.value) <= 20  # one request refills in 60 / 3 s
    assert _chat(bob, models["rpm"])  # limits are per user
    assert _chat(alice, models["open"])  # and per model


def test_tokens_per_minute(stack: Stack, models: dict[str, str]) -> None:
    carol = _client(stack, "carol-tpm")
    assert _chat(carol, models["tpm"], "one two three four five six")  # admitted; its usage exceeds 5 tokens
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(carol, models["tpm"])
    assert _retry_after(caught.value) >= 1
    # A stream is charged too, from the usage in its Final frame, also one that did not ask for
    # include_usage: the consumer always asks the backend for usage.
    dave = _client(stack, "dave-tpm")
    stream = dave.chat.completions.create(
        model=models["tpm"], messages=[{"role": "user", "content": "one two three four five six"}], stream=True
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) and all(c.choices for c in chunks)
    with pytest.raises(openai.RateLimitError):
        _chat(dave, models["tpm"])


def test_a_stream_left_mid_way_is_charged_what_was_generated(stack: Stack, models: dict[str, str]) -> None:
    """Leaving a stream early does not dodge tokens_per_minute: the consumer reports the backend's
    count at the cut (6 prompt tokens and the answer's first ones, over the limit of 5)."""
    frank = _client(stack, "frank-tpm")
    stream = frank.chat.completions.create(
        model=models["tpm"],
        messages=[{"role": "user", "content": "one two three four five six"}],
        stream=True,
        extra_body={"fake_delay_ms": 200},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break  # the first token is enough
    stream.close()
    time.sleep(1.5)  # the cancel reaches the consumer, its report of the cut comes back
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(frank, models["tpm"])
    assert _retry_after(caught.value) >= 1


def test_concurrent_requests(stack: Stack, models: dict[str, str]) -> None:
    erin = _client(stack, "erin-conc")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_chat, erin, models["fair"], "slow", 1500)
        time.sleep(0.5)  # the slow one is in flight
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as caught:
            _chat(erin, models["fair"])
        assert time.monotonic() - started < 0.5  # refused at once, not queued
        assert _retry_after(caught.value) == 1
        assert slow.result()
    assert _chat(erin, models["fair"])  # counted out when it finished


def _flood(client: openai.OpenAI, model: str, stop: threading.Event, served: list[int], refused: list[int]) -> None:
    """A user who ignores Retry-After: resend as soon as an answer or a 429 comes back."""
    while not stop.is_set():
        try:
            _chat(client, model, "flood", DELAY_MS)
            served.append(1)
        except openai.RateLimitError:
            refused.append(1)
            time.sleep(0.05)


def _latencies(client: openai.OpenAI, model: str, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.monotonic()
        assert _chat(client, model, "mine", DELAY_MS)
        latencies.append(time.monotonic() - started)
    return latencies


def test_fair_share(stack: Stack, models: dict[str, str]) -> None:
    """40 flooding threads of one user; another user's requests still take about one backend delay."""
    flooder, patient = _client(stack, "frank-flood"), _client(stack, "grace-patient")
    single = statistics.median(_latencies(patient, models["fair"], 3))
    assert single < 3 * DELAY_MS / 1000
    stop, served, refused = threading.Event(), [], []
    threads = [
        threading.Thread(target=_flood, args=(flooder, models["fair"], stop, served, refused)) for _ in range(40)
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)  # the flood is on
        latencies = _latencies(patient, models["fair"], 8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert served and len(refused) > len(served)  # the flood ran, mostly refused with 429
    shown = [round(x, 3) for x in latencies]
    print(f"fair share: single {single:.3f} s, under flood {shown}, served {len(served)}, refused {len(refused)}")
    assert max(latencies) <= 3 * single, (single, latencies)


def test_without_fair_share_a_flood_starves_others(stack: Stack, models: dict[str, str]) -> None:
    """The control: the same worker shape without limits; one request waits behind the whole flood."""
    flooder, patient = _client(stack, "heidi-flood"), _client(stack, "ivan-patient")
    single = statistics.median(_latencies(patient, models["open"], 3))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        flood = [pool.submit(_chat, flooder, models["open"], "flood", DELAY_MS) for _ in range(20)]
        time.sleep(0.5)  # all 20 queued ahead
        waited = _latencies(patient, models["open"], 1)[0]
        assert all(f.result() for f in flood)
    print(f"no limits: single {single:.3f} s, waited {waited:.3f} s")
    assert waited > 3 * single, (single, waited)  # 20 requests / 2 slots × 0.3 s ahead of it


def test_limiter_refills_and_counts_out_once() -> None:
    """The in-memory counters alone, on a fake clock: refill rates, Retry-After, idempotent release."""
    now = [0.0]
    config = parse_config(
        '[limits]\nrequests_per_minute = 2\ntokens_per_minute = 60\nmax_concurrent_per_user = 1\n[models."m"]\n'
        '[models."free"]\nlimits = {}\n'
    )
    limiter = Limiter(config, clock=lambda: now[0])
    assert limiter.admit("u", "free") is None  # no limits: nothing counted
    release = limiter.admit("u", "m")
    assert release is not None
    with pytest.raises(RateLimited, match="in flight"):
        limiter.admit("u", "m")
    release({"prompt_tokens": 50, "completion_tokens": 30})  # 80 tokens: the bucket is 20 in debt
    release({"prompt_tokens": 50, "completion_tokens": 30})  # a second call changes nothing
    with pytest.raises(RateLimited, match="tokens per minute") as caught:
        limiter.admit("u", "m")
    assert caught.value.retry_after_s == 21  # 20 tokens of debt + 1, at one token a second
    now[0] = 21.0
    limiter.admit("u", "m")(None)  # the tokens refilled; the second request of the minute
    with pytest.raises(RateLimited, match="requests per minute") as caught:
        limiter.admit("u", "m")
    assert caught.value.retry_after_s == 9  # 21 s refilled 0.7 of a request; 0.3 more takes 9 s
    assert limiter.admit("v", "m") is not None  # another user has their own counters


class _Delivery:
    def __init__(self, frame: Final | Abandoned) -> None:
        self.body = messages.encode(frame)
        self.correlation_id = frame.request_id


async def test_the_usage_of_an_abandoned_request_reaches_its_charge_whichever_frame_brings_it() -> None:
    """The answer may already be queued when the client leaves, arrive just after, or never come
    (the consumer cut it and reports `Abandoned`): each brings the backend's count to the charge."""
    client = RequestClient(None, [])  # type: ignore[arg-type]  # no broker needed: frames are handed in
    charged: dict[str, dict[str, int] | None] = {}
    usage = {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}

    queued: asyncio.Queue[object] = asyncio.Queue()  # the answer came before the client left
    client._pending["queued"] = queued  # type: ignore[assignment]
    queued.put_nowait(Final("queued", "a", 0, 200, b"{}", usage))
    client.abandon("queued", lambda late: charged.setdefault("queued", late))
    for request_id, frame in (("late", Final("late", "a", 3, 200, b"", usage)), ("cut", Abandoned("cut", usage))):
        client.abandon(request_id, lambda late, request_id=request_id: charged.setdefault(request_id, late))
        await client._on_reply(_Delivery(frame))  # type: ignore[arg-type]
    assert charged == {"queued": usage, "late": usage, "cut": usage}
    await client._on_reply(_Delivery(Abandoned("cut", usage)))  # a repeat is not charged twice
    assert len(charged) == 3 and not client._on_abandoned

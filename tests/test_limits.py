"""Issue 6, per-user limits and fair share (acceptance 3 and 4), through a real `hotq serve` process.

Users are API keys made with `hotq keys create`; each model carries its own `limits = {...}`, so
every test runs against the one limit it is about. The fake backend sleeps `fake_delay_ms` before
answering, and the fair-share model's worker takes at most two requests at once (max_inflight = 2).
Fair share is measured by queue position, not by time: how many requests the backend started
between another user's request being sent and it starting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import openai
import pytest
from aio_pika.abc import AbstractIncomingMessage

from api.limits import Limiter
from broker import messages, topology
from broker.config import parse_config
from broker.errors import RateLimited
from broker.jobstore import JobStore
from broker.messages import Abandoned, Final, Lane
from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S
from ops.testing.fake_backend import Hold, fake_stats, running_fake_backend
from ops.testing.stack import Stack, api_and_workers, create_key, ready_messages
from producers.request_client import RequestClient

DELAY_MS = 300  # the fake backend's time per request in the fair-share tests
FLOODERS = 10  # threads of one user resending as fast as answers and refusals come back
# With fair share a flooding user has one request in flight, so only a few of theirs can start
# between another user's request being sent and it starting; without, the whole flood does.
FAIR_AHEAD_AT_MOST = 4
FLOOD_AHEAD = 20  # the control's flood, sent before the other user's request


@dataclass(frozen=True)
class LimitsStack:
    stack: Stack
    backend: str  # the fake backend's URL
    amqp_url: str


@pytest.fixture(scope="module")
def models(session_tag: str, delete_test_queues: list[str]) -> dict[str, str]:
    names = {kind: f"test-org/limits-{kind}-{session_tag}" for kind in ("rpm", "tpm", "fair", "open")}
    delete_test_queues.extend(names.values())
    return names


@pytest.fixture(scope="module")
def limits(tmp_path_factory: pytest.TempPathFactory, amqp_url: str, models: dict[str, str]) -> Iterator[LimitsStack]:
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
        with api_and_workers(config, workdir, models.values()) as stack:
            yield LimitsStack(stack, backend, amqp_url)


@pytest.fixture(scope="module")
def stack(limits: LimitsStack) -> Stack:
    return limits.stack


def _client(stack: Stack, user: str) -> openai.OpenAI:
    key = create_key(stack.config, user)
    return openai.OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=EVENTUALLY_S)


def _chat(client: openai.OpenAI, model: str, text: str = "hi", delay_ms: int = 0, **extra: object) -> str:
    fields = ({"fake_delay_ms": delay_ms} if delay_ms else {}) | extra
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], extra_body=fields or None
    )
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
    leave_after_first_token(frank, models["tpm"], "one two three four five six")
    # The consumer sends the API its count at the cut (the frame the charge comes from) just before
    # its usage report, which the API then records: once the record is there, the charge is in.
    wait_until(lambda: cancelled_recorded(stack, "frank-tpm"), EVENTUALLY_S, "frank's cut stream recorded")
    with pytest.raises(openai.RateLimitError) as caught:
        _chat(frank, models["tpm"])
    assert _retry_after(caught.value) >= 1


def leave_after_first_token(client: openai.OpenAI, model: str, text: str) -> None:
    """Stream a slow answer to `text` and leave it once its first token came."""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], stream=True, extra_body={"fake_delay_ms": 200}
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()


def cancelled_recorded(stack: Stack, user: str, model: str | None = None) -> bool:
    store = JobStore(stack.workdir / "data")
    try:
        return any(row["cancelled"] for row in store.usage.totals(user=user, model=model))
    finally:
        store.close()


def test_concurrent_requests(limits: LimitsStack, models: dict[str, str], tmp_path: Path) -> None:
    erin = _client(limits.stack, "erin-conc")
    hold = Hold(tmp_path / "release")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_chat, erin, models["fair"], "slow", **hold.field)
        try:
            wait_until(lambda: fake_stats(limits.backend)["active"] == 1, EVENTUALLY_S, "the first one in flight")
            with pytest.raises(openai.RateLimitError) as caught:
                _chat(erin, models["fair"])
            assert not slow.done()  # refused while the first was still in flight: not queued behind it
            assert _retry_after(caught.value) == 1
        finally:
            hold.release()
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


@dataclass(frozen=True)
class Measured:
    seconds: float  # sent -> answered (printed: timing is not what the tests check)
    ahead: int  # requests the backend started between this one being sent and it starting


def _measure(client: openai.OpenAI, model: str, backend: str, tag: str) -> Measured:
    before = fake_stats(backend)["started"]
    started = time.monotonic()
    assert _chat(client, model, "mine", DELAY_MS, fake_tag=tag)
    seconds = time.monotonic() - started
    return Measured(seconds, fake_stats(backend)["started_order"][tag] - before - 1)


def _requests(client: openai.OpenAI, model: str, backend: str, name: str, count: int) -> list[Measured]:
    return [_measure(client, model, backend, f"{name}-{i}") for i in range(count)]


def test_fair_share(limits: LimitsStack, models: dict[str, str]) -> None:
    """A user flooding from FLOODERS threads; another user's requests are still served next."""
    flooder, patient = _client(limits.stack, "frank-flood"), _client(limits.stack, "grace-patient")
    alone = _requests(patient, models["fair"], limits.backend, "grace-alone", 3)
    stop, served, refused = threading.Event(), list[int](), list[int]()
    threads = [
        threading.Thread(target=_flood, args=(flooder, models["fair"], stop, served, refused)) for _ in range(FLOODERS)
    ]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: served and len(refused) >= FLOODERS, EVENTUALLY_S, "the flood on")
        flooded = _requests(patient, models["fair"], limits.backend, "grace-flooded", 8)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=EVENTUALLY_S)
    assert served and len(refused) > len(served)  # the flood ran, mostly refused with 429
    print(
        f"fair share: alone {statistics.median(m.seconds for m in alone):.3f} s,"
        f" under flood {[round(m.seconds, 3) for m in flooded]} s with {[m.ahead for m in flooded]} started ahead;"
        f" flood served {len(served)}, refused {len(refused)}"
    )
    assert max(m.ahead for m in flooded) <= FAIR_AHEAD_AT_MOST, flooded


def test_without_fair_share_a_flood_starves_others(limits: LimitsStack, models: dict[str, str], tmp_path: Path) -> None:
    """The control: the same worker shape without limits; one request waits behind the whole flood."""
    flooder, patient = _client(limits.stack, "heidi-flood"), _client(limits.stack, "ivan-patient")
    alone = _requests(patient, models["open"], limits.backend, "ivan-alone", 3)
    queue = topology.request_queue_name(models["open"], Lane.INTERACTIVE)
    # The flood is held in the backend until the patient request has queued behind it: how fast the
    # flood is sent and served must not decide what is queued when it arrives.
    hold = Hold(tmp_path / "release")
    with concurrent.futures.ThreadPoolExecutor(FLOOD_AHEAD + 1) as pool:
        flood = [
            pool.submit(_chat, flooder, models["open"], "flood", DELAY_MS, **hold.field) for _ in range(FLOOD_AHEAD)
        ]
        # The worker holds two in its backend (max_inflight = 2) and one more waiting for a slot (its
        # one queue's grant: consumers/intake.py); the rest waits in the queue.
        queued = FLOOD_AHEAD - 3
        wait_until(
            lambda: ready_messages(limits.amqp_url, queue) == queued, EVENTUALLY_S, f"{queued} flood requests queued"
        )
        measuring = pool.submit(_measure, patient, models["open"], limits.backend, "ivan-behind")
        wait_until(
            lambda: ready_messages(limits.amqp_url, queue) == queued + 1, EVENTUALLY_S, "the patient request queued"
        )
        hold.release()
        behind = measuring.result()
        assert all(f.result() for f in flood)
    print(
        f"no limits: alone {statistics.median(m.seconds for m in alone):.3f} s,"
        f" behind the flood {behind.seconds:.3f} s with {behind.ahead} started ahead"
    )
    assert behind.ahead >= queued > FAIR_AHEAD_AT_MOST  # everything queued before it went first


async def test_limiter_refills_and_counts_out_once() -> None:
    """The in-memory counters alone, on a fake clock: refill rates, Retry-After, idempotent release."""
    now = [0.0]
    config = parse_config(
        '[limits]\nrequests_per_minute = 2\ntokens_per_minute = 60\nmax_concurrent_per_user = 1\n[models."m"]\n'
        '[models."free"]\nlimits = {}\n'
    )
    limiter = Limiter(config, clock=lambda: now[0])
    assert await limiter.admit("u", "free") is None  # no limits: nothing counted
    release = await limiter.admit("u", "m")
    assert release is not None
    with pytest.raises(RateLimited, match="in flight"):
        await limiter.admit("u", "m")
    release({"prompt_tokens": 50, "completion_tokens": 30})  # 80 tokens: the bucket is 20 in debt
    release({"prompt_tokens": 50, "completion_tokens": 30})  # a second call changes nothing
    with pytest.raises(RateLimited, match="tokens per minute") as caught:
        await limiter.admit("u", "m")
    assert caught.value.retry_after_s == 21  # 20 tokens of debt + 1, at one token a second
    now[0] = 21.0
    second = await limiter.admit("u", "m")  # the tokens refilled; the second request of the minute
    assert second is not None
    second(None)
    with pytest.raises(RateLimited, match="requests per minute") as caught:
        await limiter.admit("u", "m")
    assert caught.value.retry_after_s == 9  # 21 s refilled 0.7 of a request; 0.3 more takes 9 s
    assert await limiter.admit("v", "m") is not None  # another user has their own counters


class _Delivery:
    def __init__(self, frame: Final | Abandoned) -> None:
        self.body = messages.encode(frame)
        self.correlation_id = frame.request_id


def _delivered(frame: Final | Abandoned) -> AbstractIncomingMessage:
    """A stand-in for a delivery: the two attributes the reply handler reads."""
    return cast(AbstractIncomingMessage, _Delivery(frame))


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

        def charge(late: dict[str, int] | None, request_id: str = request_id) -> None:
            charged.setdefault(request_id, late)

        client.abandon(request_id, charge)
        await client._on_reply(_delivered(frame))
    assert charged == {"queued": usage, "late": usage, "cut": usage}
    await client._on_reply(_delivered(Abandoned("cut", usage)))  # a repeat is not charged twice
    assert len(charged) == 3 and not client._on_abandoned

"""Stream migration (issue 12): the resume gap, and how long a drained worker takes to leave.

    python -m bench.stream_migration [--rounds N] [--backend-url URL --model NAME]

- *gap*: a stream is killed (``kill -9`` of the worker holding it) after a few tokens; the gap is
  the API's `hotq_stream_resume_gap_seconds`: its last output before the kill to its first after
  (the redelivery, the API's answer, the continuation's prefill). On the fake backend (20 ms a token)
  by default, or on an OpenAI-compatible backend already running (vLLM: ``--backend-url``, the
  model name it serves), greedy.
- *drain*: 8 long streams in flight on one worker (the fake backend's 800 tokens at 25 ms, or with
  ``--backend-url`` 300 tokens, ``ignore_eos``), another worker idle; SIGTERM to the first, seconds
  until it exited (``hotq worker --grace 600``, so a checkout that waits for its streams shows the whole
  wait). Only this part runs against another checkout: ``PYTHONPATH=/path/to/other python
  bench/stream_migration.py --drain-only`` (main, before migration, waits for its streams).

A stream that fails is reported with its error's text, and the warnings and errors the API and
workers logged (``logged_trouble``).

It uses only `ops.testing` (stack, fake backend), so that older checkouts run it too. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai

from ops.testing.deadlines import EVENTUALLY_S, STOP_S
from ops.testing.fake_backend import running_fake_backend
from ops.testing.stack import ROOT, Stack, log_events, write_config

AMQP_URL = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DRAIN_GRACE_S = 600
VLLM_DRAIN_TOKENS = 300  # each of the drain's streams on a real backend (ignore_eos)
WORDS = 400  # a fake stream of 400 tokens at 20 ms: 8 s, far longer than a kill takes


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _has_content(chunk: Any) -> bool:
    return bool(chunk.choices and chunk.choices[0].delta.content)


def _gap_sum(stack: Stack, model: str) -> float:
    """The API's summed resume gaps of `model` (`hotq_stream_resume_gap_seconds`, in /metrics):
    measured where the client's bytes leave, unlike a client that reads chunks buffered before the kill."""
    text = httpx.get(stack.url + "/metrics", timeout=EVENTUALLY_S).text
    prefix = f'hotq_stream_resume_gap_seconds_sum{{model="{model}"}} '
    return next((float(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix)), 0.0)


def gaps(rounds: int, backend_url: str, model: str, fake: bool, workdir: Path) -> list[float]:
    workdir.mkdir(parents=True, exist_ok=True)
    table = {"backend_url": backend_url, "max_inflight": 8}
    stack = Stack(write_config(workdir / "hotq.toml", AMQP_URL, {model: table}, stream_flush_ms=0), workdir)
    measured = []
    try:
        stack.start_api()
        holder = stack.start_worker(model)
        for _ in range(rounds):
            extra: dict[str, Any] = {"fake_delay_ms": 20} if fake else {"ignore_eos": True}
            content = " ".join(["go"] * WORDS) if fake else "Tell me a long story about a lighthouse keeper."
            stream = iter(
                _client(stack).chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": content}],
                    stream=True,
                    temperature=0,
                    max_tokens=WORDS,
                    extra_body=extra,
                )
            )
            spare = stack.start_worker(model)  # idle: the stream is the holder's
            seen = 0
            while seen < 5:
                seen += _has_content(next(stream))
            before = _gap_sum(stack, model)
            holder.send_signal(signal.SIGKILL)
            for _chunk in stream:
                pass
            measured.append(_gap_sum(stack, model) - before)
            holder = spare
    finally:
        stack.close()
    return measured


def drain_s(workdir: Path, backend_url: str | None = None, model: str | None = None) -> dict[str, Any]:
    """The drain on the fake backend, or on a running backend (`backend_url` serving `model`)."""
    if backend_url is not None and model is not None:
        return _drain(workdir, backend_url, model, fake=False)
    model = f"bench-drain-{uuid.uuid4().hex[:6]}"
    with running_fake_backend([model]) as url:
        return _drain(workdir, url, model, fake=True)


def _drain(workdir: Path, backend_url: str, model: str, fake: bool, streams: int = 8) -> dict[str, Any]:
    table = {"backend_url": backend_url, "max_inflight": streams}
    stack = Stack(write_config(workdir / "hotq.toml", AMQP_URL, {model: table}, stream_flush_ms=0), workdir)
    errors: list[str] = []
    trouble: list[dict[str, Any]] = []
    started = threading.Semaphore(0)  # released once per stream at its first content
    finishes: list[str] = []
    try:
        stack.start_api()
        # A grace far above a stream's length: a checkout that waits for its streams shows their whole wait.
        first = stack.start_worker(model, "--grace", str(DRAIN_GRACE_S))

        def read() -> None:
            content = " ".join(["go"] * WORDS * 2) if fake else "Tell me a long story about a lighthouse keeper."
            extra: dict[str, Any] = {"fake_delay_ms": 25} if fake else {"ignore_eos": True}
            limit: dict[str, Any] = {} if fake else {"max_tokens": VLLM_DRAIN_TOKENS}
            seen = False
            try:
                for chunk in _client(stack).chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": content}],
                    stream=True,
                    temperature=0,
                    extra_body=extra,
                    **limit,
                ):
                    if not seen and _has_content(chunk):
                        seen = True
                        started.release()
                    if chunk.choices and chunk.choices[0].finish_reason:
                        finishes.append(chunk.choices[0].finish_reason)
            except openai.APIError as exc:
                errors.append(f"{type(exc).__name__}: {exc.message}")
            except Exception as exc:  # whatever ended a stream is reported, never lost with its thread
                errors.append(repr(exc))
            finally:
                if not seen:
                    started.release()

        readers = [threading.Thread(target=read) for _ in range(streams)]
        for reader in readers:
            reader.start()
        for _ in readers:
            if not started.acquire(timeout=EVENTUALLY_S * (1 if fake else 10)):
                raise TimeoutError("the streams did not all start")
        stack.start_worker(model)
        signalled = time.monotonic()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=DRAIN_GRACE_S + STOP_S)
        took = time.monotonic() - signalled
        for reader in readers:
            reader.join(timeout=900)
        if errors:
            trouble = _trouble(stack)
    finally:
        stack.close()
    report = {
        "checkout": str(ROOT),
        "backend": "fake" if fake else backend_url,
        "streams": streams,
        "drain_s": round(took, 2),
        "finished_streams": len(finishes),
        "stream_errors": errors,
    }
    return {**report, "logged_trouble": trouble} if errors else report


def _trouble(stack: Stack) -> list[dict[str, Any]]:
    """Every warning and error the stack's processes logged, to tell why a stream failed."""
    found = []
    for child in [stack.api, *stack.workers]:
        if child is None:
            continue
        for event in log_events(child.log_path):
            if event.get("level") in ("warning", "error", "critical") or event.get("status", 200) != 200:
                found.append({"process": child.name, **event})
    return found


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--backend-url", default=None, help="a running backend (vLLM) instead of the fake one")
    parser.add_argument("--model", default=None, help="the model name that backend serves")
    parser.add_argument("--drain-only", action="store_true")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="hotq-bench-migration-") as tmp:
        if not args.drain_only:
            if args.backend_url:
                measured = gaps(args.rounds, args.backend_url, args.model, False, Path(tmp) / "gap")
            else:
                model = f"bench-gap-{uuid.uuid4().hex[:6]}"
                with running_fake_backend([model]) as url:
                    measured = gaps(args.rounds, url, model, True, Path(tmp) / "gap")
            assert len(measured) == args.rounds and all(gap > 0 for gap in measured), measured
            report["gap_s"] = {
                "backend": args.backend_url or "fake",
                "rounds": len(measured),
                "p50": round(statistics.median(measured), 4),
                "p99": _pct(measured, 0.99),
                "all": [round(v, 4) for v in measured],
            }
        (Path(tmp) / "drain").mkdir()
        report["drain"] = drain_s(Path(tmp) / "drain", args.backend_url, args.model)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

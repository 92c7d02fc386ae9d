"""Stream migration (issue 12): the resume gap, and how long a drained worker takes to leave.

    python -m bench.stream_migration [--rounds N] [--backend-url URL --model NAME]

- *gap*: a stream is killed (``kill -9`` of the worker holding it) after a few tokens; the gap is
  the API's `hotq_stream_resume_gap_seconds`: its last output before the kill to its first after
  (the redelivery, the API's answer, the continuation's prefill). On the fake backend (20 ms a token)
  by default, or on an OpenAI-compatible backend already running (vLLM: ``--backend-url``, the
  model name it serves), greedy.
- *drain*: 8 long streams (fake backend) in flight on one worker, another worker idle; SIGTERM to
  the first, seconds until it exited (``drain_grace_s`` 60). Only this part runs against another
  checkout: ``PYTHONPATH=/path/to/other python bench/stream_migration.py --drain-only`` (main, before
  migration, waits for its streams).

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

from ops.processes import wait_until
from ops.testing.deadlines import EVENTUALLY_S, STOP_S
from ops.testing.fake_backend import fake_stats, running_fake_backend
from ops.testing.stack import ROOT, Stack, write_config

AMQP_URL = os.environ.get("HOTQ_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
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


def drain_s(workdir: Path, streams: int = 8) -> dict[str, Any]:
    model = f"bench-drain-{uuid.uuid4().hex[:6]}"
    with running_fake_backend([model]) as backend_url:
        table = {"backend_url": backend_url, "max_inflight": streams, "drain_grace_s": 60}
        stack = Stack(write_config(workdir / "hotq.toml", AMQP_URL, {model: table}, stream_flush_ms=0), workdir)
        errors: list[str] = []
        try:
            stack.start_api()
            first = stack.start_worker(model)

            def read() -> None:
                try:
                    for _chunk in _client(stack).chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": " ".join(["go"] * WORDS * 2)}],
                        stream=True,
                        extra_body={"fake_delay_ms": 25},
                    ):
                        pass
                except openai.APIError as exc:
                    errors.append(exc.message)

            readers = [threading.Thread(target=read) for _ in range(streams)]
            for reader in readers:
                reader.start()
            wait_until(lambda: fake_stats(backend_url)["active"] == streams, EVENTUALLY_S, "streams in flight")
            stack.start_worker(model)
            signalled = time.monotonic()
            first.send_signal(signal.SIGTERM)
            first.wait(timeout=120 + STOP_S)
            took = time.monotonic() - signalled
            for reader in readers:
                reader.join(timeout=300)
        finally:
            stack.close()
    return {"checkout": str(ROOT), "streams": streams, "drain_s": round(took, 2), "stream_errors": errors}


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
        report["drain"] = drain_s(Path(tmp) / "drain")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

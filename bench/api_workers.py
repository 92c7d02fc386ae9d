"""`hotq serve --workers 1` vs `--workers 2` on this machine, in one run (issue 13).

Both APIs run at once, on ports of their own, over one worker and the deterministic fake
backend (one config, one vhost); the rounds alternate between them so that what else the
machine does falls on both alike. Each round sends non-streaming chat requests at
concurrency 1 and at concurrency 50 (kept-alive connections, which the kernel spreads over
the processes of `--workers 2` as they are opened) and reports requests/s and latency.
Run: `.venv/bin/python -m bench.api_workers [--rounds 3] [--amqp-url URL]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    HOTQ_CLI,
    STARTUP_TIMEOUT_S,
    BenchReport,
    Processes,
    add_shared_options,
    child_env,
    delete_queues,
    request_queues,
    run_bench,
    start_fake_backend,
    start_worker,
    wait_http_ok,
)
from bench.core_path import chat_body, chat_load_round, expected_content
from ops.processes import free_port
from ops.testing.stack import write_config

LOADS = ((1, 200), (50, 2000))  # (concurrency, requests) per round
TEXT, MAX_TOKENS = "How many processes?", 16


@dataclass
class Report(BenchReport):
    rounds: list[dict[str, Any]] = field(default_factory=list)


async def run(settings: argparse.Namespace, processes: Processes, workdir: Path, report: Report) -> None:
    model = f"bench/api-workers-{uuid.uuid4().hex[:8]}"
    report.settings = {"rounds": settings.rounds, "loads": LOADS, "max_tokens": MAX_TOKENS}
    backend_url, _ = await start_fake_backend(processes, model)
    table = {"backend_url": backend_url, "max_inflight": 64, "reserved_interactive": 2}
    config = write_config(workdir / "hotq.toml", settings.amqp_url, {model: table})
    urls: dict[int, str] = {}
    try:
        for workers in (1, 2):
            port = free_port()
            argv = [*HOTQ_CLI, "serve", "--config", str(config), "--port", str(port), "--workers", str(workers)]
            api = processes.start(f"api-workers-{workers}", argv, env=child_env())
            urls[workers] = f"http://127.0.0.1:{port}/v1"
            await wait_http_ok(urls[workers] + "/models", api, STARTUP_TIMEOUT_S)
        await start_worker(processes, config, model)
        body, expected = chat_body(model, TEXT, MAX_TOKENS), expected_content(TEXT, MAX_TOKENS)
        for number in range(settings.rounds):
            for workers in (1, 2) if number % 2 == 0 else (2, 1):
                for concurrency, total in LOADS:
                    measured = await chat_load_round(urls[workers], body, expected, concurrency, total)
                    report.rounds.append(
                        {"round": number + 1, "workers": workers, "concurrency": concurrency, **measured}
                    )
                    print(report.rounds[-1], flush=True)
    finally:
        processes.stop_all()
        await delete_queues(settings.amqp_url, request_queues(model))


def print_report(report: Report, json_path: Path) -> None:
    print(f"\n{'workers':>8} {'conc.':>6} {'req/s (median of rounds)':>26} {'p50 ms':>8} {'p99 ms':>8}")
    for workers in (1, 2):
        for concurrency, _ in LOADS:
            rows = [r for r in report.rounds if r["workers"] == workers and r["concurrency"] == concurrency]
            rate = statistics.median(r["requests_per_s"] for r in rows)
            p50 = statistics.median(r["p50_ms"] for r in rows)
            p99 = statistics.median(r["p99_ms"] for r in rows)
            print(f"{workers:>8} {concurrency:>6} {rate:>26.1f} {p50:>8.1f} {p99:>8.1f}")
    print(f"\n{json_path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    add_shared_options(parser)
    settings = parser.parse_args()
    return run_bench(run, settings, Report(), "api_workers", print_report)


if __name__ == "__main__":
    sys.exit(main())

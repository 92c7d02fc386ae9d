"""Streams through hotq vs straight to vLLM, measured with vLLM's own benchmark client.

    .venv/bin/python -m bench.stream_vllm [--rounds 1] [--keepalive-s 0.5]

One vLLM server (the embedded model, `vllm_command`'s flags) serves both targets: `direct`
(the server itself) and `hotq` (`hotq serve` + `hotq worker` in front of it, `max_inflight`
32 as vLLM's `--max-num-seqs`). `vllm bench serve` (openai-chat backend, random dataset,
streaming, `ignore_eos`) runs each load against both, alternating direct/hotq/hotq/direct per
round so that a drift of the machine hits both alike. Loads: `light` (40 prompts, 8 at a time,
64 tokens in and out) and `queued` (64 prompts, 32 at a time): there the first token takes
longer than hotq's `keepalive_s` (0.5 s here), so the streams carry keep-alives, which
every client must skip (issue 10). Targets from issue 10 §2: TTFT p50 within direct + 5 ms
(plus any queue wait), ITL p99 at most 1.2x direct, output tokens/s at least 97 % of direct.

Results: a table on stdout and JSON in bench/results/stream_vllm-<time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    DEFAULT_AMQP_URL,
    RESULTS_DIR,
    Processes,
    delete_queues,
    request_queues,
    start_api,
    start_worker,
)
from bench.vllm_bench_serve import ServeLoad, bench_serve
from broker.config import ModelConfig
from hpc_agents.backend_process import BackendProcess, backend_environment
from hpc_agents.embedded_model import default_cache_dir, ensure_embedded_model
from hpc_agents.vllm_command import vllm_command
from ops.processes import free_port
from ops.testing.stack import write_config

LOADS = {
    "light": ServeLoad(num_prompts=40, concurrency=8, input_len=64, output_len=64),
    "queued": ServeLoad(num_prompts=64, concurrency=32, input_len=64, output_len=64),
}
METRICS = ("output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms")
START_TIMEOUT_S = 900.0


async def run(rounds: int, keepalive_s: float, amqp_url: str) -> dict[str, Any]:
    model_path = ensure_embedded_model()
    model = f"smollm-stream-{uuid.uuid4().hex[:8]}"  # queues of its own, deleted at the end
    results: dict[str, dict[str, list[dict[str, Any]]]] = {load: {"direct": [], "hotq": []} for load in LOADS}
    with tempfile.TemporaryDirectory(prefix="hotq-bench-stream-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        env = backend_environment(ModelConfig(), default_cache_dir())
        vllm = BackendProcess(vllm_command(str(model_path), model, port), env, port, workdir / "vllm.log")
        processes = Processes(workdir)
        vllm.start()
        try:
            await vllm.wait_ready(START_TIMEOUT_S)
            config = write_config(
                workdir / "hotq.toml",
                amqp_url,
                {model: {"backend_url": vllm.url, "max_inflight": 32}},
                max_queue_wait_s=600,
                keepalive_s=keepalive_s,
            )
            api_url, _ = await start_api(processes, config)
            await start_worker(processes, config, model)
            targets = {"direct": vllm.url, "hotq": api_url.removesuffix("/v1")}
            warm = ServeLoad(num_prompts=8, concurrency=8)
            for url in targets.values():
                await asyncio.to_thread(bench_serve, url, model, str(model_path), warm, workdir / "warmup.log")
            for _ in range(rounds):
                for load_name, load in LOADS.items():
                    for target in ("direct", "hotq", "hotq", "direct"):
                        log = workdir / f"{load_name}-{target}.log"
                        url = targets[target]
                        result = await asyncio.to_thread(bench_serve, url, model, str(model_path), load, log)
                        results[load_name][target].append({key: result[key] for key in (*METRICS, "completed")})
                        print(load_name, target, _fmt(results[load_name][target][-1]), flush=True)
        finally:
            processes.stop_all()
            await vllm.stop()
            await delete_queues(amqp_url, request_queues(model))
    return {
        "keepalive_s": keepalive_s,
        "loads": {k: dataclasses.asdict(v) for k, v in LOADS.items()},
        "results": results,
    }


def _fmt(row: dict[str, Any]) -> str:
    return ", ".join(f"{key} {row[key]:.1f}" for key in METRICS)


def summary(report: dict[str, Any]) -> list[str]:
    lines = []
    for load, targets in report["results"].items():
        mean = {t: {k: statistics.fmean(r[k] for r in rows) for k in METRICS} for t, rows in targets.items()}
        direct, hotq = mean["direct"], mean["hotq"]
        lines.append(
            f"{load}: output tokens/s {hotq['output_throughput']:.1f} vs {direct['output_throughput']:.1f} direct "
            f"({100 * hotq['output_throughput'] / direct['output_throughput']:.1f} %, target >= 97 %); "
            f"TTFT p50 {hotq['median_ttft_ms']:.1f} vs {direct['median_ttft_ms']:.1f} ms "
            f"(+{hotq['median_ttft_ms'] - direct['median_ttft_ms']:.1f} ms, target <= +5 ms plus queue wait); "
            f"ITL p99 {hotq['p99_itl_ms']:.1f} vs {direct['p99_itl_ms']:.1f} ms "
            f"({hotq['p99_itl_ms'] / direct['p99_itl_ms']:.2f}x, target <= 1.2x)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--keepalive-s", type=float, default=0.5)
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    args = parser.parse_args()
    report = asyncio.run(run(args.rounds, args.keepalive_s, args.amqp_url))
    report["summary"] = summary(report)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"stream_vllm-{int(time.time())}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n".join(report["summary"]))
    print(f"results: {path}")


if __name__ == "__main__":
    main()

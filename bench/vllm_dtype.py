"""float32 vs bfloat16 for the embedded model on this CPU, with vLLM's own benchmark client.

    .venv/bin/python -m bench.vllm_dtype [--rounds 1]

Starts vLLM on the embedded model with the flags the agent uses (`vllm_command`), once per
dtype, alternating; each run: one warm-up load, then `vllm bench serve` (16 prompts, 8 at a
time, 64 tokens in, 32 out, streaming chat). Prints output tokens/s and TTFT p50 per dtype,
and which dtype `default_dtype()` picks here (from the CPU flags).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path

from bench.vllm_bench_serve import ServeLoad, bench_serve
from hpc_agents.backend_process import BackendProcess
from hpc_agents.embedded_model import DEFAULT_MODEL_NAME, default_cache_dir, ensure_embedded_model
from hpc_agents.vllm_command import cpu_flags, default_dtype, vllm_command, vllm_environment
from ops.processes import free_port

RESULTS_DIR = Path(__file__).parent / "results"
START_TIMEOUT_S = 900.0


async def measure(dtype: str, model_path: Path, workdir: Path) -> dict[str, float]:
    port = free_port()
    command = vllm_command(str(model_path), DEFAULT_MODEL_NAME, port, dtype=dtype)
    env = {**os.environ, **vllm_environment(default_cache_dir())}
    backend = BackendProcess(command, env, port, workdir / f"vllm-{dtype}.log")
    backend.start()
    try:
        start_s = await backend.wait_ready(START_TIMEOUT_S)
        log = workdir / f"bench-{dtype}.log"
        for load in (ServeLoad(num_prompts=8), ServeLoad()):  # the first warms vLLM up
            result = await asyncio.to_thread(bench_serve, backend.url, DEFAULT_MODEL_NAME, str(model_path), load, log)
    finally:
        await backend.stop()
    return {
        "start_s": round(start_s, 1),
        "output_tokens_per_s": round(result["output_throughput"], 1),
        "ttft_p50_ms": round(result["median_ttft_ms"], 0),
        "itl_p99_ms": round(result["p99_itl_ms"], 0),
    }


async def main(rounds: int) -> None:
    model_path = ensure_embedded_model()
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    print(f"CPU flags: {' '.join(flags)}; default_dtype() picks {default_dtype()}")
    results: dict[str, list[dict[str, float]]] = {"float32": [], "bfloat16": []}
    with tempfile.TemporaryDirectory(prefix="hotq-bench-dtype-") as tmp:
        for _ in range(rounds):
            for dtype in results:
                results[dtype].append(await measure(dtype, model_path, Path(tmp)))
                print(dtype, results[dtype][-1], flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    path = RESULTS_DIR / f"vllm_dtype-{int(time.time())}.json"
    path.write_text(json.dumps({"cpu_flags": flags, "default": default_dtype(), "results": results}, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    asyncio.run(main(parser.parse_args().rounds))

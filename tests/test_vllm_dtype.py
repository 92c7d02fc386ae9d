"""Issue 10 §5: vLLM's CPU build serves in bfloat16 only where the CPU computes it natively."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpc_agents.vllm_command import cpu_dtype, cpu_flags, vllm_command

AVX2_LAPTOP = "fpu vme sse sse2 avx avx2 fma"


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [
        (AVX2_LAPTOP, "float32"),  # bfloat16 would be emulated: 2.9x slower (issue 10)
        (AVX2_LAPTOP + " avx512f avx512bw", "float32"),
        (AVX2_LAPTOP + " avx512f avx512_bf16", "bfloat16"),
        (AVX2_LAPTOP + " amx_tile amx_bf16", "bfloat16"),
    ],
)
def test_the_dtype_follows_the_cpu_flags(tmp_path: Path, flags: str, dtype: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert cpu_dtype(cpu_flags(cpuinfo)) == dtype


def test_without_cpuinfo_the_safe_choice_is_float32(tmp_path: Path) -> None:
    assert cpu_flags(tmp_path / "absent") == frozenset()
    assert cpu_dtype(frozenset()) == "float32"


def test_the_command_carries_the_dtype() -> None:
    command = vllm_command("/models/m", "m", 8001, dtype="float32")
    assert command[command.index("--dtype") + 1] == "float32"

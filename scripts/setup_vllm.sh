#!/usr/bin/env bash
# Install vLLM (for the KV-connector tests) into a venv next to the CPU torch, without its deps.
#
# Usage: scripts/setup_vllm.sh VENV VERSION     e.g. scripts/setup_vllm.sh .venv 0.33.0
#
# vLLM's metadata pins a CUDA torch (0.33.0: torch==2.14.0, 0.23.0: torch==2.11.0), torchvision
# and CUDA-only kernels, so vLLM goes in with --no-deps and its light deps come from our extra
# `[vllm]`. The torch already in the venv is frozen into a constraints file for every install and
# checked again at the end: nothing may replace it with a CUDA build. Idempotent: a stamp in the
# venv records what was installed; a second run with the same inputs does nothing.
set -euo pipefail
VENV=${1:?usage: setup_vllm.sh VENV VERSION}
VERSION=${2:?usage: setup_vllm.sh VENV VERSION}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
# Triton 3.9.0 is the release paired with torch 2.13; only its interpreter runs here (CPU).
TRITON=triton==3.9.0
XGRAMMAR=xgrammar==0.2.8
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-$VERSION"
INPUTS=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
    echo "vllm==$VERSION already set up in $VENV"
    exit 0
fi
start=$(date +%s)
test -x "$PY" || "$PYTHON" -m venv "$VENV"
"$PY" -m pip install -q --upgrade pip
# torch first and pinned, exactly as `make setup` does, so no later install can pull a CUDA build.
"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "$TORCH"
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
constraints="$VENV/.torch-constraints.txt"
echo "torch==$torch_before" > "$constraints"
# torchvision is never wanted: a build that does not match torch breaks vLLM's model inspection.
"$PY" -m pip uninstall -q -y torchvision 2>/dev/null || true

"$PY" -m pip install -q --no-deps "vllm==$VERSION" "$XGRAMMAR" "$TRITON"
"$PY" -m pip install -q -c "$constraints" -e '.[vllm,dev]'

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
    echo "error: torch changed from $torch_before to $torch_after while installing vLLM" >&2
    exit 1
fi
if "$PY" -c "import torchvision" 2>/dev/null; then
    echo "error: torchvision got installed into $VENV; remove it (it breaks vLLM on CPU)" >&2
    exit 1
fi
VLLM_TARGET_DEVICE=cpu "$PY" -c "import vllm, triton; print('vllm', vllm.__version__, \
'triton', triton.__version__)"
echo "$INPUTS" > "$STAMP"
echo "set up vllm==$VERSION in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"

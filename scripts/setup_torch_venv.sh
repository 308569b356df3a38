#!/usr/bin/env bash
# A venv that runs another venv's packages on the torch of SageMaker LMI (lmi27: torch 2.11.0 with
# vLLM 0.23.1), here, on a machine without a GPU.
#
# Usage: scripts/setup_torch_venv.sh VENV BASE_VENV [TORCH_VERSION]
#   e.g. scripts/setup_torch_venv.sh .venv-vllm023-t211 .venv-vllm023 2.11.0
#
# PyPI's torch 2.11.0 is the CUDA 13 build (no CPU build of it is on PyPI, the only registry
# reached here). Its libtorch_cpu.so (every CPU kernel our code runs) links the CUDA runtime and
# CUPTI: those go in for real (NVIDIA's small nvidia-cuda-runtime and nvidia-cuda-cupti wheels).
# libtorch_cuda.so links cuBLAS, cuDNN, NCCL, ... (about 3 GB) that a CPU run never calls: loader-
# only stubs stand in for them (scripts/cuda_stubs.py, a few hundred KB, listed in
# nvidia/cu13/lib/CUDA_STUBS.txt). torch then imports, finds no GPU, and runs on the CPU.
# torch goes in with --no-deps (its metadata pulls all of CUDA); everything else (vLLM, its deps,
# torch's pure-Python deps) is BASE_VENV's, through a .pth file: nothing is installed twice and
# BASE_VENV is not touched. The package goes in editable, --no-deps (as in the LMI image).
# Idempotent: a stamp records the inputs.
set -euo pipefail
usage="usage: setup_torch_venv.sh VENV BASE_VENV [TORCH_VERSION]"
VENV=${1:?$usage}
BASE=${2:?$usage}
TORCH_VERSION=${3:-2.11.0}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The CUDA 13.0.2 toolkit's runtime and CUPTI, as torch 2.11.0's metadata asks (cuda-toolkit==13.0.2).
CUDA_REAL=(nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85)
REAL_SONAMES=libcudart.so.13,libcupti.so.13
STAMP="$VENV/.torch-$TORCH_VERSION"
INPUTS=$(cat pyproject.toml "$0" scripts/cuda_stubs.py | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
    echo "torch $TORCH_VERSION over $BASE already set up in $VENV"
    exit 0
fi
test -x "$BASE/bin/python" || { echo "error: $BASE is not a venv: run make setup" >&2; exit 1; }
start=$(date +%s)
# --without-pip: BASE's pip and setuptools serve (a venv's own old setuptools cannot build the
# editable install).
test -x "$VENV/bin/python" || "$PYTHON" -m venv --without-pip "$VENV"
PY="$VENV/bin/python"
purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
site=$("$PY" -c "$purelib")
# Appended after the venv's own site-packages: torch here shadows BASE's torch.
"$BASE/bin/python" -c "$purelib" > "$site/zz_base_venv.pth"
"$PY" -m pip install -q --no-deps "torch==$TORCH_VERSION" "${CUDA_REAL[@]}"
"$PY" scripts/cuda_stubs.py "$site/torch/lib" "$site/nvidia/cu13/lib" "$REAL_SONAMES"
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
VLLM_TARGET_DEVICE=cpu "$PY" -c "
import torch, vllm, lmcache_ext
assert torch.__version__.split('+')[0] == '$TORCH_VERSION', torch.__version__
assert not torch.cuda.is_available()
assert lmcache_ext.__file__.startswith('$PWD'), lmcache_ext.__file__
print('torch', torch.__version__, 'CUDA', torch.version.cuda, '(no GPU) with vllm', vllm.__version__)"
echo "$INPUTS" > "$STAMP"
echo "set up torch $TORCH_VERSION over $BASE in $VENV in $(( $(date +%s) - start )) s"

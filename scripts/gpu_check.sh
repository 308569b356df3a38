#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu_check.py says what it runs and measures).
#
#   scripts/gpu_check.sh [--dry-run] [--out PATH]      JSON to PATH, else $OUT/gpu_check.json
#
# For a machine with one GPU, torch (2.11, CUDA 13), triton and transformers, and only this
# repository copied in: no vLLM, no network, no weights. The package's light deps that such a
# machine may lack (xxhash, blake3, prometheus-client, cryptography, redis-py for the storage
# tests' fixtures, pytest; numpy and pyyaml come with transformers)
# are installed from .gpu-wheelhouse/ (`make gpu-wheelhouse` fills it here; carry it along) with
# --no-index when an import fails; without it the missing ones are named and the check stops.
# --dry-run: the same logic on the CPU (tiny shapes, Triton's interpreter), as CI runs it.
# Whole run: at most 8 minutes (timeout), exit 0 only when every target passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELHOUSE=.gpu-wheelhouse
MODULES="torch triton transformers tokenizers numpy yaml xxhash blake3 prometheus_client redis cryptography pytest"
missing() {
    "$PYTHON" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}
absent=$(missing $MODULES)
if [ -n "$absent" ] && [ -d "$WHEELHOUSE" ]; then
    echo "gpu_check: installing $absent from $WHEELHOUSE (--no-index)"
    pip_names=$(echo "$absent" | sed 's/prometheus_client/prometheus-client/; s/\byaml\b/pyyaml/')
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q --no-index --find-links "$WHEELHOUSE" $pip_names || true
    absent=$(missing $MODULES)
fi
if [ -n "$absent" ]; then
    echo "gpu_check: missing Python modules: $absent (run \`make gpu-wheelhouse\` on a machine" \
         "with PyPI and copy $WHEELHOUSE/ along; torch, triton, transformers must be there)" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"

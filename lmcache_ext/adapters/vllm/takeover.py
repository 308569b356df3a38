"""Which kv_connector names run lmcache-ext's connector: LMCache's names are taken over unless
``LMCACHE_EXT_TAKEOVER=false``, and what a config that names one means for our engine config.

Imports neither vLLM nor torch (``VllmConfig`` for types only): the container's entrypoint and
routes read these before any engine starts, the plugin and the connector at run time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lmcache_ext.config import parse_bool

if TYPE_CHECKING:
    from vllm.config import VllmConfig

TAKEOVER_ENV = "LMCACHE_EXT_TAKEOVER"
OUR_CONNECTOR = "LMCacheExtConnector"
OUR_MODULE = "lmcache_ext.adapters.vllm.connector"
# Module paths of our connector a kv_connector_module_path may name: the module, and the path
# users' configs named before the vLLM room existed (a one-line shim, kept importable).
OUR_MODULES = (OUR_MODULE, "lmcache_ext.adapters.vllm_connector")
# LMCache's connector names in vLLM's registry that resolve to ours while the takeover is on.
TAKEN_OVER = ("LMCacheConnectorV1", "LMCacheMPConnector")
OFFLOADING_CONNECTOR = "LMCacheMPConnector"  # what kv_offloading_backend="lmcache" sets


def takeover_enabled(env: Mapping[str, str]) -> bool:
    """``LMCACHE_EXT_TAKEOVER`` (default true); raises ValueError naming it for a non-boolean."""
    text = env.get(TAKEOVER_ENV, "").strip()
    if not text:
        return True
    try:
        return parse_bool(text)
    except ValueError as exc:
        raise ValueError(f"{TAKEOVER_ENV}={text!r}: {exc}") from exc



def offloading_overrides(vllm_config: VllmConfig, world: int) -> dict[str, Any]:
    """Engine-config overrides for the offloading-backend route: ``kv_offloading_size`` is vLLM's
    total over the TP ranks in GiB, our ``max_local_cpu_size`` is per rank."""
    transfer = vllm_config.kv_transfer_config
    cache = vllm_config.cache_config
    size = getattr(cache, "kv_offloading_size", None)
    if transfer.kv_connector != OFFLOADING_CONNECTOR or size is None or \
            getattr(cache, "kv_offloading_backend", None) != "lmcache":
        return {}
    return {"max_local_cpu_size": float(size) / world}


def runs_our_connector(vllm_config: VllmConfig) -> bool:
    """Whether vLLM builds ``LMCacheExtConnector`` for ``vllm_config`` (in any of its processes:
    they share the environment): our name, or a taken-over LMCache name, and no module path that
    names another connector (vLLM's factory lets a module path win)."""
    transfer = vllm_config.kv_transfer_config
    if transfer is None or not transfer.kv_connector:
        return False
    module = getattr(transfer, "kv_connector_module_path", None)
    if module and module not in OUR_MODULES:
        return False
    return transfer.kv_connector == OUR_CONNECTOR or \
        (transfer.kv_connector in TAKEN_OVER and takeover_enabled(os.environ))


def describe_takeover(vllm_config: VllmConfig) -> str | None:
    """The line that says a LMCache name runs as ours (None when ours was named), with its route."""
    name = vllm_config.kv_transfer_config.kv_connector
    if name == OUR_CONNECTOR:
        return None
    route = ("kv_offloading_backend=lmcache" if name == OFFLOADING_CONNECTOR
             else "kv_transfer_config")
    return (f"kv_connector {name} (from {route}) runs as lmcache-ext's {OUR_CONNECTOR}: the "
            f"lmcache_ext vLLM plugin took it over; {TAKEOVER_ENV}=false runs LMCache instead")

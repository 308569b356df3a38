"""The vLLM general plugin: LMCache's connector names resolve to ``LMCacheExtConnector``.

vLLM loads every ``vllm.general_plugins`` entry point (pyproject.toml names ``register``) in each
of its processes (API server, engine core, every worker) before it builds a KV connector. So one
hook covers every way a user switches LMCache on: ``--kv-transfer-config`` /
``OPTION_KV_TRANSFER_CONFIG`` / ``option.kv_transfer_config`` in serving.properties / LMI's
auto-config (all name ``LMCacheConnectorV1``) and ``--kv-offloading-backend lmcache``
(vLLM 0.23-0.33 map it to ``LMCacheMPConnector``). ``kv_connector_module_path`` still wins in
vLLM's factory: a config that names LMCache's module explicitly is left to LMCache.

``LMCACHE_EXT_TAKEOVER=false`` leaves LMCache's names alone (the real LMCache runs); our own name
``LMCacheExtConnector`` is registered either way. No side effects at import (no vLLM, no torch):
the entrypoint imports ``takeover_enabled`` from here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lmcache_ext.config import parse_bool

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)

TAKEOVER_ENV = "LMCACHE_EXT_TAKEOVER"
OUR_CONNECTOR = "LMCacheExtConnector"
OUR_MODULE = "lmcache_ext.adapters.vllm_connector"
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


def _our_class() -> type:
    from lmcache_ext.adapters.vllm_connector import LMCacheExtConnector

    return LMCacheExtConnector


def register() -> None:
    """vLLM's general-plugin hook. Idempotent; runs once per vLLM process. Replaces the registry
    entries of ``TAKEN_OVER`` with a loader of our class (vLLM's ``register_connector`` refuses a
    name twice, so the entry is set directly) and adds ``LMCacheExtConnector``."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    registry = KVConnectorFactory._registry
    registry[OUR_CONNECTOR] = _our_class
    if not takeover_enabled(os.environ):
        log.debug("%s=false: LMCache's connector names stay LMCache's", TAKEOVER_ENV)
        return
    for name in TAKEN_OVER:
        registry[name] = _our_class


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
    if module and module != OUR_MODULE:
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

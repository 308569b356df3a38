"""The vLLM general plugin: LMCache's connector names resolve to ``LMCacheExtConnector``.

vLLM loads every ``vllm.general_plugins`` entry point (pyproject.toml names ``register``) in each
of its processes (API server, engine core, every worker) before it builds a KV connector. So one
hook covers every way a user switches LMCache on: ``--kv-transfer-config`` /
``OPTION_KV_TRANSFER_CONFIG`` / ``option.kv_transfer_config`` in serving.properties / LMI's
auto-config (all name ``LMCacheConnectorV1``) and ``--kv-offloading-backend lmcache``
(vLLM 0.23-0.33 map it to ``LMCacheMPConnector``). ``kv_connector_module_path`` still wins in
vLLM's factory: a config that names LMCache's module explicitly is left to LMCache.

``LMCACHE_EXT_TAKEOVER=false`` leaves LMCache's names alone (the real LMCache runs); our own name
``LMCacheExtConnector`` is registered either way. Which names are taken over lives in
``takeover`` (vLLM-free); this module only registers them.
"""

from __future__ import annotations

import logging
import os

from lmcache_ext.adapters.vllm.takeover import (
    OUR_CONNECTOR,
    TAKEN_OVER,
    TAKEOVER_ENV,
    takeover_enabled,
)

log = logging.getLogger(__name__)


def _our_class() -> type:
    from lmcache_ext.adapters.vllm.connector import LMCacheExtConnector

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

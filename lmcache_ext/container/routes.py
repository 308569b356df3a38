"""Which of LMI's ways of switching LMCache on are set, each checked and named for the log.

A route is one setting (from env or serving.properties) that makes vLLM build LMCache's connector:
- ``option.kv_transfer_config`` naming ``LMCacheConnectorV1`` (or our ``LMCacheExtConnector``);
- ``option.lmcache_auto_config=true`` (LMI then injects ``LMCacheConnectorV1``);
- ``option.kv_offloading_backend=lmcache`` with ``option.kv_offloading_size`` (vLLM then
  configures ``LMCacheMPConnector``).
Pure: raises ``RouteError`` naming the setting and its source for a setting that would fail
in LMI or vLLM, or silently do nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lmcache_ext.adapters.vllm.takeover import OUR_CONNECTOR, OUR_MODULES
from lmcache_ext.config import parse_bool
from lmcache_ext.container.lmi_settings import LmiSettings, Option

KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
LMCACHE_NAMES = frozenset({"LMCacheConnectorV1", OUR_CONNECTOR})
# What LMI's auto-config puts in option.kv_transfer_config (djl_python/lmcache_utils.py).
LMI_AUTO_KV = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
# The users' seed: OPTION_KV_TRANSFER_CONFIG exactly as they write it.
SEED_KV_TRANSFER_CONFIG = '{"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}'


class RouteError(ValueError):
    """A route's setting is broken; the text names it and where it came from."""


@dataclass(frozen=True)
class Routes:
    """The routes set (labels for the log), and a connector that is not LMCache's, if named."""

    found: tuple[str, ...]
    kv: dict[str, Any] | None  # the parsed option.kv_transfer_config
    other_connector: str | None = None  # e.g. "NixlConnector", or LMCache's by module path
    auto: Option | None = None  # option.lmcache_auto_config when true

    @property
    def auto_from_env(self) -> bool:
        return self.auto is not None and self.auto.source.startswith("env ")


def parse_kv(option: Option) -> dict[str, Any]:
    """``option.kv_transfer_config`` as vLLM will read it; RouteError names its source."""
    where = f"{option.source}={option.value!r}"
    try:
        kv = json.loads(option.value)
    except json.JSONDecodeError as exc:
        raise RouteError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(kv, dict):
        raise RouteError(f"{where} must be a JSON object")
    if kv.get("kv_role") not in KV_ROLES:
        raise RouteError(f"{where} needs \"kv_role\", one of {', '.join(KV_ROLES)}")
    if not kv.get("kv_connector"):
        raise RouteError(f"{where} needs \"kv_connector\" (e.g. LMCacheConnectorV1)")
    return kv


def _is_lmcache(kv: dict[str, Any]) -> bool:
    """LMCache's name with no module path (or ours): vLLM's registry resolves it, so the plugin
    decides. A module path to LMCache's own package is the user's explicit choice."""
    module = kv.get("kv_connector_module_path")
    return kv["kv_connector"] in LMCACHE_NAMES and module in (None, *OUR_MODULES)


def _auto(settings: LmiSettings) -> Option | None:
    option = settings.get("lmcache_auto_config")
    if option is None or not option.value.strip():
        return None
    try:
        return option if parse_bool(option.value) else None
    except ValueError as exc:
        raise RouteError(f"{option.source}={option.value!r}: {exc}") from exc


def _offloading(settings: LmiSettings) -> str | None:
    backend = settings.get("kv_offloading_backend")
    if backend is None or backend.value.strip() != "lmcache":
        return None
    size = settings.get("kv_offloading_size")
    if size is None or not size.value.strip():
        raise RouteError(f"{backend.source}=lmcache without option.kv_offloading_size "
                         "(OPTION_KV_OFFLOADING_SIZE, GiB): vLLM offloads only with a size")
    try:
        if float(size.value) <= 0:
            raise ValueError
    except ValueError as exc:
        raise RouteError(f"{size.source}={size.value!r}: must be a size in GiB > 0") from exc
    return f"offloading backend ({backend.source}=lmcache, {size.source}={size.value.strip()})"


def find_routes(settings: LmiSettings) -> Routes:
    found: list[str] = []
    kv_option = settings.get("kv_transfer_config")
    kv = parse_kv(kv_option) if kv_option is not None and kv_option.value.strip() else None
    other = None
    if kv is not None and _is_lmcache(kv):
        found.append(f"kv_transfer_config ({kv_option.source})")
    elif kv is not None:
        module = kv.get("kv_connector_module_path")
        other = kv["kv_connector"] + (f" (module {module})" if module else "")
    auto = _auto(settings)
    if auto is not None:
        found.append(f"auto-config ({auto.source}=true)")
    if (offloading := _offloading(settings)) is not None:
        found.append(offloading)
    return Routes(tuple(found), kv, other, auto)

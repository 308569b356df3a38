"""The container's entrypoint: turn ``OPTION_*`` env vars into the engine's config and vLLM's
KV-transfer config, check them, then exec LMI's entrypoint with the same arguments.

Runs before ``/usr/local/bin/dockerd-entrypoint.sh`` (``LMI_ENTRYPOINT`` names another next
stage, e.g. a stand-in in tests). What it does, in order:
1. ``OPTION_KV_TRANSFER_CONFIG`` must be JSON with a ``kv_role``. The seed's connector name
   ``LMCacheConnectorV1`` (and our own ``LMCacheExtConnector``) become ours: class + module path;
   other keys are kept; the rewritten JSON is exported back for LMI (which passes it to vLLM).
   Another connector (e.g. NixlConnector) is handed over unchanged and our checks are skipped.
2. ``OPTION_LMCACHE_CONFIG_FILE`` is also exported as ``LMCACHE_CONFIG_FILE`` (what the engine and
   LMCache read); the config (file + every ``OPTION_LMCACHE_<KEY>``) must validate.
3. The disk tier's directory is created if missing, must be writable and have room for
   ``max_local_disk_size`` (policy: an error, never a silent clamp; free space counts the cache's
   own files, which a restart reuses). O_DIRECT is probed there once and the result said once (a
   warning, not an error: the disk tier then runs buffered, as it says itself).
4. ``OPTION_LMCACHE_AUTO_CONFIG=true`` sizes the tiers (``autoconfig``) and exports
   ``OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE`` / ``_DISK_SIZE``, except where the user set one by env.
5. The effective config is logged one line per key with its source.
Any failure exits 2 with a message naming the env var, before LMI starts: an endpoint with a
broken cache config fails fast instead of serving without the cache. ``OPTION_LMCACHE_*`` set
without ``OPTION_KV_TRANSFER_CONFIG`` is such a failure (vLLM would silently run without it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_ext.config import (
    ConfigError,
    EngineConfig,
    config_file_from_env,
    describe,
    load_config,
    parse_bool,
)
from lmcache_ext.units import GIB

if TYPE_CHECKING:  # direct_io imports torch: the entrypoint loads it only for a disk tier
    from lmcache_ext.storage.direct_io import DirectoryCheck

log = logging.getLogger("lmcache_ext.entrypoint")

LMI_ENTRYPOINT_ENV = "LMI_ENTRYPOINT"
DEFAULT_LMI_ENTRYPOINT = "/usr/local/bin/dockerd-entrypoint.sh"
KV_ENV = "OPTION_KV_TRANSFER_CONFIG"
AUTO_ENVS = ("OPTION_LMCACHE_AUTO_CONFIG", "LMCACHE_AUTO_CONFIG")  # first set wins
OUR_CONNECTOR = "LMCacheExtConnector"
OUR_MODULE = "lmcache_ext.adapters.vllm_connector"
MAPPED_CONNECTORS = frozenset({"LMCacheConnectorV1", "LMCacheConnector", OUR_CONNECTOR})
KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")
EXIT_SETUP_ERROR = 2


class SetupError(Exception):
    """A problem that must stop the container before LMI starts; the text names the env var."""


@dataclass(frozen=True)
class Handover:
    """What the next stage gets: its environment, and whether our cache is on."""

    env: dict[str, str]
    cache_on: bool


# ------------------------------------------------------------------ OPTION_KV_TRANSFER_CONFIG


def translate_kv_config(text: str) -> tuple[dict, bool]:
    """(rewritten config, is ours). Raises SetupError naming OPTION_KV_TRANSFER_CONFIG."""
    try:
        kv = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SetupError(f"{KV_ENV}={text!r} is not valid JSON: {exc}") from exc
    if not isinstance(kv, dict):
        raise SetupError(f"{KV_ENV}={text!r} must be a JSON object")
    if kv.get("kv_role") not in KV_ROLES:
        raise SetupError(f"{KV_ENV}={text!r} needs \"kv_role\", one of {', '.join(KV_ROLES)}")
    name = kv.get("kv_connector")
    if not name:
        raise SetupError(f"{KV_ENV}={text!r} needs \"kv_connector\" (e.g. LMCacheConnectorV1)")
    if name not in MAPPED_CONNECTORS:
        return kv, False
    mapped = {**kv, "kv_connector": OUR_CONNECTOR, "kv_connector_module_path": OUR_MODULE}
    if name != OUR_CONNECTOR or kv.get("kv_connector_module_path") != OUR_MODULE:
        log.info("%s: kv_connector %s (module %s) -> %s (module %s)", KV_ENV, name,
                 kv.get("kv_connector_module_path", "vLLM's built-in"), OUR_CONNECTOR, OUR_MODULE)
    return mapped, True


# ------------------------------------------------------------------ config and disk checks


def _load(env: Mapping[str, str]) -> EngineConfig:
    named = config_file_from_env(env)
    if named and not os.path.isfile(named[0]):
        raise SetupError(f"{named[1]}={named[0]}: no such file")
    try:
        return load_config(env=env)
    except ConfigError as exc:
        where = f" (config file from {named[1]})" if named else ""
        raise SetupError(f"{exc}{where}") from exc


def _cache_bytes(directory: str) -> int:
    """Bytes of the files already under ``directory`` (a restart's cache, which it reuses)."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass  # removed while we walk: it no longer counts
    return total


def prepare_disk(config: EngineConfig) -> tuple[DirectoryCheck, int]:
    """Create the disk directory, check it is writable and probe O_DIRECT; returns that check
    and the bytes of the cache already in the directory."""
    # Imported here: direct_io imports torch, which only a disk tier needs.
    from lmcache_ext.storage.direct_io import check_directory

    found = check_directory(config.disk_dir)
    if found.problem:
        raise SetupError(f"local_disk {config.local_disk!r} ({config.source_of('local_disk')}): "
                         f"directory {config.disk_dir} is not usable: {found.problem}")
    return found, _cache_bytes(config.disk_dir)


def check_disk_room(config: EngineConfig, found: DirectoryCheck, existing: int) -> None:
    free = found.free_bytes + existing
    if config.disk_budget_bytes > free:
        raise SetupError(
            f"max_local_disk_size: {config.max_local_disk_size} GiB "
            f"({config.source_of('max_local_disk_size')}) does not fit in {config.disk_dir}: "
            f"{free / GIB:.1f} GiB free (cache files included); lower it, or set "
            f"OPTION_LMCACHE_AUTO_CONFIG=true to size it")


def say_odirect(config: EngineConfig, found: DirectoryCheck) -> None:
    reason = found.odirect_reason
    if config.use_odirect and not found.odirect:
        log.warning("disk probe: use_odirect is on but %s; the disk tier will run buffered", reason)
    elif config.use_odirect:
        log.info("disk probe: %s; use_odirect is on", reason)
    else:
        log.info("disk probe: %s; use_odirect is off", reason)


# ------------------------------------------------------------------ auto-config


def _auto_requested(env: Mapping[str, str]) -> bool:
    for name in AUTO_ENVS:
        if not env.get(name, "").strip():
            continue
        try:
            return parse_bool(env[name])
        except ValueError as exc:
            raise SetupError(f"{name}={env[name]!r}: {exc}") from exc
    return False


def apply_auto_config(env: dict[str, str], config: EngineConfig, existing: int) -> None:
    """Export auto-sized tier budgets into ``env``; a size the user set by env is kept."""
    from lmcache_ext.container.autoconfig import auto_size

    sizes = auto_size(env, config.disk_dir, existing)
    for line in sizes.lines:
        log.info("auto-config: %s", line)
    if sizes.problem:
        raise SetupError(f"OPTION_LMCACHE_AUTO_CONFIG: {sizes.problem}")
    for key, value in (("MAX_LOCAL_CPU_SIZE", sizes.cpu_gib),
                       ("MAX_LOCAL_DISK_SIZE", sizes.disk_gib)):
        set_by = [p + key for p in ("OPTION_LMCACHE_", "LMCACHE_") if p + key in env]
        if value is None:
            continue
        if set_by:
            log.info("auto-config: %s kept as %s (set by the user)", set_by[0], env[set_by[0]])
            continue
        env["OPTION_LMCACHE_" + key] = str(value)
        log.info("auto-config: OPTION_LMCACHE_%s=%s", key, value)


# ------------------------------------------------------------------ the whole hand-over


def _cache_vars(env: Mapping[str, str]) -> list[str]:
    return sorted(k for k in env if k.startswith("OPTION_LMCACHE_"))


def prepare(environ: Mapping[str, str]) -> Handover:
    """Everything before the exec; raises SetupError. Pure but for the disk checks and logs."""
    env = dict(environ)
    text = env.get(KV_ENV, "").strip()
    if not text:
        if _cache_vars(env):
            raise SetupError(f"{_cache_vars(env)[0]} is set but {KV_ENV} is not, so vLLM would "
                             f"run without the cache; set {KV_ENV}="
                             '{"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}')
        log.info("cache off: %s is not set; handing over unchanged", KV_ENV)
        return Handover(env, cache_on=False)
    kv, ours = translate_kv_config(text)
    if not ours:
        log.info("%s names kv_connector %s, not lmcache-ext: handing over unchanged", KV_ENV,
                 kv["kv_connector"])
        return Handover(env, cache_on=False)
    env[KV_ENV] = json.dumps(kv)
    named = config_file_from_env(env)
    if named and env.get("LMCACHE_CONFIG_FILE") != named[0]:
        log.info("LMCACHE_CONFIG_FILE=%s (from %s)", named[0], named[1])
        env["LMCACHE_CONFIG_FILE"] = named[0]
    config = _load(env)
    found, existing = prepare_disk(config) if config.disk_dir else (None, 0)
    if _auto_requested(env):
        apply_auto_config(env, config, existing)
        config = _load(env)
    if found is not None:
        check_disk_room(config, found, existing)
        say_odirect(config, found)
    for line in describe(config):
        log.info("config: %s", line)
    return Handover(env, cache_on=True)


def next_stage(env: Mapping[str, str]) -> str:
    name = env.get(LMI_ENTRYPOINT_ENV, DEFAULT_LMI_ENTRYPOINT)
    path = shutil.which(name)
    if path is None:
        raise SetupError(f"{LMI_ENTRYPOINT_ENV}={name}: not an executable file")
    return path


def main(argv: list[str] | None = None) -> int:
    """Prepare, then replace this process with the next stage; returns only on failure."""
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("LMCACHE_LOG_LEVEL", "INFO").upper(),
                        format="lmcache-ext entrypoint: %(levelname)s %(message)s")
    try:
        handover = prepare(os.environ)
        target = next_stage(handover.env)
    except SetupError as exc:
        log.error("%s", exc)
        log.error("not starting the model server: fix the setting above")
        return EXIT_SETUP_ERROR
    log.info("exec %s %s (cache %s)", target, " ".join(argv), "on" if handover.cache_on
             else "off")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(target, [target, *argv], handover.env)
    return 0  # not reached: execve replaces the process


if __name__ == "__main__":
    sys.exit(main())

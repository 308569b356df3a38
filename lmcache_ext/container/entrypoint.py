"""The container's entrypoint: read LMI's settings the way LMI does, check the cache config they
switch on, then exec LMI's entrypoint with the same arguments.

Runs before ``/usr/local/bin/dockerd-entrypoint.sh`` (``LMI_ENTRYPOINT`` names another next
stage, e.g. a stand-in in tests). LMI's settings are ``serving.properties`` in the model
directory over ``OPTION_*`` env vars (``lmi_settings``). LMCache is switched on by any of:
``option.kv_transfer_config`` naming ``LMCacheConnectorV1`` (env or serving.properties),
``option.lmcache_auto_config=true``, ``option.kv_offloading_backend=lmcache``. Whichever it is,
vLLM runs our connector in LMCache's place: the ``lmcache_ext`` vLLM plugin
(``adapters/vllm/plugin``) resolves LMCache's names to ours in every vLLM process, so this
entrypoint rewrites nothing for that; it says once which route switched the cache on, and:
1. checks the route's settings (JSON with a ``kv_role``; a size for the offloading backend);
2. resolves ``option.lmcache_config_file`` against the model directory and exports it as
   ``OPTION_LMCACHE_CONFIG_FILE`` / ``LMCACHE_CONFIG_FILE`` (absolute), and exports
   serving.properties' ``option.lmcache_<key>`` as ``OPTION_LMCACHE_<KEY>`` (the engine reads env);
3. auto-config (``option.lmcache_auto_config=true``) gives LMI's documented result with our
   cache: LMCache's connector name, a disk tier in ``/tmp/cache`` with O_DIRECT, both tiers
   sized at start (``autoconfig``), and an error when a config file is also named (LMI's rule).
   Set by env, the variable is consumed here so LMI does not size a second time;
4. validates the config, creates the disk directory (writable, room for its budget, O_DIRECT
   probed and said once) and logs the effective config one line per key with its source;
5. LMI's stateful sessions (``lmi_sessions``): ``OPTION_ENABLE_STATEFUL_SESSIONS=True`` (which
   LMI reads as off) passed on as ``true``, and ``OPTION_ENTRYPOINT`` pointed at lmcache-ext's
   LMI handler where LMI would run its vLLM service, so sessions pin their conversation.
Any failure exits 2 with a message naming the env var or the serving.properties line, before LMI
starts. ``LMCACHE_EXT_TAKEOVER=false`` hands everything over unchanged: LMCache itself runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lmcache_ext.adapters.vllm.takeover import OUR_CONNECTOR, TAKEOVER_ENV, takeover_enabled
from lmcache_ext.config import (
    TABLE,
    ConfigError,
    EngineConfig,
    config_file_from_env,
    describe,
    load_config,
)
from lmcache_ext.container.lmi_sessions import (
    HandlerMissing,
    normalise_sessions_flag,
    prepare_sessions,
)
from lmcache_ext.container.lmi_settings import LmiSettings, SettingsError, read_settings
from lmcache_ext.container.routes import (
    LMI_AUTO_KV,
    SEED_KV_TRANSFER_CONFIG,
    RouteError,
    Routes,
    find_routes,
)
from lmcache_ext.units import GIB

if TYPE_CHECKING:  # direct_io imports torch: the entrypoint loads it only for a disk tier
    from lmcache_ext.storage.direct_io import DirectoryCheck

log = logging.getLogger("lmcache_ext.entrypoint")

LMI_ENTRYPOINT_ENV = "LMI_ENTRYPOINT"
DEFAULT_LMI_ENTRYPOINT = "/usr/local/bin/dockerd-entrypoint.sh"
KV_ENV = "OPTION_KV_TRANSFER_CONFIG"
AUTO_ENV = "OPTION_LMCACHE_AUTO_CONFIG"
CONFIG_FILE_ENV = "OPTION_LMCACHE_CONFIG_FILE"
PLUGIN_NAME = "lmcache_ext"  # the entry point's name in pyproject.toml
# vLLM (0.32+) waits this long for its workers at shutdown before it terminates them.
WORKER_SHUTDOWN_ENV = "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"
# LMI's auto-config result besides the sizes (djl_python/lmcache_utils.py: LMCACHE_DIR, O_DIRECT).
AUTO_DEFAULTS = {"LOCAL_DISK": "file:///tmp/cache/", "EXTRA_CONFIG": '{"use_odirect": true}'}
EXIT_SETUP_ERROR = 2
PRE_SIZING = {"max_local_disk_size": 1.0}  # any valid size: replaced by auto-config's


class SetupError(Exception):
    """A problem that must stop the container before LMI starts; the text names the setting."""


@dataclass(frozen=True)
class Handover:
    """What the next stage gets: its environment, and whether our cache is on."""

    env: dict[str, str]
    cache_on: bool


# ------------------------------------------------------------------ config and disk checks


def _load(env: Mapping[str, str], exported: Mapping[str, str],
          overrides: Mapping[str, float] | None = None) -> EngineConfig:
    """The config the engine will build from ``env``; ``exported``: env var -> the
    serving.properties line it was copied from, so an error names the line."""
    named = config_file_from_env(env)
    if named and not os.path.isfile(named[0]):
        raise SetupError(f"{exported.get(named[1], named[1])}={named[0]}: no such file")
    try:
        return load_config(env=env, overrides=overrides)
    except ConfigError as exc:
        notes = [f"{var} comes from {line}" for var, line in exported.items() if var in str(exc)]
        where = f" (config file from {exported.get(named[1], named[1])})" if named else ""
        raise SetupError(f"{exc}{where}" + "".join(f"\n  ({n})" for n in notes)) from exc


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
            f"{AUTO_ENV}=true to size it")


def say_odirect(config: EngineConfig, found: DirectoryCheck) -> None:
    reason = found.odirect_reason
    if config.use_odirect and not found.odirect:
        log.warning("disk probe: use_odirect is on but %s; the disk tier will run buffered", reason)
    elif config.use_odirect:
        log.info("disk probe: %s; use_odirect is on", reason)
    else:
        log.info("disk probe: %s; use_odirect is off", reason)


# ------------------------------------------------------------------ LMI's settings into env


def export_settings(env: dict[str, str], settings: LmiSettings) -> dict[str, str]:
    """Put what the engine must read into ``env``: the config file made absolute against the
    model directory, and serving.properties' ``option.lmcache_<key>`` (which LMI does not
    export) as ``OPTION_LMCACHE_<KEY>``, and LMI's own options that are engine keys too
    (``option.enable_stateful_sessions``: the table's ``lmi_option``) as ``OPTION_<NAME>``, so
    vLLM's workers see what LMI's handler sees. Returns env var -> serving.properties line."""
    exported: dict[str, str] = {}
    shared = {key.lmi_option for key in TABLE if key.lmi_option}
    for name, option in settings.options.items():
        var = "OPTION_" + name.upper()
        ours = name.startswith("lmcache_") or name in shared
        if ours and not option.source.startswith("env ") and \
                name not in ("lmcache_config_file", "lmcache_auto_config"):
            env[var] = option.value
            exported[var] = option.source
    if (named := settings.config_file()) is not None:
        raw = settings.get("lmcache_config_file")
        if raw.value.strip() != named.value:
            log.info("%s=%s resolves to %s (against the model directory, as LMI does)",
                     named.source, raw.value.strip(), named.value)
        env[CONFIG_FILE_ENV] = env["LMCACHE_CONFIG_FILE"] = named.value
        exported[CONFIG_FILE_ENV] = named.source
    elif (own := config_file_from_env(env)) is not None:
        env["LMCACHE_CONFIG_FILE"] = own[0]
    return exported


def give_workers_time_to_drain(env: dict[str, str], config: EngineConfig) -> None:
    """On SIGTERM each vLLM worker drains its sessions' pins to the shared tier for up to
    ``drain_timeout_s`` (the connector's shutdown), but vLLM's executor waits only
    ``VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS`` (vLLM 0.32+, default 5 s) before it terminates its
    workers. With sessions, a shared tier and a drain, an unset variable is set to cover the
    drain; a smaller one is kept and said. vLLM 0.23 (LMI lmi27) reads no such variable: its
    workers get about 8 s (4 s, then SIGTERM and 4 s more), so its drain is cut there."""
    if not (config.enable_stateful_sessions and config.remote_url and config.drain_timeout_s):
        return
    wanted = math.ceil(config.drain_timeout_s)
    given = env.get(WORKER_SHUTDOWN_ENV, "").strip()
    if not given:
        env[WORKER_SHUTDOWN_ENV] = str(wanted)
        log.info("%s=%d: vLLM's workers get drain_timeout_s to write the sessions' KV to the "
                 "shared tier on SIGTERM (vLLM 0.23 ignores it: about 8 s there)",
                 WORKER_SHUTDOWN_ENV, wanted)
    elif not given.isdigit() or int(given) < wanted:
        log.warning("%s=%s is shorter than drain_timeout_s=%s: vLLM may stop its workers before "
                    "their sessions' KV reaches the shared tier", WORKER_SHUTDOWN_ENV, given,
                    config.drain_timeout_s)


def check_plugins_allowed(env: Mapping[str, str]) -> None:
    allowed = env.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in [p.strip() for p in allowed.split(",")]:
        raise SetupError(f"VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}, the plugin that "
                         f"makes vLLM run lmcache-ext: add it, or set {TAKEOVER_ENV}=false")


# ------------------------------------------------------------------ auto-config


def start_auto_config(env: dict[str, str], settings: LmiSettings, routes: Routes) -> None:
    """LMI's rule (a config file too is an error), its connector and disk tier; consume the
    variable when it came from env so that LMI does not size the tiers a second time."""
    if (named := settings.get("lmcache_config_file")) is not None:
        raise SetupError(f"{routes.auto.source}=true and {named.source} are both set: LMI "
                         "refuses auto-configuration with a config file; remove one")
    if routes.kv is None:
        env[KV_ENV] = json.dumps(LMI_AUTO_KV)
    for key, value in AUTO_DEFAULTS.items():
        if not any(p + key in env for p in ("OPTION_LMCACHE_", "LMCACHE_")):
            env["OPTION_LMCACHE_" + key] = value
            log.info("auto-config: OPTION_LMCACHE_%s=%s (as LMI's auto-config)", key, value)
    if routes.auto_from_env:
        env.pop(AUTO_ENV)
        log.info("auto-config: %s consumed here (LMI's own sizing does not run)", AUTO_ENV)
    else:
        log.warning("auto-config: %s is in serving.properties, so LMI's auto-config runs too and "
                    "exports LMCACHE_* sizes; the OPTION_LMCACHE_* sizes set here win",
                    routes.auto.source)


def apply_auto_config(env: dict[str, str], settings: LmiSettings, config: EngineConfig,
                      existing: int) -> None:
    """Export auto-sized tier budgets into ``env``; a size the user set by env is kept."""
    from lmcache_ext.container.autoconfig import auto_size

    sizes = auto_size(settings, config.disk_dir, existing)
    for line in sizes.lines:
        log.info("auto-config: %s", line)
    if sizes.problem:
        raise SetupError(f"{AUTO_ENV}: {sizes.problem}")
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


def _routes(env: Mapping[str, str]) -> tuple[LmiSettings, Routes]:
    try:
        settings = read_settings(env)
        return settings, find_routes(settings)
    except (SettingsError, RouteError) as exc:
        raise SetupError(str(exc)) from exc


def _no_route(env: Mapping[str, str], settings: LmiSettings, routes: Routes) -> Handover:
    normalise_sessions_flag({}, settings, fix=False)  # said, never changed: handed over as is
    if routes.other_connector:
        log.info("kv_transfer_config names kv_connector %s: not taken over, handing over "
                 "unchanged", routes.other_connector)
        return Handover(env, cache_on=False)
    cache = sorted(o.source for n, o in settings.options.items()
                   if n.startswith("lmcache_") and n != "lmcache_auto_config")
    if cache:
        raise SetupError(f"{cache[0]} is set but nothing switches the cache on, so vLLM would "
                         f"run without it; set {KV_ENV}={SEED_KV_TRANSFER_CONFIG} "
                         f"(or {AUTO_ENV}=true)")
    log.info("cache off: no kv_transfer_config, auto-config or offloading backend names "
             "LMCache; handing over unchanged")
    return Handover(env, cache_on=False)


def prepare(environ: Mapping[str, str]) -> Handover:
    """Everything before the exec; raises SetupError. Pure but for the disk checks and logs."""
    env = dict(environ)
    try:
        takeover = takeover_enabled(env)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    settings, routes = _routes(env)
    if not routes.found:
        return _no_route(env, settings, routes)
    on_by = ", ".join(routes.found)
    if not takeover:
        log.info("%s=false: LMCache itself runs (switched on by %s); lmcache-ext checks nothing",
                 TAKEOVER_ENV, on_by)
        return Handover(env, cache_on=False)
    check_plugins_allowed(env)
    log.info("LMCache is switched on by %s: vLLM runs lmcache-ext's %s in its place (the %s "
             "vLLM plugin; %s=false runs LMCache)", on_by, OUR_CONNECTOR, PLUGIN_NAME,
             TAKEOVER_ENV)
    exported = export_settings(env, settings)
    try:
        prepare_sessions(env, settings)
    except HandlerMissing as exc:
        raise SetupError(str(exc)) from exc
    if routes.auto is not None:
        start_auto_config(env, settings, routes)
    # Before sizing, a disk tier may lack its size: that load only finds the directory.
    config = _load(env, exported, PRE_SIZING if routes.auto is not None else None)
    found, existing = prepare_disk(config) if config.disk_dir else (None, 0)
    if routes.auto is not None:
        apply_auto_config(env, settings, config, existing)
        config = _load(env, exported)
    if found is not None:
        check_disk_room(config, found, existing)
        say_odirect(config, found)
    give_workers_time_to_drain(env, config)
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

"""LMI's stateful sessions at container start: its ``enable_stateful_sessions`` pitfall, and the
entry point that lets sessions pin their conversation in lmcache-ext's cache.

1. LMI's vLLM service reads only ``"true"`` as on (``adapters/lmi/facts``). ``True`` set by env
   (``OPTION_ENABLE_STATEFUL_SESSIONS=True``) is passed on as ``true``, with a warning: the user
   meant on, and on is LMI's own default. Set in serving.properties (which wins over env and is
   not ours to rewrite), it is a warning: our handler passes ``true`` on when it runs, LMI's
   service alone would run without sessions.
2. With the cache on and sessions on, LMI must run our handler (``handlers/lmcache_ext_vllm.py``,
   which wraps LMI's vLLM service) for sessions to pin. ``OPTION_ENTRYPOINT`` naming LMI's vLLM
   service, or unset while ``option.async_mode`` is true and the model has no ``model.py``
   (then LMI picks that service itself), becomes the handler's path. An entry point named in
   serving.properties wins over env: a warning says what to write there. Any other entry point
   is the user's: said once, left alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

from lmcache_ext.adapters.lmi.facts import (
    LMI_VLLM_SERVICE,
    SESSIONS_ON,
    SESSIONS_OPTION,
    read_sessions_flag,
)
from lmcache_ext.container.lmi_settings import LmiSettings

log = logging.getLogger("lmcache_ext.entrypoint")

HANDLER_ENV = "LMI_HANDLER_FILE"  # the handler file in the image (Dockerfile sets it)
DEFAULT_HANDLER = "/opt/lmcache-ext/handlers/lmcache_ext_vllm.py"
ENTRYPOINT_ENV = "OPTION_ENTRYPOINT"
SESSIONS_ENV = "OPTION_" + SESSIONS_OPTION.upper()


class HandlerMissing(Exception):
    """The handler file the image should hold is not there; the text names the variable."""


def handler_path(env: Mapping[str, str]) -> str:
    path = env.get(HANDLER_ENV, DEFAULT_HANDLER)
    if not os.path.isfile(path):
        raise HandlerMissing(f"{HANDLER_ENV}={path}: lmcache-ext's LMI handler is not there "
                             f"(the image copies handlers/ to /opt/lmcache-ext/handlers)")
    return path


def normalise_sessions_flag(env: dict[str, str], settings: LmiSettings, fix: bool = True) -> bool:
    """Warn about (and, set by env and ``fix``, fix) ``enable_stateful_sessions=True``; whether
    the user meant sessions on. ``fix`` is off where the container hands over unchanged."""
    option = settings.get(SESSIONS_OPTION)
    flag = read_sessions_flag(option.value if option is not None else None)
    if not flag.pitfall:
        return flag.meant_on
    if not fix:
        log.warning("%s=%s: LMI reads only 'true' as on and runs without stateful sessions: "
                    "write true", option.source, option.value)
    elif option.source == f"env {SESSIONS_ENV}":
        env[SESSIONS_ENV] = SESSIONS_ON
        log.warning("%s=%s: LMI reads only 'true' as on and would run without stateful "
                    "sessions; passing %s=true on", SESSIONS_ENV, option.value, SESSIONS_ENV)
    else:
        log.warning("%s=%s: LMI reads only 'true' as on; lmcache-ext's LMI handler passes 'true' "
                    "on to LMI when it runs, LMI's own service would run without stateful "
                    "sessions: write true", option.source, option.value)
    return True


def _lmi_picks_its_vllm_service(settings: LmiSettings) -> bool:
    """No entry point named: LMI runs its vLLM service in async mode unless a model.py is
    there (DJL's PyModel: a model file first, then the recommended entry point)."""
    async_mode = settings.get("async_mode")
    return async_mode is not None and async_mode.value.strip().lower() == "true" and \
        not os.path.isfile(os.path.join(settings.model_dir, "model.py"))


def choose_entry_point(env: dict[str, str], settings: LmiSettings) -> None:
    """Point LMI at our handler where LMI would run its vLLM service (see the module doc).
    Raises HandlerMissing when it should and the file is not there."""
    in_file = settings.get("entryPoint")  # serving.properties keeps the name's case
    in_env = env.get(ENTRYPOINT_ENV)
    if in_file is not None:
        named, source = in_file.value.strip(), in_file.source
    elif in_env is not None:
        named, source = in_env.strip(), f"env {ENTRYPOINT_ENV}"
    else:
        named, source = None, None
    handler = env.get(HANDLER_ENV, DEFAULT_HANDLER)
    if named == handler:
        log.info("sessions: %s is lmcache-ext's LMI handler: sessions pin their conversation",
                 source)
        return
    if named in (LMI_VLLM_SERVICE, None) and in_file is None and \
            (named is not None or _lmi_picks_its_vllm_service(settings)):
        env[ENTRYPOINT_ENV] = handler_path(env)
        log.info("sessions: %s=%s (lmcache-ext's LMI handler around %s): sessions pin their "
                 "conversation in the cache", ENTRYPOINT_ENV, env[ENTRYPOINT_ENV],
                 LMI_VLLM_SERVICE)
    elif named == LMI_VLLM_SERVICE:
        log.warning("sessions: %s=%s wins over env, so LMI runs its vLLM service without "
                    "lmcache-ext's handler and sessions pin nothing; write option.entryPoint=%s",
                    source, named, handler)
    elif named is not None:
        log.info("sessions: %s=%s is your own entry point: sessions pin nothing unless it "
                 "runs lmcache-ext's handler (%s)", source, named, handler)
    else:
        log.info("sessions: no entry point and option.async_mode is not true (or a model.py "
                 "is there): LMI's vLLM service with lmcache-ext's handler needs %s=%s and "
                 "OPTION_ASYNC_MODE=true for sessions to pin", ENTRYPOINT_ENV, handler)


def prepare_sessions(env: dict[str, str], settings: LmiSettings) -> None:
    """Both steps, for a container whose cache is on. Raises HandlerMissing."""
    if normalise_sessions_flag(env, settings):
        choose_entry_point(env, settings)
    else:
        log.info("sessions: %s is off: LMI serves no stateful sessions",
                 settings.get(SESSIONS_OPTION).source)

"""How a SageMaker session's id travels from the LMI handler to the vLLM connector: one key in
the request's ``kv_transfer_params``, which vLLM carries unchanged from the OpenAI request
(``CompletionRequest`` / ``ChatCompletionRequest``) through ``SamplingParams.extra_args`` to the
engine core's ``Request.kv_transfer_params``, where the connector's scheduler side reads it.

Only the handler may set the key: it attaches the id of a session LMI's session manager knows and
strips the key from whatever a client sent, so a client cannot pin memory under a made-up
session. Imports neither vLLM nor LMI: both the handler's process and the scheduler use it.
"""

from __future__ import annotations

import logging
from typing import Any

from lmcache_ext.sessions.protocol import SessionError, check_session_id

log = logging.getLogger(__name__)

SESSION_KEY = "lmcache_ext_session"  # in kv_transfer_params: the session's id


def with_session(params: Any, session_id: str | None) -> dict[str, Any] | None:
    """A request's ``kv_transfer_params`` with our key set to ``session_id`` (a checked id), or
    removed when ``session_id`` is None; other keys are kept. None when nothing is left.
    Raises ``SessionError`` for a malformed id, ValueError when ``params`` is not an object."""
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"kv_transfer_params must be a JSON object, got {type(params).__name__}")
    kept = {k: v for k, v in (params or {}).items() if k != SESSION_KEY}
    if session_id is not None:
        kept[SESSION_KEY] = check_session_id(session_id)
    return kept or None


def session_of(params: Any) -> str | None:
    """The session id a request carries in its ``kv_transfer_params``; None when it carries
    none. A malformed one is logged and ignored (the request runs without a session)."""
    if not isinstance(params, dict) or params.get(SESSION_KEY) is None:
        return None
    value = params[SESSION_KEY]
    try:
        return check_session_id(value) if isinstance(value, str) else _bad(value)
    except SessionError as exc:
        log.warning("lmcache-ext: ignoring a request's session: %s", exc)
        return None


def _bad(value: Any) -> str:
    raise SessionError(f"{SESSION_KEY}: expected a string, got {type(value).__name__}")

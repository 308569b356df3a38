"""The LMI custom handler's logic: LMI's vLLM service with session pins in our connector.

``handlers/lmcache_ext_vllm.py`` (the file DJL loads as ``option.entryPoint``) wraps LMI's own
``djl_python.lmi_vllm.vllm_async_service`` in a ``SessionHandler``. LMI keeps doing what it does
for SageMaker stateful sessions (create: ``{"requestType": "NEW_SESSION"}``, close: ``CLOSE``, its
session manager, the response headers); the handler adds what LMI lacks:

- an inference request that names a session LMI's session manager knows
  (``X-Amzn-SageMaker-Session-Id``) carries the id to our connector in its ``kv_transfer_params``
  (``session_params``; LMI passes the field through to vLLM: top level for ``prompt`` and
  ``messages`` payloads, inside ``parameters`` for LMI's ``inputs`` schema). The connector's
  workers then keep the conversation pinned in their CPU tier. A session id a client put into
  ``kv_transfer_params`` itself is removed: only a session LMI knows can pin;
- after LMI handles a ``CLOSE``, the handler tells every worker to unpin the session, over the
  connector's own worker channel (``AllRanksClient.release_session``), and logs what was freed. A
  close that does not reach a worker (or a session LMI expires by itself) is covered by the
  workers' own expiry (``sessions``);
- a lookup (custom attribute ``lmcache-ext-lookup=true``, as ``lmcache-ext warm`` sends first;
  DJL makes it a request property) is answered from the workers' caches without generating
  (``lookup``), in LMI's own wire format; where that is not possible (no connector, the
  lookup cannot be built, tokenising or the answer fails) LMI serves it (one generated token);
- LMI's ``enable_stateful_sessions`` property reads only ``"true"`` as on: ``True`` is
  normalised (with a warning) before LMI's service sees it (``facts``);
- LMI's session manager builds a boto3 CloudWatch client, which fails without an AWS region
  (the model would not load): where none is set the handler sets one first (``facts``).

Everything else (requests without a session, batches, non-JSON bodies, streaming, LoRA) reaches
LMI unchanged. When vLLM does not run our connector, the handler only normalises the flag.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from lmcache_ext.adapters.lmi.facts import SESSIONS_OPTION, read_sessions_flag, region_for_lmi
from lmcache_ext.adapters.lmi.lookup import LmiLookup, is_lookup, lookup_output
from lmcache_ext.adapters.session_params import with_session
from lmcache_ext.sessions.protocol import (
    CLOSE,
    NEW_SESSION,
    REQUEST_TYPE,
    SESSION_HEADER,
    SessionError,
    check_session_id,
)

log = logging.getLogger(__name__)
# Set while a request is inside SessionHandler.handle: LMI 0.36 calls a model.py's handle from
# inside its own, so a copy of the handler placed there would otherwise call itself forever.
_INSIDE = contextvars.ContextVar("lmcache_ext_lmi_handler_inside", default=False)
PARAMS_FIELD = "kv_transfer_params"
LMI_EXPORTS = ("register_adapter", "update_adapter", "unregister_adapter")  # besides handle


def lmi_exports(service_module: Any) -> dict[str, Any]:
    """The functions besides ``handle`` that DJL may call on LMI's service module (adapters),
    for the handler file to offer under the same names."""
    return {name: getattr(service_module, name) for name in LMI_EXPORTS
            if callable(getattr(service_module, name, None))}


def normalise_properties(properties: dict[str, Any]) -> None:
    """Make LMI's service read ``enable_stateful_sessions`` as the user meant: ``True`` (any
    case) becomes ``"true"``, with a warning; anything else is left as it is."""
    value = properties.get(SESSIONS_OPTION)
    flag = read_sessions_flag(value if isinstance(value, str) else None)
    if flag.pitfall:
        log.warning("lmcache-ext: %s=%r: LMI reads only 'true' as on, so it would run without "
                    "stateful sessions; passing 'true' on (set it to 'true' to silence this)",
                    SESSIONS_OPTION, value)
        properties[SESSIONS_OPTION] = flag.normalised


def ensure_aws_region(env: dict[str, str] | None = None) -> None:
    """Give LMI's session manager the AWS region its boto3 CloudWatch client needs, where none
    is set (``facts.region_for_lmi``), with a warning; ``env`` defaults to ``os.environ``.
    Without boto3 LMI builds no client: nothing to do."""
    try:
        import botocore.session
    except ImportError:
        return
    env = os.environ if env is None else env
    fix = region_for_lmi(env, _configured_region(botocore.session.Session()))
    if fix is not None:
        env[fix.name] = fix.value
        log.warning("lmcache-ext: %s", fix.reason)


def _configured_region(session: Any) -> str | None:
    """The region a botocore session finds (its env var or config files); None without one."""
    try:
        return session.get_config_variable("region")
    except Exception as exc:  # a broken config file: boto3 fails in LMI too, and says why
        log.warning("lmcache-ext: boto3 cannot read its config for a region: %s", exc)
        return None


def attach_session(payload: dict[str, Any], session_id: str | None) -> dict[str, Any]:
    """``payload`` (a decoded LMI request) with ``kv_transfer_params`` naming ``session_id``
    where LMI reads it (LMI's order: ``prompt``, then ``inputs`` -> its ``parameters``, then
    ``messages``), and without a session a client put there. Other payloads are returned as
    they are. Raises ValueError for a ``kv_transfer_params`` (or ``parameters``) that is not an
    object, and ``SessionError`` for a malformed id."""
    if "prompt" in payload:
        return _with_params(payload, session_id)
    if "inputs" in payload:
        parameters = payload.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ValueError(f"parameters must be a JSON object, got {type(parameters).__name__}")
        parameters = _with_params(parameters, session_id)
        rest = {k: v for k, v in payload.items() if k != "parameters"}
        return {**rest, "parameters": parameters} if parameters or "parameters" in payload \
            else rest
    if "messages" in payload:
        return _with_params(payload, session_id)
    return payload  # a session request, or one LMI refuses: nothing of it goes to vLLM


def _with_params(holder: dict[str, Any], session_id: str | None) -> dict[str, Any]:
    params = with_session(holder.get(PARAMS_FIELD), session_id)
    rest = {k: v for k, v in holder.items() if k != PARAMS_FIELD}
    return {**rest, PARAMS_FIELD: params} if params is not None else rest


def json_body(inputs: Any) -> dict[str, Any] | None:
    """The request's body as LMI decodes it when it is a JSON object (no content type or a JSON
    one); None for anything else, which the handler passes on untouched."""
    content_type = inputs.get_property("Content-Type")
    if content_type and "application/json" not in content_type:
        return None
    raw = inputs.get_as_bytes()
    if not raw:
        return None
    try:
        body = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # LMI answers the malformed body itself
    return body if isinstance(body, dict) else None


def replace_body(inputs: Any, body: dict[str, Any]) -> None:
    """Put ``body`` (JSON) where LMI reads the request's body (content ``data``, else the first
    entry)."""
    content = inputs.get_content()
    keys, values = content.get_keys(), content.get_values()
    index = keys.index("data") if "data" in keys else 0
    values[index] = bytearray(json.dumps(body).encode("utf-8"))


class SessionReleaser:
    """Unpins a closed session on every worker rank of one vLLM engine, over the connector's
    worker channel. Thread-safe (one request at a time on the channel)."""

    def __init__(self, engine_key: str, world_size: int, timeout_s: float, backoff_s: float):
        from lmcache_ext.adapters.vllm.channel import AllRanksClient

        self._caches = AllRanksClient(engine_key, world_size, timeout_s, backoff_s)
        self._lock = threading.Lock()

    @staticmethod
    def for_engine(vllm_config: Any) -> SessionReleaser | None:
        """The releaser for the engine ``vllm_config`` describes; None (said once) where vLLM
        does not run our connector or the connector's config has sessions off."""
        from lmcache_ext.adapters.vllm.connector import LMCacheExtConnector
        from lmcache_ext.adapters.vllm.takeover import runs_our_connector

        if not runs_our_connector(vllm_config):
            log.info("lmcache-ext handler: vLLM does not run lmcache-ext's connector; sessions "
                     "are LMI's alone (no pins)")
            return None
        config = LMCacheExtConnector.effective_config(vllm_config)
        if not config.enable_stateful_sessions:
            log.info("lmcache-ext handler: enable_stateful_sessions is off in lmcache-ext's "
                     "config (%s): sessions pin nothing", config.source_of(SESSIONS_OPTION))
            return None
        world = vllm_config.parallel_config.tensor_parallel_size
        return SessionReleaser(str(vllm_config.kv_transfer_config.engine_id), world,
                               config.worker_lookup_timeout_s, config.worker_lookup_backoff_s)

    def release(self, session_id: str) -> list[int | None]:
        """Bytes each rank unpinned (None: it did not answer in time)."""
        with self._lock:
            return self._caches.release_session(session_id)

    def close(self) -> None:
        with self._lock:
            self._caches.close()


class SessionHandler:
    """``handle(inputs)`` for DJL: LMI's service plus session pins (see the module doc).

    ``inner`` is LMI's ``handle``; ``service`` its ``VLLMHandler`` (read for ``initialized``,
    ``session_manager`` and ``vllm_engine.vllm_config``). Used from DJL's event loop."""

    def __init__(self, inner: Callable[[Any], Awaitable[Any]], service: Any,
                 releaser_for: Callable[[Any], SessionReleaser | None] | None = None,
                 lookup_for: Callable[[Any], LmiLookup | None] | None = None):
        self._inner = inner
        self._service = service
        self._releaser_for = releaser_for or SessionReleaser.for_engine
        self._lookup_for = lookup_for or LmiLookup.for_engine
        self._bound = False
        self.releaser: SessionReleaser | None = None
        self.lookup: LmiLookup | None = None

    async def handle(self, inputs: Any) -> Any:
        """DJL's entry: the answer of LMI's service. Called again from inside LMI's service
        (the handler used as LMI's model.py custom handler), it answers None, which LMI reads
        as 'no custom answer' and serves the request itself."""
        if _INSIDE.get():
            return None
        token = _INSIDE.set(True)
        try:
            return await self._handle(inputs)
        finally:
            _INSIDE.reset(token)

    async def _handle(self, inputs: Any) -> Any:
        if not self._bound:
            normalise_properties(inputs.get_properties())
            ensure_aws_region()
            result = await self._inner(inputs)
            self._bind()
            return result
        if self.lookup is not None and not inputs.is_empty() and not inputs.is_batch() and \
                is_lookup(inputs):
            answer = await self._answer_lookup(inputs)
            if answer is not None:
                return answer
        if self.releaser is None or inputs.is_empty() or inputs.is_batch():
            return await self._inner(inputs)
        body = json_body(inputs)
        if body is None:
            return await self._inner(inputs)
        header = inputs.get_property(SESSION_HEADER)
        if body.get(REQUEST_TYPE) == CLOSE:
            result = await self._inner(inputs)  # LMI closes it and answers the client
            await self._unpin(header)
            return result
        try:
            changed = attach_session(body, self._known_session(header))
        except (ValueError, SessionError) as exc:
            log.info("lmcache-ext handler: request passed on without a session: %s", exc)
            changed = body
        if changed != body:
            replace_body(inputs, changed)
        return await self._inner(inputs)

    def _bind(self) -> None:
        """Once LMI's service is up: find our connector through its engine's config."""
        if not getattr(self._service, "initialized", False):
            return
        self._bound = True
        engine = getattr(self._service, "vllm_engine", None)
        self.releaser = self._releaser_for(engine.vllm_config) if engine is not None else None
        try:
            self.lookup = self._lookup_for(engine) if engine is not None else None
        except Exception:  # lookups then reach LMI, which generates: warm's fallback
            log.exception("lmcache-ext handler: lookups cannot be answered here; LMI serves "
                          "them (one generated token each)")
        if self.releaser is not None and getattr(self._service, "session_manager", None) is None:
            log.warning("lmcache-ext handler: LMI runs without stateful sessions (%s is not "
                        "'true'): nothing will be pinned", SESSIONS_OPTION)

    async def _answer_lookup(self, inputs: Any) -> Any:
        """The lookup's ``Output``; None (LMI serves the request) where its body is not a
        prompt the lookup can read, or the lookup or its answer fails."""
        body = json_body(inputs)
        try:
            answer = await self.lookup.answer_async(body) if body is not None else None
            return lookup_output(answer) if answer is not None else None
        except Exception:  # never a failed request for a lookup: LMI serves it instead
            log.exception("lmcache-ext handler: a lookup failed; LMI serves the request")
            return None

    def _known_session(self, header: str | None) -> str | None:
        """``header`` if it names a session LMI's session manager holds, else None (LMI
        answers a malformed one itself; an unknown one is served without a session)."""
        manager = getattr(self._service, "session_manager", None)
        if manager is None or not header or header.strip() == NEW_SESSION:
            return None
        try:
            session_id = check_session_id(header.strip())
            return session_id if manager.get_session(session_id) is not None else None
        except (SessionError, ValueError):
            return None

    async def _unpin(self, header: str | None) -> None:
        try:
            session_id = check_session_id((header or "").strip())
        except SessionError:
            return  # LMI refused the close; there is nothing we could have pinned
        try:
            freed = await asyncio.to_thread(self.releaser.release, session_id)
        except Exception:  # the client's close succeeded in LMI: never fail it for our pins
            log.exception("lmcache-ext handler: session %s closed, but unpinning it failed: "
                          "its pins go when the session expires on the workers", session_id)
            return
        missing = [rank for rank, n in enumerate(freed) if n is None]
        if missing:
            log.warning("lmcache-ext handler: session %s closed; worker rank(s) %s did not "
                        "answer: their pins go when the session expires there", session_id,
                        missing)
        log.info("lmcache-ext handler: session %s closed: %d bytes unpinned over %d rank(s)",
                 session_id, sum(n or 0 for n in freed), len(freed))

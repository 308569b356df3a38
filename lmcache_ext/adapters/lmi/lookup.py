"""Lookups in LMI: what the connector's workers hold of a request's prompt, without generating.

``lmcache-ext warm`` first sends each document with the SageMaker custom attribute
``lmcache-ext-lookup=true`` (``X-Amzn-SageMaker-Custom-Attributes``, which SageMaker forwards as
it is). The built-in server answers it itself; in LMI the handler (``handler``) hands it here
when vLLM runs our connector. DJL's Java front end does not pass the header on: it splits it on
``;`` into request properties (``lmcache-ext-lookup`` = ``true``) and drops an item without
``=``; a front end that passes the header (a test's, the router's) is read too (``is_lookup``).
The request's prompt is tokenised as vLLM does for that payload
(``prompt`` / ``inputs``: text with the tokenizer's special tokens, or token ids as they are;
``messages``: the tokenizer's chat template with the generation prompt), hashed as the
connector's scheduler side hashes it (``vllm_connector.scheduler_hasher``: a request without
LoRA or cache salt), and every worker rank is asked over the connector's worker channel how many
of its leading chunks it holds. Nothing is pinned (``first`` is past the last chunk), nothing
is generated. The answer is the built-in server's (``wire.format_lookup``): the
prompt's tokens, the leading tokens every rank holds (whole chunks), the chunk size, in LMI's own
wire format (``lookup_output``: ``async_utils.create_non_stream_output``, whose binary encoding
DJL's Java side decodes in async mode; raw JSON there breaks the connection and restarts the
Python worker). A rank that does not answer in time is a miss (``cached_tokens`` 0), never a
failed request. Each rank counts the lookup in its own cache figures, as it counts the
scheduler's lookups. At most ``max_concurrent_lookups`` lookups wait for the workers at once in
this handler process (one DJL Python worker); one more is a miss at once, logged at most every
30 s, rather than a place in an ever longer line (``lookup_gate``).

A request this module cannot read (no prompt, a malformed one, a chat template that fails) is
``None``: the handler passes it to LMI, which generates (``warm`` reads that as the warm).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lmcache_ext.config import default_of
from lmcache_ext.keys import PrefixHasher
from lmcache_ext.lookup_gate import LookupGate
from lmcache_ext.storage.log_every import LOG_INTERVAL_S, EveryInterval
from lmcache_ext.wire import (
    CUSTOM_ATTRIBUTES_HEADER,
    LOOKUP_ATTRIBUTE,
    format_lookup,
    wants_lookup,
    wants_lookup_property,
)

log = logging.getLogger(__name__)


def is_lookup(inputs: Any) -> bool:
    """Whether a DJL request asks for a lookup: the raw custom-attributes header where the front
    end passed it on, else the property DJL's front end makes of ``lmcache-ext-lookup=true``."""
    header = inputs.get_property(CUSTOM_ATTRIBUTES_HEADER)
    if header is not None:
        return wants_lookup(header)
    return wants_lookup_property(inputs.get_property(LOOKUP_ATTRIBUTE))


def prompt_of(payload: dict[str, Any]) -> str | list[int] | list[dict] | None:
    """What vLLM would tokenise of an LMI payload, in LMI's order: ``prompt``, ``inputs``
    (text or token ids), then ``messages`` (a list of chat messages); None for anything
    else (a batch of prompts, a session request, a malformed field)."""
    for name in ("prompt", "inputs"):
        if name in payload:
            return _single_prompt(payload[name])
    messages = payload.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        return messages
    return None


def _single_prompt(value: Any) -> str | list[int] | None:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, list) and value and \
            all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        return list(value)
    return None


def tokenize(tokenizer: Any, prompt: str | list[int] | list[dict]) -> list[int]:
    """``prompt``'s token ids as vLLM's generate path makes them: text with the tokenizer's
    special tokens (vLLM's default ``add_special_tokens``), token ids as they are, chat
    messages through the chat template with the generation prompt (rendered, then encoded
    without adding special tokens, as vLLM's chat path does). Raises on a template error."""
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt, add_special_tokens=True))
    if prompt and isinstance(prompt[0], dict):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(prompt)


def cached_tokens(chunks: int, chunk_size: int, prompt_tokens: int) -> int:
    """The leading tokens ``chunks`` held chunks cover, at most the prompt."""
    return min(chunks * chunk_size, prompt_tokens)


class LmiLookup:
    """Answers lookups for one vLLM engine that runs our connector: its tokenizer, the
    scheduler side's hasher, and a line to every worker rank (thread-safe; one lookup at a
    time on the channel)."""

    def __init__(self, hasher: PrefixHasher, caches: Any, tokenizer: Any,
                 max_lookups: int = default_of("max_concurrent_lookups")):
        """``tokenizer``: vLLM's, or the engine's ``get_tokenizer`` (called at the first
        lookup; awaited where a vLLM version makes it a coroutine)."""
        self.hasher = hasher
        self.gate = LookupGate(max_lookups)
        self._refused_log = EveryInterval(LOG_INTERVAL_S)
        self._caches = caches
        self._tokenizer = tokenizer if hasattr(tokenizer, "encode") else None
        self._get_tokenizer = None if self._tokenizer is not None else tokenizer
        self._lock = threading.Lock()

    @staticmethod
    def for_engine(engine: Any) -> LmiLookup | None:
        """The lookup of LMI's vLLM engine (vLLM's ``AsyncLLM``); None where vLLM does not run
        our connector (lookups then go to LMI, which generates)."""
        from lmcache_ext.adapters.vllm.channel import AllRanksClient
        from lmcache_ext.adapters.vllm.connector import (
            LMCacheExtConnector,
            model_layout,
            scheduler_hasher,
        )
        from lmcache_ext.adapters.vllm.takeover import runs_our_connector

        vllm_config = getattr(engine, "vllm_config", None)
        if vllm_config is None or not runs_our_connector(vllm_config):
            return None
        config = LMCacheExtConnector.effective_config(vllm_config)
        hasher = scheduler_hasher(config, model_layout(vllm_config), vllm_config)
        world = vllm_config.parallel_config.tensor_parallel_size
        caches = AllRanksClient(str(vllm_config.kv_transfer_config.engine_id), world,
                              config.worker_lookup_timeout_s, config.worker_lookup_backoff_s)
        log.info("lmcache-ext handler: lookups (custom attribute lmcache-ext-lookup) are "
                 "answered from the workers' caches without generating")
        return LmiLookup(hasher, caches, engine.get_tokenizer, config.max_concurrent_lookups)

    def digests(self, tokens: Sequence[int]) -> list[bytes]:
        return self.hasher.digests(tokens)

    def held_chunks(self, tokens: Sequence[int]) -> int:
        """Leading chunks of ``tokens`` every rank holds (0 where a rank does not answer in
        time, or ``max_concurrent_lookups`` lookups wait for the workers already); pins
        nothing."""
        from lmcache_ext.adapters.vllm.channel import LookupRequest

        digests = self.digests(tokens)
        if not digests:
            return 0
        request = LookupRequest(f"lookup-{uuid.uuid4().hex}", 1, digests, len(tokens),
                                first=len(digests))
        with self.gate.admit() as admitted:
            if not admitted:
                if self._refused_log.due():
                    log.warning("lmcache-ext handler: a lookup answered as a miss: %s (%d "
                                "refused so far; logged at most every %.0f s)",
                                self.gate.refusal(), self.gate.refused, LOG_INTERVAL_S)
                return 0
            try:
                with self._lock:
                    return self._caches.lookup(request).chunks
            except Exception:  # the channel failed: a miss (warm re-warms), never a failure
                log.exception("lmcache-ext handler: a lookup could not ask the workers: a miss")
                return 0

    def answer(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """The lookup's answer (``format_lookup``) for a decoded request; None where the
        request cannot be read as a prompt (the caller lets LMI serve it). Blocking: tokenises
        and waits for the workers (at most the connector's ``worker_lookup_timeout_s``)."""
        prompt = prompt_of(payload)
        if prompt is None:
            return None
        began = time.perf_counter()
        try:
            tokens = tokenize(self._tokenizer, prompt)
        except Exception as exc:  # a template that fails here fails in LMI too: LMI says why
            log.info("lmcache-ext handler: lookup passed on to LMI (tokenising failed: %s)", exc)
            return None
        chunks = self.held_chunks(tokens)
        cached = cached_tokens(chunks, self.hasher.chunk_size, len(tokens))
        log.debug("lmcache-ext handler: lookup of %d tokens: %d cached (%.1f ms)", len(tokens),
                  cached, (time.perf_counter() - began) * 1000)
        return format_lookup(len(tokens), cached, self.hasher.chunk_size)

    async def answer_async(self, payload: dict[str, Any]) -> dict[str, Any] | None:
        """``answer`` off the event loop."""
        if self._tokenizer is None:
            tokenizer = self._get_tokenizer()
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return await asyncio.to_thread(self.answer, payload)

    def close(self) -> None:
        with self._lock:
            self._caches.close()


def lookup_output(answer: dict[str, Any]) -> Any:
    """DJL's ``Output`` for a lookup's answer, made by LMI's own helper for a non-streamed JSON
    answer (``djl_python.async_utils.create_non_stream_output``, as LMI's vLLM service answers):
    the binary-encoded ``{"data": json, "last": true}`` that DJL's Java side decodes in async
    mode, ``Content-Type: application/json``."""
    from djl_python.async_utils import create_non_stream_output

    return create_non_stream_output(answer)

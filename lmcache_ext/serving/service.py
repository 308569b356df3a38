"""What the HTTP layer calls: a parsed request -> prompt token ids -> generation.

Tokenising lives here: the chat template for ``messages``, the tokenizer for a prompt, and the
check that the prompt fits the model's context (a ``RequestError`` naming the field). A turn of a
stateful session ends by telling the sessions (they pin its conversation). Thread-safe as far as
the generator is: the HTTP server calls ``run`` from a thread per connection.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry

from lmcache_ext.config import default_of
from lmcache_ext.lookup_gate import LookupGate
from lmcache_ext.metrics import ServerMetrics
from lmcache_ext.serving.generator import GenerationStats, Generator, TokenEvent
from lmcache_ext.serving.protocol import GenerateRequest, RequestError
from lmcache_ext.serving.sessions import ServerSessions


class InFlight:
    """Requests being answered now: the HTTP layer wraps each in ``with in_flight:``; a
    shutdown waits for them (``wait_idle``). Thread-safe."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def __enter__(self) -> InFlight:
        with self._changed:
            self._count += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_idle(self, timeout_s: float) -> int:
        """Block until no request is in flight or ``timeout_s`` passed; the count left."""
        with self._changed:
            self._changed.wait_for(lambda: self._count == 0, timeout_s)
            return self._count


class Service:
    """Tokenises requests and runs them on the generator; holds the server's metrics."""

    def __init__(self, generator: Generator, registry: CollectorRegistry,
                 sessions: ServerSessions,
                 max_lookups: int = default_of("max_concurrent_lookups")):
        self.generator = generator
        self.lookups = LookupGate(max_lookups)
        self.metrics = ServerMetrics(registry)
        self.sessions = sessions
        self.model_name = generator.loaded.name
        self.in_flight = InFlight()

    def prompt_ids(self, request: GenerateRequest) -> list[int]:
        tokenizer = self.generator.loaded.tokenizer
        if request.messages:
            text = tokenizer.apply_chat_template(list(request.messages), tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(request.prompt)["input_ids"]
        field = "messages" if request.messages else "inputs" if request.style == "lmi" else \
            "prompt"
        if len(ids) >= self.generator.loaded.max_context:
            raise RequestError(f"{field}: {len(ids)} tokens does not fit the model's context of "
                               f"{self.generator.loaded.max_context}")
        return ids

    def lookup(self, request: GenerateRequest) -> tuple[int, int]:
        """``(prompt tokens, leading tokens the cache holds now)`` for ``request``, tokenised as
        ``run`` would; nothing generated, stored, promoted or counted as a lookup of a request
        (``CacheEngine.peek``). No cache: nothing held. Raises a 429 ``RequestError`` naming
        ``max_concurrent_lookups`` while that many lookups run (never waits in line)."""
        with self.lookups.admit() as admitted:
            if not admitted:
                raise RequestError(self.lookups.refusal(), status=429)
            ids = self.prompt_ids(request)
            engine = self.generator.engine
            return len(ids), engine.peek(ids) if engine is not None else 0

    def run(self, request: GenerateRequest,
            session_id: str | None = None) -> tuple[Iterator[TokenEvent], GenerationStats]:
        """Generate for ``request``; with ``session_id`` (an open session, see
        ``ServerSessions.begin_turn``) the turn's end, or the stream's abandonment, pins the
        session's conversation."""
        stats = GenerationStats()
        ids = self.prompt_ids(request)
        events = self.generator.generate(ids, request.params, stats)
        if session_id is not None:
            events = self._session_turn(events, session_id, ids, stats)
        return events, stats

    def _session_turn(self, events: Iterator[TokenEvent], session_id: str, ids: list[int],
                      stats: GenerationStats) -> Iterator[TokenEvent]:
        engine = self.generator.engine
        try:
            yield from events
        finally:  # the generator stored the prompt's chunks after the first token
            self.sessions.end_turn(session_id, lambda: engine.spans(ids) if engine else [],
                                   stats.cached_tokens)

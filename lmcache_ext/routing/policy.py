"""Routing decisions, apart from the HTTP that carries them: plain Python, no sockets.

Requests without a session go to a replica chosen by the mode (SageMaker's ``RANDOM`` and
``LEAST_OUTSTANDING_REQUESTS``, and ``prefix_aware``). A request with a session id goes to the
replica that created the session (the session table); a create is routed by the mode.

``prefix_aware`` without a tokenizer: the key is the request's ``X-Amzn-SageMaker-Prefix-Aware-Id``
header when it has one, else the first ``prefix_chars`` characters of the rendered prompt (the
prompt text, or the messages as ``role: content`` lines). 1024 characters stand in for the first
256-token chunk (about 4 characters a token in English). Requests whose first chunk is the same
(a shared system prompt longer than that) all go to one replica: that is the mode's nature.
A create has no prompt, so in ``prefix_aware`` mode it goes where ``least_outstanding`` says.
``least_outstanding`` breaks ties by the sessions each replica holds (the router's table), then
at random: creates that arrive together (no request in flight anywhere) spread their sessions
evenly instead of piling a few on one replica.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DEFAULT_PREFIX_CHARS = 1024
MAX_SESSIONS = 1 << 20  # the table forgets the least recently used session beyond this


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at: the body and the client's prefix-aware id (if any)."""

    body: bytes
    prefix_id: str | None = None
    is_create: bool = False
    sessions_held: tuple[int, ...] = ()  # open sessions each replica holds (the router's table)


def prefix_text(body: bytes) -> str:
    """The rendered prompt of an ``/invocations`` body (any of its three schemas); the raw body
    decoded as text when it is not JSON of a known shape."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")
    if isinstance(payload, dict):
        messages = payload.get("messages")
        if isinstance(messages, list):
            return "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages
                           if isinstance(m, dict))
        for name in ("prompt", "inputs"):
            text = payload.get(name)
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if isinstance(text, str):
                return text
    return body.decode("utf-8", "replace")


class Policy:
    """Chooses a replica index for a request; ``outstanding[i]`` is replica i's in-flight count.
    Thread-safe (the router calls it from a thread per connection)."""

    def __init__(self, seed: int | None = None, prefix_chars: int = DEFAULT_PREFIX_CHARS):
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.prefix_chars = prefix_chars

    def _random(self, count: int) -> int:
        with self._lock:
            return self._rng.randrange(count)

    def _least(self, outstanding: Sequence[int], held: Sequence[int] = ()) -> int:
        """Fewest requests in flight; among those, fewest sessions held (when known), so
        creates arriving together spread their sessions evenly; then at random."""
        load = [(n, held[i] if held else 0) for i, n in enumerate(outstanding)]
        low = min(load)
        candidates = [i for i, each in enumerate(load) if each == low]
        with self._lock:
            return self._rng.choice(candidates)

    def choose(self, request: RouteRequest, outstanding: Sequence[int]) -> int:
        raise NotImplementedError


class RandomPolicy(Policy):
    def choose(self, request: RouteRequest, outstanding: Sequence[int]) -> int:
        return self._random(len(outstanding))


class LeastOutstandingPolicy(Policy):
    """The replica with the fewest requests in flight; ties broken by fewest sessions held,
    then at random."""

    def choose(self, request: RouteRequest, outstanding: Sequence[int]) -> int:
        return self._least(outstanding, request.sessions_held)


class PrefixAwarePolicy(Policy):
    """sha256 of the prefix key, modulo the number of replicas (module docstring)."""

    def choose(self, request: RouteRequest, outstanding: Sequence[int]) -> int:
        if request.is_create and request.prefix_id is None:
            return self._least(outstanding, request.sessions_held)
        key = request.prefix_id if request.prefix_id is not None else \
            prefix_text(request.body)[:self.prefix_chars]
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        return int.from_bytes(digest[:8], "big") % len(outstanding)


MODES: dict[str, Callable[..., Policy]] = {
    "random": RandomPolicy,
    "least_outstanding": LeastOutstandingPolicy,
    "prefix_aware": PrefixAwarePolicy,
}


def make_policy(mode: str, seed: int | None = None,
                prefix_chars: int = DEFAULT_PREFIX_CHARS) -> Policy:
    """The policy named ``mode``; a ValueError naming the allowed modes otherwise."""
    if mode not in MODES:
        raise ValueError(f"routing mode {mode!r}: expected one of {', '.join(MODES)}")
    if prefix_chars < 1:
        raise ValueError(f"prefix_chars: {prefix_chars} must be >= 1")
    return MODES[mode](seed=seed, prefix_chars=prefix_chars)


class SessionTable:
    """Session id -> replica index, as the create's answer said, and how many sessions each
    replica holds (kept as records come and go). Thread-safe.

    A record lives until its session is closed or, beyond ``capacity`` sessions, until it is the
    least recently used. An expired session keeps its record, so its requests still reach the
    replica that knows it expired (and says so) rather than one that never heard of it.
    """

    def __init__(self, capacity: int = MAX_SESSIONS):
        self.capacity = capacity
        self._replicas: OrderedDict[str, int] = OrderedDict()
        self._held: dict[int, int] = {}
        self._lock = threading.Lock()

    def lookup(self, session_id: str) -> int | None:
        with self._lock:
            index = self._replicas.get(session_id)
            if index is not None:
                self._replicas.move_to_end(session_id)
            return index

    def record(self, session_id: str, replica: int) -> None:
        with self._lock:
            self._drop(session_id)
            self._replicas[session_id] = replica
            self._held[replica] = self._held.get(replica, 0) + 1
            while len(self._replicas) > self.capacity:
                self._drop(next(iter(self._replicas)))

    def forget(self, session_id: str) -> None:
        with self._lock:
            self._drop(session_id)

    def _drop(self, session_id: str) -> None:
        index = self._replicas.pop(session_id, None)
        if index is not None:
            self._held[index] -= 1

    def __len__(self) -> int:
        with self._lock:
            return len(self._replicas)

    def by_replica(self) -> dict[int, int]:
        """How many sessions each replica holds."""
        with self._lock:
            return {index: count for index, count in self._held.items() if count}

"""Routing decisions, apart from the HTTP that carries them: plain Python, no sockets.

Requests without a session go to a replica chosen by the mode: SageMaker's three routing
strategies (``SAGEMAKER_STRATEGIES``: ``RANDOM``, ``LEAST_OUTSTANDING_REQUESTS``,
``PREFIX_AWARE``). A request with a session id goes to the replica that created the session (the
session table); a create is routed by the mode.

``prefix_aware`` follows SageMaker's definition (botocore's ``PrefixAwareRoutingConfig`` and
``PrefixAwareId`` documentation; the AWS API reference says the same):

- the key is the first ``prefix_length`` bytes of the request body on the InvokeEndpoint paths
  (``/invocations``, ``/endpoints/NAME/invocations[-response-stream]``), whatever the body's
  schema; on the OpenAI-compatible path it is the first ``prefix_length`` characters of the text
  content of the ``messages`` array;
- requests with the same key *and* the same ``X-Amzn-SageMaker-Prefix-Aware-Id`` go to the same
  replica (the id separates applications whose prompts start alike; it does not replace the key);
- when the chosen replica has ``concurrency_threshold`` requests in flight, the request goes to
  another one with more capacity.

Where AWS's documents are silent, our choices: the key is hashed with sha256 modulo the replica
count; a body shorter than ``prefix_length`` is its own key; the messages' text is the ``content``
strings (and the ``text`` of content parts) joined in order with nothing between them, roles
left out; "another instance with more capacity" is the one with the fewest requests in flight
(ties at random), and the chosen replica keeps the request when no other has fewer; a create has
no prompt, so it goes where ``least_outstanding`` says. ``least_outstanding`` breaks ties by the
sessions each replica holds (the router's table), then at random: creates that arrive together
(no request in flight anywhere) spread their sessions evenly instead of piling on one replica.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MAX_SESSIONS = 1 << 20  # the table forgets the least recently used session beyond this
# SageMaker's RoutingConfig.RoutingStrategy values -> our modes (KV_AWARE is left out: it needs
# a container that reports its KV cache to SageMaker's router, which ours does not).
SAGEMAKER_STRATEGIES = {"RANDOM": "random", "LEAST_OUTSTANDING_REQUESTS": "least_outstanding",
                        "PREFIX_AWARE": "prefix_aware"}
# PrefixAwareRoutingConfig's ranges (botocore's service model; a test checks them against it).
PREFIX_LENGTH_RANGE = (1024, 65536)
CONCURRENCY_THRESHOLD_RANGE = (1, 1024)
# The local router's defaults (SageMaker has none: both are required there): the shortest prefix
# SageMaker takes, and the largest threshold, so a prefix moves only when its replica is swamped.
DEFAULT_PREFIX_LENGTH = PREFIX_LENGTH_RANGE[0]
DEFAULT_CONCURRENCY_THRESHOLD = CONCURRENCY_THRESHOLD_RANGE[1]
INVOKE_API = "invoke"  # InvokeEndpoint[WithResponseStream] and the container's /invocations
OPENAI_API = "openai"  # SageMaker's OpenAI-compatible chat completions path


@dataclass(frozen=True)
class RouteRequest:
    """What a policy may look at: the body and the client's prefix-aware id (if any)."""

    body: bytes
    prefix_id: str | None = None
    is_create: bool = False
    sessions_held: tuple[int, ...] = ()  # open sessions each replica holds (the router's table)
    api: str = INVOKE_API  # which SageMaker API the request came in on (INVOKE_API, OPENAI_API)


def messages_text(body: bytes) -> str:
    """The text content of an OpenAI chat body's ``messages``, joined in order (roles left out;
    a content part's ``text``); "" for a body that is not such JSON."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return ""
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if not isinstance(messages, list):
        return ""
    pieces: list[str] = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            pieces.append(content)
        elif isinstance(content, list):
            pieces += [part["text"] for part in content
                       if isinstance(part, dict) and isinstance(part.get("text"), str)]
    return "".join(pieces)


def prefix_key(request: RouteRequest, prefix_length: int) -> bytes:
    """SageMaker's prefix-aware key: the Prefix-Aware-Id (if any), then the first
    ``prefix_length`` bytes of the body (InvokeEndpoint) or characters of the messages' text
    (the OpenAI-compatible API)."""
    if request.api == OPENAI_API:
        prefix = messages_text(request.body)[:prefix_length].encode("utf-8", "surrogatepass")
    else:
        prefix = request.body[:prefix_length]
    tag = request.prefix_id.encode("utf-8", "replace") if request.prefix_id is not None else b""
    return len(tag).to_bytes(2, "big") + tag + prefix


@dataclass(frozen=True)
class PrefixAware:
    """PREFIX_AWARE's two settings (``PrefixAwareRoutingConfig``). The local router takes any
    positive values; ``check_sagemaker`` holds them to SageMaker's ranges."""

    prefix_length: int = DEFAULT_PREFIX_LENGTH  # bytes of the body / characters of messages
    concurrency_threshold: int = DEFAULT_CONCURRENCY_THRESHOLD  # in flight on the chosen one

    def __post_init__(self) -> None:
        for name in ("prefix_length", "concurrency_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: {value!r} must be an integer >= 1")

    def check_sagemaker(self) -> None:
        """A ValueError naming the setting and SageMaker's range if either is out of it."""
        for name, label, (low, high) in (
                ("prefix_length", "PrefixLength", PREFIX_LENGTH_RANGE),
                ("concurrency_threshold", "ConcurrencyThreshold", CONCURRENCY_THRESHOLD_RANGE)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{label} {value}: SageMaker takes {low} to {high}")


class Policy:
    """Chooses a replica index for a request; ``outstanding[i]`` is replica i's in-flight count.
    Thread-safe (the router calls it from a thread per connection)."""

    def __init__(self, seed: int | None = None, settings: PrefixAware | None = None):
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.settings = settings or PrefixAware()

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
    """SageMaker's PREFIX_AWARE (module docstring): sha256 of the prefix key modulo the replica
    count, unless that replica has ``concurrency_threshold`` requests in flight."""

    def choose(self, request: RouteRequest, outstanding: Sequence[int]) -> int:
        if request.is_create and request.prefix_id is None:
            return self._least(outstanding, request.sessions_held)
        digest = hashlib.sha256(prefix_key(request, self.settings.prefix_length)).digest()
        chosen = int.from_bytes(digest[:8], "big") % len(outstanding)
        if outstanding[chosen] < self.settings.concurrency_threshold:
            return chosen
        # The idlest replica, the chosen one counted one busier; it takes the request only
        # with fewer in flight than the chosen one, else the prefix stays where it is cached.
        others = [n if i != chosen else outstanding[chosen] + 1 for i, n in enumerate(outstanding)]
        spill = self._least(others)
        return spill if outstanding[spill] < outstanding[chosen] else chosen


MODES: dict[str, Callable[..., Policy]] = {
    "random": RandomPolicy,
    "least_outstanding": LeastOutstandingPolicy,
    "prefix_aware": PrefixAwarePolicy,
}


def make_policy(mode: str, seed: int | None = None,
                settings: PrefixAware | None = None) -> Policy:
    """The policy named ``mode`` (ours, or SageMaker's strategy name); a ValueError naming the
    allowed modes otherwise. ``settings``: prefix_aware's (default ``PrefixAware()``)."""
    mode = SAGEMAKER_STRATEGIES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"routing mode {mode!r}: expected one of {', '.join(MODES)} (or "
                         f"{', '.join(SAGEMAKER_STRATEGIES)})")
    return MODES[mode](seed=seed, settings=settings)


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

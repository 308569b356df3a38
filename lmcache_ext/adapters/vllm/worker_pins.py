"""One rank's pins: the chunks a lookup found, held in place for the request until its load.

The scheduler's lookup (``channel.RankCache.lookup``) counts the chunks this rank holds
and pins those vLLM lacks; the load drops the pin once done, and so does the scheduler when the
request finishes, is aborted or preempted, or is looked up again. A pin is named by (request id,
pin id): a release of an older pin id never drops a newer pin of the same request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from lmcache_ext.adapters.vllm.channel import LookupRequest
from lmcache_ext.adapters.vllm.stats import StageClock
from lmcache_ext.engine import CacheEngine, PrefixPin


@dataclass(frozen=True)
class HeldPin:
    """A request's pin on this rank, taken by the lookup ``pin_id``."""

    pin_id: int
    pin: PrefixPin
    tiers: dict[int, str]  # chunk index -> the tier it was found in (the load counts by tier)


class RankPins:
    """The requests' pins on one rank, by request id. Thread-safe: the channel's thread pins
    and releases, vLLM's thread and the loader release after a load."""

    def __init__(self, engine: CacheEngine, clock: StageClock | None = None):
        self.engine = engine
        self.clock = clock or StageClock()  # the lookups' and pins' seconds
        self._held: dict[str, HeldPin] = {}
        self._lock = threading.Lock()

    def pin(self, request: LookupRequest) -> list[str]:
        """The tier of each chunk of the prompt held from the first; pins chunks [first, held)
        for the request (replacing its earlier pin). A chunk evicted between the count and the
        pin ends the run there: the result never counts a chunk that is not pinned. From the
        tiers' indexes only (see ``CacheEngine.pin_in_place``)."""
        began = time.perf_counter()
        spans = self.engine.spans_of(request.digests, request.num_tokens)
        tiers = self.engine.locate_spans(spans, request.num_tokens)
        held = len(tiers)
        pin = None
        located = time.perf_counter()
        if held > request.first:
            pin = self.engine.pin_in_place(spans[request.first:held], tiers[request.first:held])
            held = request.first + pin.num_chunks
        self.clock.add("lookup", located - began)
        self.clock.add("pin", time.perf_counter() - located)
        with self._lock:
            old = self._held.pop(request.req_id, None)
            if pin is not None:
                found = {request.first + i: tier
                         for i, tier in enumerate(tiers[request.first:held])}
                self._held[request.req_id] = HeldPin(request.pin_id, pin, found)
        if old is not None:
            old.pin.release()  # after the new pin: chunks in both are never unpinned between
        return tiers[:held]

    def tiers(self, req_id: str, pin_id: int) -> dict[int, str]:
        """Chunk index -> the tier the lookup ``pin_id`` found it in; empty if that pin is no
        longer held (released, or replaced by a newer lookup)."""
        with self._lock:
            held = self._held.get(req_id)
        return held.tiers if held is not None and held.pin_id == pin_id else {}

    def release(self, req_id: str, pin_id: int) -> None:
        """Drop ``req_id``'s pin if it is still ``pin_id`` (a newer pin stays)."""
        with self._lock:
            held = self._held.get(req_id)
            if held is None or held.pin_id != pin_id:
                return  # already released, or a newer lookup re-pinned the request
            del self._held[req_id]
        held.pin.release()

    def release_all(self) -> None:
        """Drop every pin (at close; in tests, to let pinned chunks go)."""
        with self._lock:
            pins, self._held = list(self._held.values()), {}
        for held in pins:
            held.pin.release()

    def __len__(self) -> int:
        """Requests holding a pin (a pin that never goes is a leak)."""
        with self._lock:
            return len(self._held)

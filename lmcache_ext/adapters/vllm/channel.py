"""The scheduler's line to the workers' caches: lookups with pins, and releases, with timeouts.

In vLLM the KV lives in the workers (one process per tensor-parallel rank, or the engine core's
own process with a single in-process worker), so the tiers that hold copies of it live there too.
The scheduler hashes a prompt once and asks every rank "how many of these chunks, from the first,
do you hold? pin them for this request". A rank in the scheduler's own process is called
directly; any other is asked over ZMQ IPC (a ROUTER socket on a thread in the worker, a DEALER per
rank in the scheduler). The hit is the smallest answer over the ranks. ``RankCache`` is what one
rank answers, ``RankCacheServer`` answers for it in the worker, ``AllRanksClient`` asks every
rank from the scheduler (and from the LMI handler).

Failure is a miss, never a hang: each lookup waits at most ``timeout_s`` for all ranks; a rank
that did not answer in time counts as 0 chunks, is sent a release for whatever it pins late (the
socket keeps the order), and is skipped for ``backoff_s`` so later requests do not each wait. The
first time a rank cannot be reached the scheduler says so loudly (ERROR), and again when it is
back: a cache that cannot hit is never silent.

Each answer also says which tier holds the chunks and how long one chunk takes to read from each
tier (the rank's measured speeds), so the scheduler's cost model can weigh loading against
recomputing (a chunk's load time is the slowest rank's: the ranks load in parallel).

A SageMaker session's pins (``sessions``) are released the same way: the LMI handler,
in a process of its own, sends ``release_session`` to every rank when the session is closed and
waits (with the same timeout) for each rank to say how many bytes it unpinned.

Wire format (no pickle): frame 0 is a JSON header, frame 1 the chunk digests concatenated.
  lookup          {"id", "op": "lookup", "req", "pin", "tokens", "first", "size"} + digests
                  -> {"id", "chunks", "tiers": [[tier, chunks], ...], "chunk_s": {tier: s}}
                  ("tiers": runs from chunk 0 covering the held chunks; "chunk_s": tiers measured)
  release         {"op": "release", "req", "pin"} (no reply)
  release_session {"id", "op": "release_session", "session"} -> {"id", "freed"} (bytes)
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from lmcache_ext.storage.cpu import CPUTier

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often the worker's thread looks at its stop flag


@dataclass(frozen=True)
class LookupRequest:
    """Scheduler -> every rank: count the held run of ``digests`` from the first chunk and pin
    chunks [first, held) for ``req_id`` under ``pin_id`` (replacing its earlier pin)."""

    req_id: str
    pin_id: int
    digests: list[bytes]  # the prompt's chunk digests (keys.PrefixHasher.digests)
    num_tokens: int  # the prompt's length (the last chunk may be partial)
    first: int  # chunks before this one are in vLLM's own cache already: not pinned


@dataclass(frozen=True)
class RankAnswer:
    """One rank's answer to a lookup."""

    chunks: int  # held from the first; those from the request's ``first`` are pinned
    tiers: tuple[tuple[str, int], ...] = ()  # runs of (tier, chunks) from chunk 0
    chunk_s: Mapping[str, float] = field(default_factory=dict)  # s to read one chunk, by tier

    def chunk_tiers(self) -> list[str]:
        """The tier of each held chunk ("" where the answer did not say)."""
        names = [tier for tier, count in self.tiers for _ in range(count)]
        return (names + [""] * self.chunks)[:self.chunks]

    def load_s(self) -> list[float]:
        """Seconds to read each held chunk (0 where the tier is not measured yet)."""
        return [self.chunk_s.get(tier, 0.0) for tier in self.chunk_tiers()]

    def to_json(self) -> dict[str, Any]:
        return {"chunks": self.chunks, "tiers": [list(run) for run in self.tiers],
                "chunk_s": dict(self.chunk_s)}

    @classmethod
    def from_json(cls, reply: Mapping[str, Any]) -> RankAnswer:
        """Raises ValueError/TypeError/KeyError on a malformed reply."""
        tiers = tuple((str(tier), max(0, int(count))) for tier, count in reply.get("tiers", ()))
        chunk_s = {str(k): max(0.0, float(v)) for k, v in dict(reply.get("chunk_s", {})).items()}
        return cls(max(0, int(reply["chunks"])), tiers, chunk_s)


MISS = RankAnswer(0)


@dataclass(frozen=True)
class LookupAnswer:
    """Every rank's answers to one lookup, combined."""

    chunks: int  # held by every rank from the first
    load_s: list[float]  # per chunk in [0, chunks): the slowest rank's read time
    # per chunk in [0, chunks): True where some rank holds it outside its CPU tier
    slow: list[bool] = field(default_factory=list)


def combine(answers: Sequence[RankAnswer]) -> LookupAnswer:
    """What every rank holds (the smallest answer), each chunk as slow as its slowest rank."""
    if not answers:
        return LookupAnswer(0, [])
    chunks = min(a.chunks for a in answers)
    per_rank = [a.load_s()[:chunks] for a in answers]
    tiers = [a.chunk_tiers()[:chunks] for a in answers]
    slow = [any(t != CPUTier.name for t in names) for names in zip(*tiers, strict=True)]
    return LookupAnswer(chunks, [max(times) for times in zip(*per_rank, strict=True)], slow)


class RankCache(Protocol):
    """What one rank's cache answers, in-process or through its ``RankCacheServer``
    (implemented by the connector's worker side)."""

    def lookup(self, request: LookupRequest) -> RankAnswer:
        """Chunks held from the first (``first`` to the result pinned). Thread-safe."""

    def release(self, req_id: str, pin_id: int) -> None:
        """Drop ``req_id``'s pin if it is still ``pin_id`` (a newer pin stays). Thread-safe."""

    def release_session(self, session_id: str) -> int:
        """Drop every pin the session holds (closed); the bytes freed. Thread-safe."""


# Ranks whose worker runs in this process, found by the scheduler without a socket.
_LOCAL: dict[tuple[str, int], RankCache] = {}
_LOCAL_LOCK = threading.Lock()


def socket_path(engine_key: str, rank: int) -> str:
    """The IPC endpoint of one rank's cache: short (a socket path is limited to ~100 bytes)
    and the same in every process of one engine."""
    digest = hashlib.sha256(engine_key.encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/lmcache-ext-{digest}-r{rank}.sock"


def forget_local(engine_key: str) -> None:
    """Stop finding this engine's ranks in-process (tests: force the socket path)."""
    with _LOCAL_LOCK:
        for key in [k for k in _LOCAL if k[0] == engine_key]:
            del _LOCAL[key]


# ---------------------------------------------------------------------- worker side


class RankCacheServer:
    """Worker side: one rank's cache answering ``AllRanksClient`` on a daemon thread;
    registered for in-process callers too."""

    def __init__(self, engine_key: str, rank: int, service: RankCache):
        self.endpoint = socket_path(engine_key, rank)
        self._key = (engine_key, rank)
        self._service = service
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        with _LOCAL_LOCK:
            _LOCAL[self._key] = service
        self._thread = threading.Thread(target=self._serve, name=f"lmcache-ext-rank{rank}",
                                        daemon=True)
        self._thread.start()
        atexit.register(self.close)  # the socket file goes with the process (best effort)
        log.info("lmcache-ext: rank %d cache answers the scheduler at %s", rank, self.endpoint)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(int(POLL_S * 1000)):
                continue
            peer, *frames = self._socket.recv_multipart()
            try:
                reply = self._handle(frames)
            except Exception:  # a bad message or a failing lookup: that lookup is a miss
                log.exception("lmcache-ext: a cache request failed; answered as a miss")
                reply = {"id": _request_id(frames), **MISS.to_json()}
            if reply is not None:
                self._socket.send_multipart([peer, json.dumps(reply).encode()])
        self._socket.close(0)

    def _handle(self, frames: list[bytes]) -> dict | None:
        header = json.loads(frames[0])
        if header["op"] == "release":
            self._service.release(str(header["req"]), int(header["pin"]))
            return None
        if header["op"] == "release_session":
            return {"id": header["id"],
                    "freed": self._service.release_session(str(header["session"]))}
        if header["op"] != "lookup":
            raise ValueError(f"unknown cache request {header['op']!r}")
        size, blob = int(header["size"]), frames[1] if len(frames) > 1 else b""
        if size <= 0 or len(blob) % size:
            raise ValueError("digest frame does not match its size")
        digests = [blob[i:i + size] for i in range(0, len(blob), size)]
        request = LookupRequest(str(header["req"]), int(header["pin"]), digests,
                                int(header["tokens"]), int(header["first"]))
        return {"id": header["id"], **self._service.lookup(request).to_json()}

    def close(self) -> None:
        """Stop answering; in-process callers no longer find this rank. Idempotent."""
        with _LOCAL_LOCK:
            if _LOCAL.get(self._key) is self._service:
                del _LOCAL[self._key]
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=5)
            self._context.term()
            path = self.endpoint.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)


def _request_id(frames: list[bytes]) -> int | None:
    try:
        return json.loads(frames[0]).get("id")
    except (ValueError, AttributeError, IndexError):
        return None


# ---------------------------------------------------------------------- scheduler side


class _RemoteRank:
    """A DEALER to one rank's cache, with its reachability state."""

    def __init__(self, context: zmq.Context, endpoint: str):
        self.endpoint = endpoint
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(endpoint)
        self.down_until = 0.0
        self.ever_answered = False
        self.reported_down = False


class AllRanksClient:
    """Scheduler side (and the LMI handler): asks every rank's cache, in-process or through
    its ``RankCacheServer``. Used from one thread only."""

    def __init__(self, engine_key: str, world_size: int, timeout_s: float, backoff_s: float):
        self._key = engine_key
        self._world = world_size
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._context: zmq.Context | None = None
        self._remote: dict[int, _RemoteRank] = {}
        self._next_id = 0
        self.timeouts = 0  # lookups a rank did not answer in time (or skipped while it was down)

    def lookup(self, request: LookupRequest) -> LookupAnswer:
        """Chunks every rank holds from the first (0 where any rank fails to answer), with
        each chunk's load time."""
        answers: list[RankAnswer] = []
        waiting: dict[int, _RemoteRank] = {}
        for rank in range(self._world):
            local = self._local(rank)
            if local is not None:
                answers.append(local.lookup(request))
            elif (remote := self._remote_rank(rank)).down_until > time.monotonic():
                self.timeouts += 1
                answers.append(MISS)
            else:
                waiting[rank] = remote
        if waiting:
            answers += self._ask(waiting, request)
        return combine(answers)

    def release(self, req_id: str, pin_id: int) -> None:
        """Drop the pin ``pin_id`` of ``req_id`` on every rank (sent, not waited for)."""
        for rank in range(self._world):
            local = self._local(rank)
            if local is not None:
                local.release(req_id, pin_id)
            else:
                self._send_release(self._remote_rank(rank), req_id, pin_id)

    def release_session(self, session_id: str) -> list[int | None]:
        """Drop the session's pins on every rank; per rank the bytes it freed, None for a rank
        that did not answer within the timeout (its pins go when the session expires there)."""
        freed: dict[int, int | None] = {}
        waiting: dict[int, _RemoteRank] = {}
        for rank in range(self._world):
            local = self._local(rank)
            if local is not None:
                freed[rank] = local.release_session(session_id)
            else:
                waiting[rank] = self._remote_rank(rank)
        if waiting:
            self._next_id += 1
            header = {"id": self._next_id, "op": "release_session", "session": session_id}
            replies = self._exchange(waiting, header, [])
            freed.update({r: (int(replies[r].get("freed", 0)) if r in replies else None)
                          for r in waiting})
        return [freed[rank] for rank in range(self._world)]

    def close(self) -> None:
        for remote in self._remote.values():
            remote.socket.close(0)
        self._remote.clear()
        if self._context is not None:
            self._context.term()
            self._context = None

    def _local(self, rank: int) -> RankCache | None:
        with _LOCAL_LOCK:
            return _LOCAL.get((self._key, rank))

    def _remote_rank(self, rank: int) -> _RemoteRank:
        if rank not in self._remote:
            if self._context is None:
                self._context = zmq.Context()
            self._remote[rank] = _RemoteRank(self._context, socket_path(self._key, rank))
        return self._remote[rank]

    def _ask(self, ranks: dict[int, _RemoteRank], request: LookupRequest) -> list[RankAnswer]:
        """Send the lookup to ``ranks`` at once; their answers, a miss for each that missed
        the deadline (which then gets a release and a back-off) or answered malformed."""
        self._next_id += 1
        size = len(request.digests[0]) if request.digests else 32
        header = {"id": self._next_id, "op": "lookup", "req": request.req_id,
                  "pin": request.pin_id, "tokens": request.num_tokens, "first": request.first,
                  "size": size}
        replies = self._exchange(ranks, header, [b"".join(request.digests)])
        answers = []
        for rank, remote in ranks.items():
            if rank not in replies:
                self._mark_down(rank, remote, request)
                answers.append(MISS)
                continue
            self._mark_up(rank, remote)
            try:
                answers.append(RankAnswer.from_json(replies[rank]))
            except (KeyError, TypeError, ValueError):
                log.warning("lmcache-ext: a malformed lookup answer from %s: a miss",
                            remote.endpoint)
                answers.append(MISS)
        return answers

    def _exchange(self, ranks: dict[int, _RemoteRank], header: dict,
                  frames: list[bytes]) -> dict[int, dict]:
        """Send one request (``header["id"]`` names it) to ``ranks`` at once; the replies of
        those that answered within the timeout."""
        message = [json.dumps(header).encode(), *frames]
        poller = zmq.Poller()
        for remote in ranks.values():
            try:
                remote.socket.send_multipart(message, zmq.NOBLOCK)
            except zmq.Again:  # its queue is full: it has not been reading (no answer below)
                continue
            poller.register(remote.socket, zmq.POLLIN)
        answers: dict[int, dict] = {}
        deadline = time.monotonic() + self._timeout_s
        while len(answers) < len(ranks) and (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(1, int(left * 1000))))
            for rank, remote in ranks.items():
                if remote.socket in ready:
                    reply = self._reply(remote, header["id"])
                    if reply is not None:
                        answers[rank] = reply
        return answers

    @staticmethod
    def _reply(remote: _RemoteRank, ident: int) -> dict | None:
        """The answer to ``ident`` among the waiting messages (late answers to earlier
        requests are dropped: a lookup's pins were released when it timed out)."""
        while remote.socket.poll(0):
            reply = json.loads(remote.socket.recv())
            if reply.get("id") == ident:
                return reply
        return None

    def _mark_up(self, rank: int, remote: _RemoteRank) -> None:
        if not remote.ever_answered:
            log.info("lmcache-ext: the scheduler reaches the cache of worker rank %d at %s",
                     rank, remote.endpoint)
        elif remote.reported_down:
            log.warning("lmcache-ext: worker rank %d's cache answers again: hits resume", rank)
        remote.ever_answered, remote.reported_down, remote.down_until = True, False, 0.0

    def _mark_down(self, rank: int, remote: _RemoteRank, request: LookupRequest) -> None:
        self.timeouts += 1
        self._send_release(remote, request.req_id, request.pin_id)  # whatever it pins late
        remote.down_until = time.monotonic() + self._backoff_s
        if not remote.reported_down:
            remote.reported_down = True
            log.error("lmcache-ext: the scheduler cannot reach the KV cache of worker rank %d "
                      "at %s (no answer in %.3f s): requests miss the cache until it answers "
                      "(retried every %.1f s)", rank, remote.endpoint, self._timeout_s,
                      self._backoff_s)

    @staticmethod
    def _send_release(remote: _RemoteRank, req_id: str, pin_id: int) -> None:
        message = json.dumps({"op": "release", "req": req_id, "pin": pin_id}).encode()
        try:
            remote.socket.send_multipart([message], zmq.NOBLOCK)
        except zmq.Again:  # the rank is not reading: its pins go when the request is looked up
            pass

"""Token ids -> fixed-size chunks -> chained prefix hashes -> ``ChunkKey``s. Pure functions.

A chunk's digest hashes the previous chunk's digest together with this chunk's token ids, so one
digest names a whole prefix. A key is a namespace id and a digest: everything that makes KV differ
for the same tokens (model, KV layout, dtype, chunk size, tensor-parallel rank) is in the namespace,
and nothing random per process is (no ``hash()``, no PYTHONHASHSEED): two processes or two machines
computing keys for the same prompt get the same keys.

The chain starts from the namespace's digest *without* the tensor-parallel rank: every rank of one
model computes the same digests, so a prompt is hashed once (by the scheduler) and each rank names
its own copy of a chunk with its own namespace id (``ChunkKey(namespace.id, digest)``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import xxhash

NAMESPACE_ID_HEX = 16  # characters of the namespace digest used as its short id


@dataclass(frozen=True)
class KeyNamespace:
    """What makes keys safe to share: equal namespaces mean interchangeable KV."""

    model_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # e.g. "bfloat16"
    chunk_size: int
    tp_rank: int = 0
    tp_world_size: int = 1
    salt: str = ""
    hash_algorithm: str = "sha256"

    def digest(self) -> bytes:
        """32 bytes that seed every chain in this namespace (sha256 of canonical JSON)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).digest()

    @property
    def id(self) -> str:
        return self.digest().hex()[:NAMESPACE_ID_HEX]

    def chain_root(self) -> bytes:
        """The digest every chain starts from: the namespace without the rank (all ranks of
        one model hash a prompt alike; their keys still differ by ``id``)."""
        return replace(self, tp_rank=0).digest()


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """Names one chunk of one prefix in one namespace."""

    namespace: str  # KeyNamespace.id
    digest: bytes  # chained prefix hash (32 bytes for sha256, 16 for xxh3_128)

    def __str__(self) -> str:
        return f"{self.namespace}-{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """A key and the token range [start, end) of the prompt it covers."""

    key: ChunkKey
    start: int
    end: int

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


def _sha256(parent: bytes, data: bytes) -> bytes:
    return hashlib.sha256(parent + data).digest()


def _xxh3_128(parent: bytes, data: bytes) -> bytes:
    return xxhash.xxh3_128_digest(parent + data)


_HASHERS = {"sha256": _sha256, "xxh3_128": _xxh3_128}


def token_bytes(tokens: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as little-endian int64 bytes: the same on every machine."""
    array = np.asarray(tokens)
    if array.ndim != 1:
        raise ValueError(f"token ids must be one-dimensional, got shape {array.shape}")
    return array.astype("<i8", copy=False).tobytes()


class PrefixHasher:
    """Splits token ids into chunks and names each one. Immutable, so thread-safe."""

    def __init__(self, namespace: KeyNamespace, save_unfull_chunk: bool = False):
        if namespace.hash_algorithm not in _HASHERS:
            raise ValueError(f"unknown hash algorithm {namespace.hash_algorithm!r}")
        self.namespace = namespace
        self.chunk_size = namespace.chunk_size
        self.save_unfull_chunk = save_unfull_chunk
        self._hash = _HASHERS[namespace.hash_algorithm]
        self._root = namespace.chain_root()
        self._ns_id = namespace.id

    def spans(self, tokens: Sequence[int] | np.ndarray, salt: str = "") -> list[ChunkSpan]:
        """One span per full chunk, plus the last partial chunk when ``save_unfull_chunk``.

        ``salt`` names what makes one request's KV differ from another's for the same tokens
        inside one namespace (a LoRA adapter, a per-request cache salt): it re-roots the chain.
        """
        num_tokens = len(tokens)
        return self.spans_of(self.digests(tokens, salt), num_tokens)

    def digests(self, tokens: Sequence[int] | np.ndarray, salt: str = "",
                known: Sequence[bytes] = ()) -> list[bytes]:
        """The chained digest of each chunk of ``tokens`` (as ``spans``), computing only those
        after ``known``: digests of ``tokens``' leading *whole* chunks, hashed earlier (a
        request's prompt, extended by its output)."""
        data = token_bytes(tokens)
        num_tokens = len(data) // 8
        limit = num_tokens if self.save_unfull_chunk else num_tokens - num_tokens % self.chunk_size
        out = list(known)
        if out and len(out) * self.chunk_size > limit:
            raise ValueError("known digests cover more chunks than the tokens have")
        if out:
            parent = out[-1]
        else:
            parent = self._hash(self._root, b"salt:" + salt.encode()) if salt else self._root
        for start in range(len(out) * self.chunk_size, limit, self.chunk_size):
            end = min(start + self.chunk_size, limit)
            parent = self._hash(parent, data[start * 8:end * 8])
            out.append(parent)
        return out

    def spans_of(self, digests: Sequence[bytes], num_tokens: int) -> list[ChunkSpan]:
        """This namespace's spans for digests computed by any rank's hasher over a prompt of
        ``num_tokens`` tokens: chunk i covers [i * chunk_size, min((i + 1) * chunk_size, n))."""
        size = self.chunk_size
        return [ChunkSpan(ChunkKey(self._ns_id, digest), i * size,
                          min((i + 1) * size, num_tokens))
                for i, digest in enumerate(digests)]

"""The stored unit: a fixed 128-byte header and the raw KV bytes, for tiers that hold bytes.

Layout of the KV: ``[layers, 2 (K, V), tokens, kv_heads, head_dim]``, C-contiguous.
The header says what the bytes are (dtype, shape, token count), whose they are (namespace and key
digest, so a file renamed or a value swapped behind our back is caught) and carries an xxh3-64
checksum over the header fields and the payload. Parsing is ``struct`` and ``torch.frombuffer``:
bytes from disk or the network are data, never code (no pickle anywhere).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import xxhash

from lmcache_ext.keys import ChunkKey

MAGIC = b"LMXK"
FORMAT_VERSION = 1
HEADER_SIZE = 128
MAX_DIMS = 6
MAX_DIGEST = 32
# magic, version, dtype code, ndim, shape[6], num_tokens, payload bytes, namespace, digest len,
# digest, then the checksum last (it covers everything before it and the payload).
_FIELDS = struct.Struct(f"<4sHBB{MAX_DIMS}IIQ16sB{MAX_DIGEST}s")
_CHECKSUM = struct.Struct("<Q")
assert _FIELDS.size + _CHECKSUM.size <= HEADER_SIZE

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5, torch.int8: 6, torch.uint8: 7,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass(frozen=True)
class KVLayout:
    """The shape of one model's KV, as the adapter sees it (per tensor-parallel rank).

    ``shape(n)`` is the stored layout of n tokens: ``[layers, 2 (K, V), n, kv_heads, head_dim]``.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def shape(self, num_tokens: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_tokens, self.num_kv_heads, self.head_dim)


class ChunkCorrupt(ValueError):
    """Bytes that are not a valid chunk for the key asked for. Tiers turn it into a miss."""


@dataclass(frozen=True)
class ChunkMeta:
    """What a payload is: element type, shape, and how many tokens it covers."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()

    @staticmethod
    def of(kv: torch.Tensor) -> ChunkMeta:
        """Meta of a KV tensor in the ``[layers, 2, tokens, kv_heads, head_dim]`` layout."""
        return ChunkMeta(kv.dtype, tuple(kv.shape), int(kv.shape[2]) if kv.dim() >= 3 else 0)


def payload_view(kv: torch.Tensor) -> torch.Tensor:
    """The KV's bytes as a flat uint8 tensor (a view when ``kv`` is contiguous)."""
    return kv.contiguous().view(-1).view(torch.uint8)


def _checksum(fields: bytes, payload: torch.Tensor) -> int:
    hasher = xxhash.xxh3_64(fields)
    hasher.update(payload.numpy())
    return hasher.intdigest()


def encode_header(key: ChunkKey, meta: ChunkMeta, payload: torch.Tensor) -> bytes:
    """The 128-byte header for ``payload`` (flat uint8, ``meta.nbytes`` long) under ``key``."""
    if meta.dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {meta.dtype} cannot be stored")
    if len(meta.shape) > MAX_DIMS or len(key.digest) > MAX_DIGEST:
        raise ValueError("shape or key digest too large for the chunk header")
    shape = tuple(meta.shape) + (0,) * (MAX_DIMS - len(meta.shape))
    fields = _FIELDS.pack(
        MAGIC, FORMAT_VERSION, DTYPE_CODES[meta.dtype], len(meta.shape), *shape, meta.num_tokens,
        meta.nbytes, key.namespace.encode()[:16], len(key.digest), key.digest,
    )
    header = fields + _CHECKSUM.pack(_checksum(fields, payload))
    return header.ljust(HEADER_SIZE, b"\0")


def decode(key: ChunkKey, data: torch.Tensor) -> tuple[ChunkMeta, torch.Tensor]:
    """Check ``data`` (flat uint8: header then payload, maybe padded) and return (meta, payload).

    The payload is a view into ``data``. Raises ``ChunkCorrupt`` on any mismatch: a short buffer,
    wrong magic or version, a key that is not ``key``, a size that does not add up, a bad checksum.
    """
    if data.numel() < HEADER_SIZE:
        raise ChunkCorrupt(f"{data.numel()} bytes is shorter than a header")
    head = data[:HEADER_SIZE].numpy().tobytes()
    try:
        (magic, version, code, ndim, *rest) = _FIELDS.unpack_from(head)
    except struct.error as exc:
        raise ChunkCorrupt(str(exc)) from exc
    shape_all = rest[:MAX_DIMS]
    num_tokens, nbytes, namespace, digest_len, digest = rest[MAX_DIMS:]
    if magic != MAGIC or version != FORMAT_VERSION:
        raise ChunkCorrupt(f"bad magic/version {magic!r}/{version}")
    if code not in CODE_DTYPES or not 0 < ndim <= MAX_DIMS:
        raise ChunkCorrupt(f"bad dtype code {code} or ndim {ndim}")
    if namespace.rstrip(b"\0").decode(errors="replace") != key.namespace[:16] or \
            digest[:digest_len] != key.digest:
        raise ChunkCorrupt("the chunk belongs to another key")
    meta = ChunkMeta(CODE_DTYPES[code], tuple(shape_all[:ndim]), num_tokens)
    if meta.nbytes != nbytes or data.numel() < HEADER_SIZE + nbytes:
        raise ChunkCorrupt(f"payload of {data.numel() - HEADER_SIZE} bytes, header says {nbytes}")
    payload = data[HEADER_SIZE:HEADER_SIZE + nbytes]
    (stored,) = _CHECKSUM.unpack_from(head, _FIELDS.size)
    if stored != _checksum(head[:_FIELDS.size], payload):
        raise ChunkCorrupt("checksum mismatch")
    return meta, payload


def as_kv(meta: ChunkMeta, payload: torch.Tensor) -> torch.Tensor:
    """View a flat uint8 payload as the KV tensor ``meta`` describes (no copy)."""
    return payload.view(meta.dtype).view(meta.shape)

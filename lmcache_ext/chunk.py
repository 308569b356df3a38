"""The stored unit: a fixed 128-byte header and the raw KV bytes, for tiers that hold bytes.

Layout of the KV: ``[layers, 2 (K, V), tokens, kv_heads, head_dim]``, C-contiguous.
The header says what the bytes are (dtype, shape, token count), whose they are (namespace and key
digest, so a file renamed or a value swapped behind our back is caught) and carries an xxh3-64
checksum over the header fields and the payload. Parsing is ``struct`` and ``torch.frombuffer``:
bytes from disk or the network are data, never code (no pickle anywhere).

Two format versions share the header fields and differ in what follows them:
- version 1 (unkeyed): an xxh3-64 checksum. It catches damage, not forgery: anyone who can write
  to the store can make a value that passes.
- version 2 (keyed, ``ChunkAuth``): a 32-byte BLAKE3 keyed-mode tag over the same bytes, with a
  secret only the endpoints hold. A reader with a key accepts only version 2 values whose tag one
  of its keys makes; a reader without one accepts only version 1. A reader that predates
  version 2 refuses it as a bad version: a miss, never wrong KV.
Versions 3 (unkeyed) and 4 (keyed) add one byte after the header fields, covered by the checksum
or tag: the codec the payload is encoded with (``lmcache_ext.codecs``; 0 = raw KV). A raw payload
is always written as version 1 or 2, so readers that predate codecs keep reading raw chunks and
refuse encoded ones as a bad version (a miss). A reader refuses a codec id it does not know with
``ChunkUnknownCodec`` (a counted miss, never a guess).
A value that fails the check of a keyed reader (unkeyed, tagged with another key, altered, or an
authentic value replayed under another key's name) raises ``ChunkForged``; anything that is not a
well-formed chunk raises ``ChunkCorrupt`` (its base class).
"""

from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

import blake3
import torch
import xxhash

from lmcache_ext.keys import ChunkKey

MAGIC = b"LMXK"
FORMAT_VERSION = 1  # unkeyed: xxh3-64 checksum
KEYED_FORMAT_VERSION = 2  # BLAKE3 keyed tag (ChunkAuth)
CODEC_FORMAT_VERSION = 3  # version 1 + a codec byte
KEYED_CODEC_FORMAT_VERSION = 4  # version 2 + a codec byte
_KEYED_VERSIONS = (KEYED_FORMAT_VERSION, KEYED_CODEC_FORMAT_VERSION)
_CODEC_VERSIONS = (CODEC_FORMAT_VERSION, KEYED_CODEC_FORMAT_VERSION)
RAW_CODEC = 0  # the payload is the KV's own bytes
HEADER_SIZE = 128
MAX_DIMS = 6
MAX_DIGEST = 32
# magic, version, dtype code, ndim, shape[6], num_tokens, payload bytes, namespace, digest len,
# digest, then the checksum last (it covers everything before it and the payload).
_FIELDS = struct.Struct(f"<4sHBB{MAX_DIMS}IIQ16sB{MAX_DIGEST}s")
_CHECKSUM = struct.Struct("<Q")
_CODEC = struct.Struct("<B")  # versions 3 and 4: the codec id, right after the fields
FIELDS_SIZE = _FIELDS.size  # header bytes the checksum or tag covers (with the payload)
TAG_SIZE = 32  # BLAKE3's default output
assert _FIELDS.size + _CODEC.size + max(_CHECKSUM.size, TAG_SIZE) <= HEADER_SIZE
MIN_SECRET_BYTES = 32
# Turns an operator's secret (any text) into BLAKE3's 32-byte key; the context names this use.
_KEY_CONTEXT = "lmcache-ext 2026 chunk format v2 integrity key"

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


class ChunkForged(ChunkCorrupt):
    """A well-formed value that a keyed reader must not trust: no tag, a tag none of its keys
    makes, or an authentic value stored under another key's name. Tiers count it as forged."""


class ChunkUnknownCodec(ChunkCorrupt):
    """A well-formed chunk whose payload is encoded with a codec this reader does not know (a
    newer writer's): a miss, never a guess at its bytes."""


class ChunkAuth:
    """The keys of keyed chunks: ``sign`` with the current one, ``verify`` with it or, during a
    rotation, the previous one. Secrets are turned into BLAKE3 keys once, here; the secrets
    themselves are not kept and never appear in ``repr``. Thread-safe (immutable)."""

    __slots__ = ("_keys",)

    def __init__(self, secret: bytes, previous: bytes | None = None):
        """Raises ValueError for a secret shorter than ``MIN_SECRET_BYTES`` (callers name the
        config key)."""
        secrets = [secret] + ([previous] if previous is not None else [])
        for value in secrets:
            if len(value) < MIN_SECRET_BYTES:
                raise ValueError(f"the secret is {len(value)} bytes; at least "
                                 f"{MIN_SECRET_BYTES} are needed (e.g. openssl rand -hex 32)")
        self._keys: tuple[bytes, ...] = tuple(
            blake3.blake3(value, derive_key_context=_KEY_CONTEXT).digest() for value in secrets)

    def __repr__(self) -> str:
        return f"ChunkAuth({len(self._keys)} key(s))"

    @property
    def rotating(self) -> bool:
        """True while a previous key is still accepted."""
        return len(self._keys) > 1

    def sign(self, fields: bytes, payload: torch.Tensor) -> bytes:
        return _tag(self._keys[0], fields, payload)

    def verify(self, fields: bytes, payload: torch.Tensor, tag: bytes) -> bool:
        return any(hmac.compare_digest(_tag(k, fields, payload), tag) for k in self._keys)


def _tag(key: bytes, fields: bytes, payload: torch.Tensor) -> bytes:
    hasher = blake3.blake3(fields, key=key)
    hasher.update(payload.numpy())  # buffer protocol: no copy; blake3 drops the GIL for big ones
    return hasher.digest()


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


def encode_header(key: ChunkKey, meta: ChunkMeta, payload: torch.Tensor,
                  auth: ChunkAuth | None = None, codec: int = RAW_CODEC) -> bytes:
    """The 128-byte header for ``payload`` (flat uint8) under ``key``: version 1 with an xxh3
    checksum, or version 2 with a keyed tag when ``auth`` is given; with a ``codec`` other than
    raw, versions 3 / 4, which name it. ``meta`` describes the decoded KV; a raw payload is
    ``meta.nbytes`` long, an encoded one as long as its codec made it."""
    if meta.dtype not in DTYPE_CODES:
        raise ValueError(f"dtype {meta.dtype} cannot be stored")
    if len(meta.shape) > MAX_DIMS or len(key.digest) > MAX_DIGEST:
        raise ValueError("shape or key digest too large for the chunk header")
    if not 0 <= codec <= 255:
        raise ValueError(f"codec id {codec} does not fit the header")
    shape = tuple(meta.shape) + (0,) * (MAX_DIMS - len(meta.shape))
    version = FORMAT_VERSION if auth is None else KEYED_FORMAT_VERSION
    nbytes = meta.nbytes
    if codec != RAW_CODEC:
        version += CODEC_FORMAT_VERSION - FORMAT_VERSION
        nbytes = payload.numel()
    fields = _FIELDS.pack(
        MAGIC, version, DTYPE_CODES[meta.dtype], len(meta.shape), *shape, meta.num_tokens,
        nbytes, key.namespace.encode()[:16], len(key.digest), key.digest,
    )
    if codec != RAW_CODEC:
        fields += _CODEC.pack(codec)
    check = _CHECKSUM.pack(_checksum(fields, payload)) if auth is None else \
        auth.sign(fields, payload)
    return (fields + check).ljust(HEADER_SIZE, b"\0")


def decode(key: ChunkKey, data: torch.Tensor,
           auth: ChunkAuth | None = None) -> tuple[ChunkMeta, torch.Tensor]:
    """``decode_coded`` for raw chunks only: an encoded one raises ``ChunkUnknownCodec`` (its
    reader is ``lmcache_ext.codecs.ChunkStage``)."""
    meta, codec, payload = decode_coded(key, data, auth)
    if codec != RAW_CODEC:
        raise ChunkUnknownCodec(f"an encoded chunk (codec {codec}) where raw KV was expected")
    return meta, payload


def decode_coded(key: ChunkKey, data: torch.Tensor,
                 auth: ChunkAuth | None = None) -> tuple[ChunkMeta, int, torch.Tensor]:
    """Check ``data`` (flat uint8: header then payload, maybe padded); return (meta, codec id,
    payload).

    The payload is a view into ``data``; ``meta`` describes the decoded KV (for a raw chunk the
    payload is that KV's bytes). Raises ``ChunkCorrupt`` on any mismatch: a short buffer, wrong
    magic or version, a size that does not add up, a bad checksum, a key that is not ``key``.
    With ``auth`` only keyed (version 2 / 4) values pass, and ``ChunkForged`` is raised for an
    unkeyed value, a tag none of its keys makes, or an authentic value of another key (a
    replay: the tag covers the key in the header). Without ``auth`` a keyed value is a
    ``ChunkCorrupt`` (this reader cannot check it). The codec id is not checked here.
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
    if magic != MAGIC or not FORMAT_VERSION <= version <= KEYED_CODEC_FORMAT_VERSION:
        raise ChunkCorrupt(f"bad magic/version {magic!r}/{version}")
    keyed = version in _KEYED_VERSIONS
    if auth is None and keyed:
        raise ChunkCorrupt("a keyed value, and no key is configured to check it")
    if auth is not None and not keyed:
        raise ChunkForged("an unkeyed value where only keyed ones are accepted")
    if code not in CODE_DTYPES or not 0 < ndim <= MAX_DIMS:
        raise ChunkCorrupt(f"bad dtype code {code} or ndim {ndim}")
    meta = ChunkMeta(CODE_DTYPES[code], tuple(shape_all[:ndim]), num_tokens)
    covered = _FIELDS.size
    codec = RAW_CODEC
    if version in _CODEC_VERSIONS:
        (codec,) = _CODEC.unpack_from(head, covered)
        covered += _CODEC.size
    if (codec == RAW_CODEC and meta.nbytes != nbytes) or data.numel() < HEADER_SIZE + nbytes:
        raise ChunkCorrupt(f"payload of {data.numel() - HEADER_SIZE} bytes, header says {nbytes}")
    payload = data[HEADER_SIZE:HEADER_SIZE + nbytes]
    _check(head, covered, payload, auth)
    if namespace.rstrip(b"\0").decode(errors="replace") != key.namespace[:16] or \
            digest[:digest_len] != key.digest:
        wrong = ChunkCorrupt if auth is None else ChunkForged
        raise wrong("the chunk belongs to another key")
    return meta, codec, payload


def _check(head: bytes, covered: int, payload: torch.Tensor, auth: ChunkAuth | None) -> None:
    """The checksum (unkeyed) or tag (keyed) over ``head[:covered]`` and the payload."""
    fields = head[:covered]
    if auth is None:
        (stored,) = _CHECKSUM.unpack_from(head, covered)
        if stored != _checksum(fields, payload):
            raise ChunkCorrupt("checksum mismatch")
    elif not auth.verify(fields, payload, head[covered:covered + TAG_SIZE]):
        raise ChunkForged("its tag is not made by this endpoint's key")


def as_kv(meta: ChunkMeta, payload: torch.Tensor) -> torch.Tensor:
    """View a flat uint8 payload as the KV tensor ``meta`` describes (no copy)."""
    return payload.view(meta.dtype).view(meta.shape)

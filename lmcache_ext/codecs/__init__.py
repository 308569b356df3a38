"""The codec stage between a tier and its stored bytes: which codec a chunk's payload is encoded
with (named in the chunk header), whether the value is sealed (encrypted), and how it is checked.

``ChunkStage.encode`` turns KV into one stored value; ``ChunkStage.decode`` turns any value this
stage can read back into KV; ``ChunkStage.open`` checks it the same way but leaves a codec's
payload undecoded (``CodedKV``), so a loader can decode it straight into vLLM's blocks
(``paged_decode``). Reading does not depend on the codec the reader writes with: a raw chunk
loads in a tier configured for ``int4`` and the reverse, because the header names the codec.
A codec id this reader does not know is ``ChunkUnknownCodec`` (a counted miss, never a guess).
Registry: ``CODECS`` by name (what a config selects), ``CODEC_IDS`` by header id (what a reader
decodes: these and the ``LEGACY`` layouts of ids 1 and 2 that earlier versions wrote as
``int8`` / ``int4``); ``raw`` (id 0) is the KV's own bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmcache_ext.chunk import (
    HEADER_SIZE,
    RAW_CODEC,
    ChunkAuth,
    ChunkCorrupt,
    ChunkForged,
    ChunkMeta,
    ChunkUnknownCodec,
    as_kv,
    decode_coded,
    encode_header,
    payload_view,
)
from lmcache_ext.codecs.quantize import (
    INT4,
    INT8,
    LEGACY,
    Codec,
    CodecUnfit,
    GroupQuantCodec,
    KVQuantCodec,
)
from lmcache_ext.codecs.seal import SEAL_OVERHEAD, ChunkSealer, is_sealed
from lmcache_ext.keys import ChunkKey

__all__ = ["CODECS", "CODEC_IDS", "ChunkSealer", "ChunkStage", "CodedKV", "Codec",
           "CodecUnfit", "GroupQuantCodec", "KVQuantCodec", "RAW"]

RAW = "raw"
CODECS: dict[str, Codec | None] = {RAW: None, INT8.name: INT8, INT4.name: INT4}
# What a reader decodes: the codecs written now and the layouts earlier versions wrote.
CODEC_IDS: dict[int, Codec] = {c.id: c for c in (*CODECS.values(), *LEGACY) if c is not None}
assert RAW_CODEC not in CODEC_IDS and len(CODEC_IDS) == len(CODECS) - 1 + len(LEGACY)


@dataclass(frozen=True)
class CodedKV:
    """A checked codec payload (a view into the value read) and the KV it decodes to. Decoded
    when asked (``decode``), or straight into a serving engine's blocks
    (``paged_decode.decode_into``) without the decoded chunk ever existing."""

    codec: Codec
    meta: ChunkMeta
    payload: torch.Tensor  # flat uint8, ``codec.encoded_size(meta)`` bytes

    def decode(self) -> torch.Tensor:
        return self.codec.decode(self.payload, self.meta)


@dataclass(frozen=True)
class ChunkStage:
    """How one tier stores chunks: ``codec`` (a ``CODECS`` name) for what it writes, ``auth``
    (keyed tag) and ``sealer`` (AES-256-GCM) for what it writes and accepts. Immutable,
    thread-safe. ``passthrough``: raw and unsealed, so a tier may keep its zero-copy write."""

    codec: str = RAW
    auth: ChunkAuth | None = None
    sealer: ChunkSealer | None = None

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; known: {', '.join(CODECS)}")

    @property
    def passthrough(self) -> bool:
        return self.codec == RAW and self.sealer is None

    def encode(self, key: ChunkKey, kv: torch.Tensor) -> bytes | bytearray:
        """One stored value: the chunk (header + payload, encoded with ``codec`` where that is
        smaller and possible, else raw), sealed when a sealer is set. ``kv`` may be on any
        device; the value is host bytes. Raises ValueError for KV that cannot be stored."""
        meta = ChunkMeta.of(kv)
        payload, codec_id = self._payload(kv, meta)
        header = encode_header(key, meta, payload, self.auth, codec_id)
        data = _join(header, payload)
        return data if self.sealer is None else self.sealer.seal(key, data)

    def encoded_size_bound(self, meta: ChunkMeta) -> int:
        """The most bytes ``encode`` makes for KV of ``meta`` (raw is the fallback)."""
        return HEADER_SIZE + meta.nbytes + (SEAL_OVERHEAD if self.sealer is not None else 0)

    def decode(self, key: ChunkKey, data: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(KV, whether it is a view into ``data``) of a stored value (flat uint8, maybe padded).
        Raises as ``open``."""
        kv, is_view = self.open(key, data)
        return (kv.decode(), False) if isinstance(kv, CodedKV) else (kv, is_view)

    def open(self, key: ChunkKey, data: torch.Tensor) -> tuple[torch.Tensor | CodedKV, bool]:
        """(KV, or a codec's checked payload not yet decoded; whether it is a view into
        ``data``) of a stored value (flat uint8, maybe padded). Raises ``ChunkForged`` (an
        unsealed value where sealing is on, a value that does not open, a failed tag),
        ``ChunkUnknownCodec``, or ``ChunkCorrupt`` (anything else, including a sealed value
        where this stage holds no sealing key)."""
        sealed = is_sealed(data)
        if self.sealer is not None:
            if not sealed:
                raise ChunkForged("an unencrypted value where only encrypted ones are accepted")
            data = self.sealer.open(key, data)
        elif sealed:
            raise ChunkCorrupt("an encrypted value, and no encryption key is configured")
        meta, codec_id, payload = decode_coded(key, data, self.auth)
        if codec_id == RAW_CODEC:
            return as_kv(meta, payload), not sealed
        codec = CODEC_IDS.get(codec_id)
        if codec is None:
            raise ChunkUnknownCodec(f"codec id {codec_id} is unknown to this reader")
        try:
            expected = codec.encoded_size(meta)
            if payload.numel() != expected:
                raise ChunkCorrupt(f"{codec.name} payload of {payload.numel()} bytes, its "
                                   f"meta needs {expected}")
            if isinstance(codec, KVQuantCodec):
                codec.check(payload, meta)
        except CodecUnfit as exc:
            raise ChunkCorrupt(str(exc)) from exc
        return CodedKV(codec, meta, payload), not sealed

    def _payload(self, kv: torch.Tensor, meta: ChunkMeta) -> tuple[torch.Tensor, int]:
        codec = CODECS[self.codec]
        if codec is not None and kv.is_floating_point():
            try:
                if codec.encoded_size(meta) < meta.nbytes:
                    return codec.encode(kv).cpu(), codec.id
            except CodecUnfit:
                pass  # stored raw, which every reader reads
        return payload_view(kv if kv.device.type == "cpu" else kv.cpu()), RAW_CODEC


def _join(header: bytes, payload: torch.Tensor) -> bytearray:
    value = bytearray(len(header) + payload.numel())
    value[:len(header)] = header
    value[len(header):] = memoryview(payload.numpy())
    return value

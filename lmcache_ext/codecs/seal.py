"""Encryption at rest: a stored chunk sealed with AES-256-GCM (``cryptography``'s AEAD).

A sealed value is an envelope around the whole chunk (header and payload, as ``chunk`` makes
them)::

    magic "LMXE" | version (1 byte) | key id (8 bytes) | nonce (12 bytes) | ciphertext length
    (8 bytes, little-endian) | ciphertext (the chunk) | GCM tag (16 bytes)

- a fresh random 96-bit nonce per value (``os.urandom``);
- associated data: the envelope's first 33 bytes and the chunk key (namespace and digest), so a
  value copied under another key's name, or from another namespace, fails to open, as the keyed
  tag does today;
- the key id names which secret sealed the value (a BLAKE3 derivation, not the key), so a reader
  in a rotation opens with the right key at once; the previous secret only opens, never seals;
- the AES key is derived from the operator's secret with BLAKE3's KDF under a context that names
  this use, so one secret may serve a tier's tag (``ChunkAuth``) and its cipher: the two keys
  are independent.

Anything that fails (no envelope, unknown key id, altered bytes, another key's value) raises
``ChunkForged`` (the tiers count it and serve a miss). Thread-safe (immutable after start).
"""

from __future__ import annotations

import os
import struct
import warnings

import blake3
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from lmcache_ext.chunk import MIN_SECRET_BYTES, ChunkCorrupt, ChunkForged
from lmcache_ext.keys import ChunkKey

SEAL_MAGIC = b"LMXE"
SEAL_VERSION = 1
_ENVELOPE = struct.Struct("<4sB8s12sQ")
ENVELOPE_SIZE = _ENVELOPE.size
GCM_TAG_SIZE = 16
SEAL_OVERHEAD = ENVELOPE_SIZE + GCM_TAG_SIZE
_KEY_CONTEXT = "lmcache-ext 2026 chunk seal AES-256-GCM key"
_ID_CONTEXT = "lmcache-ext 2026 chunk seal key id"


def _spend_frombuffer_warning() -> None:
    """Opened values are immutable ``bytes`` that readers only read (as the remote tier's are);
    torch warns once per process that such a tensor is not writable: spend it here, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_frombuffer_warning()


def is_sealed(data: torch.Tensor) -> bool:
    """Whether flat uint8 ``data`` starts like a sealed value (not whether it opens)."""
    return data.numel() >= 4 and data[:4].numpy().tobytes() == SEAL_MAGIC


class ChunkSealer:
    """Seals with the current secret; opens with it or, during a rotation, the previous one.
    Secrets are turned into keys once, here, and never kept or shown in ``repr``."""

    __slots__ = ("_ciphers", "_seal_id")

    def __init__(self, secret: bytes, previous: bytes | None = None):
        """Raises ValueError for a secret shorter than ``MIN_SECRET_BYTES``."""
        secrets = [secret] + ([previous] if previous is not None else [])
        for value in secrets:
            if len(value) < MIN_SECRET_BYTES:
                raise ValueError(f"the secret is {len(value)} bytes; at least "
                                 f"{MIN_SECRET_BYTES} are needed (e.g. openssl rand -hex 32)")
        self._ciphers: dict[bytes, AESGCM] = {}
        for value in secrets:
            key_id = blake3.blake3(value, derive_key_context=_ID_CONTEXT).digest()[:8]
            self._ciphers.setdefault(key_id, AESGCM(
                blake3.blake3(value, derive_key_context=_KEY_CONTEXT).digest()))
        self._seal_id = next(iter(self._ciphers))

    def __repr__(self) -> str:
        return f"ChunkSealer({len(self._ciphers)} key(s))"

    def seal(self, key: ChunkKey, chunk_bytes: bytes | memoryview) -> bytes:
        """The envelope of ``chunk_bytes`` (a whole chunk) stored under ``key``."""
        head = _ENVELOPE.pack(SEAL_MAGIC, SEAL_VERSION, self._seal_id, os.urandom(12),
                              len(chunk_bytes))
        sealed = self._ciphers[self._seal_id].encrypt(head[13:25], chunk_bytes,
                                                      head + _key_bytes(key))
        return head + sealed

    def open(self, key: ChunkKey, data: torch.Tensor) -> torch.Tensor:
        """The chunk inside sealed ``data`` (flat uint8, maybe padded after the tag) as a flat
        uint8 tensor over new, read-only bytes. Raises ``ChunkForged`` if it does not open."""
        if data.numel() < SEAL_OVERHEAD:
            raise ChunkCorrupt(f"{data.numel()} bytes is shorter than a sealed envelope")
        head = data[:ENVELOPE_SIZE].numpy().tobytes()
        magic, version, key_id, nonce, length = _ENVELOPE.unpack(head)
        if magic != SEAL_MAGIC or version != SEAL_VERSION:
            raise ChunkForged(f"not a sealed value (magic/version {magic!r}/{version})")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise ChunkForged("sealed with a key this endpoint does not hold")
        end = ENVELOPE_SIZE + length + GCM_TAG_SIZE
        if data.numel() < end:
            raise ChunkCorrupt(f"sealed value of {data.numel()} bytes, envelope says {end}")
        try:
            plain = cipher.decrypt(nonce, memoryview(data[ENVELOPE_SIZE:end].numpy()),
                                   head + _key_bytes(key))
        except InvalidTag:
            raise ChunkForged("does not open: altered, or sealed for another key") from None
        return torch.frombuffer(plain, dtype=torch.uint8) if plain else \
            torch.empty(0, dtype=torch.uint8)


def _key_bytes(key: ChunkKey) -> bytes:
    namespace = key.namespace.encode()
    return len(namespace).to_bytes(2, "little") + namespace + key.digest

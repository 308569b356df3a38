"""Which keys a tier signs, checks and encrypts chunks with, read from the env vars the config
names, and the tier's codec stage built from them.

The secrets live only in the environment (like ``remote_password_env``); the config holds the
names of the variables. ``chunk_auth`` / ``chunk_sealer`` / ``chunk_stage`` are called once per
tier at start; ``integrity_notes`` says, for ``config check`` and the engine's start-up log,
whether each shared tier is keyed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from lmcache_ext.chunk import ChunkAuth
from lmcache_ext.codecs import ChunkSealer, ChunkStage
from lmcache_ext.config import ConfigError, EngineConfig

# tier name -> its config keys' stem (``<stem>_auth_key_env``, ``<stem>_auth_previous_key_env``)
TIER_STEMS = {"remote": "remote", "disk": "local_disk"}


def chunk_auth(config: EngineConfig, tier: str,
               env: Mapping[str, str] | None = None) -> ChunkAuth | None:
    """The tier's keys, or None when it is unkeyed. Raises ConfigError naming the config key for
    an env var that is not set or holds too short a secret (the secret is never shown)."""
    secrets = _secrets(config, TIER_STEMS[tier], "auth", ChunkAuth, env)
    return None if secrets is None else ChunkAuth(*secrets)


def chunk_sealer(config: EngineConfig, tier: str,
                 env: Mapping[str, str] | None = None) -> ChunkSealer | None:
    """The tier's encryption keys (``<stem>_encryption_key_env`` and its previous one), or None
    when its chunks are stored in the clear. ConfigErrors as ``chunk_auth``'s."""
    secrets = _secrets(config, TIER_STEMS[tier], "encryption", ChunkSealer, env)
    return None if secrets is None else ChunkSealer(*secrets)


def chunk_stage(config: EngineConfig, tier: str,
                env: Mapping[str, str] | None = None) -> ChunkStage:
    """The tier's codec stage: its codec (``local_disk_codec`` / ``remote_serde``), keys and
    encryption keys."""
    codec = config.local_disk_codec if tier == "disk" else config.remote_codec
    return ChunkStage(codec, chunk_auth(config, tier, env), chunk_sealer(config, tier, env))


def _secrets(config: EngineConfig, stem: str, use: str, check: type,
             env: Mapping[str, str] | None) -> tuple[bytes, bytes | None] | None:
    """(current, previous) secrets of ``<stem>_<use>_key_env`` and
    ``<stem>_<use>_previous_key_env``, each checked by building ``check`` from it; None when the
    current one is not configured."""
    env = os.environ if env is None else env
    secrets: list[bytes | None] = []
    for key in (f"{stem}_{use}_key_env", f"{stem}_{use}_previous_key_env"):
        var = getattr(config, key)
        if var is None:
            secrets.append(None)
            continue
        if not env.get(var):
            raise ConfigError([f"{key}: {var!r} ({config.source_of(key)}) names an env var that "
                               f"is not set or empty"])
        secret = env[var].encode()
        try:
            check(secret)
        except ValueError as exc:
            raise ConfigError([f"{key}: the secret in ${var} is unusable: {exc}"]) from exc
        secrets.append(secret)
    current, previous = secrets
    if current is None and previous is not None:
        key = f"{stem}_{use}_previous_key_env"
        raise ConfigError([f"{key}: {getattr(config, key)!r} ({config.source_of(key)}) is "
                           f"invalid without {stem}_{use}_key_env (the key that "
                           f"{'signs' if use == 'auth' else 'encrypts'})"])
    return None if current is None else (current, previous)


def integrity_notes(config: EngineConfig) -> list[tuple[bool, str]]:
    """(is a warning, text) for each tier that holds bytes others may write: how its chunks are
    checked. An unauthenticated shared store is a warning; an unkeyed local disk is not."""
    notes = []
    if config.remote_url:
        if config.remote_auth_key_env:
            notes.append((False, _keyed("remote", config.remote_auth_key_env,
                                        config.remote_auth_previous_key_env)))
        else:
            notes.append((True, "remote tier: UNAUTHENTICATED chunks (remote_auth_key_env is "
                                "not set): anyone who can write to the shared store can make "
                                "this endpoint serve KV of their choosing"))
    if config.local_disk:
        if config.local_disk_auth_key_env:
            notes.append((False, _keyed("disk", config.local_disk_auth_key_env,
                                        config.local_disk_auth_previous_key_env)))
        else:
            notes.append((False, "disk tier: unkeyed checksums (fine for a local disk; set "
                                 "local_disk_auth_key_env if the directory is shared)"))
    return notes


def _keyed(tier: str, var: str, previous: str | None) -> str:
    rotation = f", previous key from ${previous} still accepted (rotation)" if previous else ""
    return f"{tier} tier: chunks keyed (BLAKE3 tag), key from ${var}{rotation}"

"""Chunk keys from the environment: named by config keys, checked at start, never shown."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.chunk import ChunkForged, ChunkMeta, decode, encode_header, payload_view
from lmcache_ext.config import ConfigError, load_config
from lmcache_ext.storage.auth import chunk_auth, integrity_notes
from tests.helpers import chunk, key

SECRET = "k" * 40
OLD_SECRET = "o" * 40


def config_with(**overrides):
    return load_config(env={}, overrides=overrides)


def signed(auth) -> torch.Tensor:
    kv = chunk(1).kv
    payload = payload_view(kv)
    header = encode_header(key(1), ChunkMeta.of(kv), payload, auth)
    return torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), payload])


def test_no_key_env_means_an_unkeyed_tier():
    assert chunk_auth(config_with(remote_url="redis://h"), "remote", env={}) is None


def test_the_key_and_the_previous_key_come_from_the_env_vars_named():
    config = config_with(remote_auth_key_env="NEW", remote_auth_previous_key_env="OLD")
    auth = chunk_auth(config, "remote", env={"NEW": SECRET, "OLD": OLD_SECRET})
    old_only = chunk_auth(config_with(remote_auth_key_env="OLD"), "remote", env={"OLD": OLD_SECRET})
    assert auth.rotating
    decode(key(1), signed(old_only), auth)  # the previous key's values still read
    with pytest.raises(ChunkForged):
        decode(key(1), signed(auth), old_only)  # signed with the new key only


@pytest.mark.parametrize("overrides,env,needle", [
    ({"remote_auth_key_env": "NOPE"}, {}, "remote_auth_key_env: 'NOPE'"),
    ({"remote_auth_key_env": "SHORT"}, {"SHORT": "s3cret-but-short"}, "remote_auth_key_env"),
    ({"remote_auth_previous_key_env": "OLD"}, {"OLD": OLD_SECRET},
     "remote_auth_previous_key_env: 'OLD'"),
    ({"local_disk_auth_key_env": "NOPE"}, {}, "local_disk_auth_key_env: 'NOPE'"),
])
def test_an_unusable_key_env_is_a_config_error_naming_the_key(overrides, env, needle):
    tier = "disk" if "local_disk_auth_key_env" in overrides else "remote"
    with pytest.raises(ConfigError) as caught:
        chunk_auth(config_with(**overrides), tier, env=env)
    assert needle in str(caught.value)
    assert "s3cret-but-short" not in str(caught.value)


def test_notes_warn_about_an_unauthenticated_shared_store_only():
    open_store = integrity_notes(config_with(remote_url="redis://h", local_disk="/tmp/x",
                                             max_local_disk_size=1.0))
    assert [warning for warning, _ in open_store] == [True, False]
    assert "UNAUTHENTICATED" in open_store[0][1] and "unkeyed" in open_store[1][1]
    keyed = integrity_notes(config_with(remote_url="redis://h", remote_auth_key_env="K"))
    assert keyed == [(False, "remote tier: chunks keyed (BLAKE3 tag), key from $K")]
    assert integrity_notes(config_with()) == []

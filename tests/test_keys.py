"""Keys: chained prefix hashes, namespaces, and stability across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from lmcache_ext.keys import KeyNamespace, PrefixHasher

NS = KeyNamespace(model_name="m", num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16",
                  chunk_size=16)


def keys(tokens, namespace=NS, unfull=False):
    return [s.key for s in PrefixHasher(namespace, unfull).spans(tokens)]


def test_full_chunks_only_by_default():
    spans = PrefixHasher(NS).spans(list(range(40)))
    assert [(s.start, s.end) for s in spans] == [(0, 16), (16, 32)]


def test_unfull_chunk_when_asked():
    spans = PrefixHasher(NS, save_unfull_chunk=True).spans(list(range(40)))
    assert [(s.start, s.end) for s in spans] == [(0, 16), (16, 32), (32, 40)]
    assert spans[2].key != keys(list(range(48)))[2]  # a partial chunk never poses as a full one


def test_shared_prefix_shares_keys_and_a_change_in_chunk_k_changes_keys_from_k_on():
    base = list(range(64))
    changed = base.copy()
    changed[33] = 999  # chunk 2
    a, b = keys(base), keys(changed)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:], strict=True))


def test_a_key_names_the_whole_prefix_not_just_its_chunk():
    tail = list(range(16, 32))
    assert keys([0] * 16 + tail)[1] != keys([1] * 16 + tail)[1]


@pytest.mark.parametrize("field,value", [
    ("model_name", "other"), ("num_layers", 3), ("num_kv_heads", 4), ("head_dim", 16),
    ("dtype", "bfloat16"), ("chunk_size", 32), ("tp_rank", 1), ("tp_world_size", 2),
    ("salt", "tenant-a"), ("hash_algorithm", "xxh3_128"),
])
def test_everything_in_the_namespace_changes_the_keys(field, value):
    tokens = list(range(32))
    other = replace(NS, **{field: value})
    assert keys(tokens)[0] != keys(tokens, other)[0]
    assert keys(tokens)[0].namespace != keys(tokens, other)[0].namespace


def test_token_container_does_not_matter():
    tokens = list(range(48))
    assert keys(tokens) == keys(np.array(tokens, dtype=np.int32)) == keys(tuple(tokens))


def test_xxh3_option_gives_16_byte_digests():
    assert len(keys(list(range(16)), replace(NS, hash_algorithm="xxh3_128"))[0].digest) == 16
    assert len(keys(list(range(16)))[0].digest) == 32


def test_keys_are_the_same_in_other_processes_with_other_hash_seeds():
    """Scenario: two workers (or two machines) must agree on keys (LMCache#1139)."""
    code = (
        "import json; from lmcache_ext.keys import KeyNamespace, PrefixHasher; "
        "ns = KeyNamespace('m', 2, 2, 8, 'float16', 16); "
        "print(json.dumps([str(s.key) for s in PrefixHasher(ns).spans(list(range(64)))]))"
    )
    mine = [str(k) for k in keys(list(range(64)))]
    for seed in ("0", "12345", "random"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, check=True, timeout=60).stdout
        assert json.loads(out) == mine


def test_a_salt_re_roots_the_chain_and_the_same_salt_agrees():
    """Scenario: a LoRA adapter or a per-request cache salt must never share another's KV."""
    hasher = PrefixHasher(NS)
    tokens = list(range(32))
    plain, salted = hasher.spans(tokens), hasher.spans(tokens, salt="lora=a")
    assert all(p.key != s.key for p, s in zip(plain, salted, strict=True))
    assert salted == hasher.spans(tokens, salt="lora=a")
    assert salted[0].key != hasher.spans(tokens, salt="lora=b")[0].key

"""The compiled CPU row loop (``paged_rows.scatter_rows``, what ``kernels.scatter`` takes on
the CPU) equals the per-token definition (``reference``) bit for bit, for every layout, dtype,
block size, slot mapping and a strided chunk; what it does not cover it declines."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lmcache_ext import kernels
from lmcache_ext.kernels import PagedKV, paged_rows, reference
from tests.kernels.test_block_copy import (
    BLOCK_SIZES,
    BLOCKS,
    DIM,
    DTYPES,
    HEADS,
    LAYERS,
    all_caches,
    named_mappings,
    verify_same_bytes,
)
from tests.kernels.test_paged_kernels import random_bits


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16], ids=str)
def test_scatter_rows_equals_per_token_scatter(dtype, block_size):
    for cache in all_caches(dtype, block_size, seed=2):
        for name, slots in named_mappings(block_size).items():
            chunk = random_bits((LAYERS, 2, len(slots), HEADS, DIM), dtype, seed=5)
            want, got = cache.clone(), cache.clone()
            reference.scatter(chunk, want.views(), slots)
            assert paged_rows.scatter_rows(chunk, got.views(), slots), cache.name
            for ref, fast in zip(want.buffers, got.buffers, strict=True):
                verify_same_bytes(ref, fast, f"{cache.name}: {name}")


def test_a_strided_chunk_and_a_part_of_one():
    """Scenario: a permuted chunk ([layers, 2, H, tokens, D] storage) and tokens [5, 40) of a
    tier's chunk (a slice along tokens), as the load pipeline hands them over."""
    cache = all_caches(torch.float32, 16, seed=4)[0]
    storage = random_bits((LAYERS, 2, HEADS, 48, DIM), torch.float32, seed=6)
    for chunk in (storage.transpose(2, 3), storage.transpose(2, 3)[:, :, 5:40]):
        slots = torch.arange(3, 3 + chunk.shape[2])
        want, got = cache.clone(), cache.clone()
        reference.scatter(chunk, want.views(), slots)
        kernels.scatter(chunk, got.views(), slots)
        verify_same_bytes(want.buffers[0], got.buffers[0], f"chunk strides {chunk.stride()}")


def test_declines_layers_that_differ_and_rows_that_are_not_contiguous():
    """K rows strided along head_dim, or layers whose views differ in strides: the torch
    path copies those (``kernels.scatter`` still matches the definition)."""
    slots = torch.arange(16)
    chunk = random_bits((LAYERS, 2, 16, HEADS, DIM), torch.float32, seed=7)
    wide = random_bits((BLOCKS, 16, HEADS, 2 * DIM), torch.float32, seed=8)
    strided = [PagedKV(wide[..., 0::2], wide[..., 1::2])] * LAYERS  # channel stride 2
    assert not paged_rows.scatter_rows(chunk, strided, slots)
    mixed = [PagedKV(random_bits((BLOCKS, 16, HEADS, DIM), torch.float32, i),
                     random_bits((BLOCKS, 16, HEADS, DIM), torch.float32, i + 9))
             for i in range(LAYERS - 1)]
    mixed.append(PagedKV(*(random_bits((BLOCKS, HEADS, 16, DIM), torch.float32, s)
                           .transpose(1, 2) for s in (20, 21))))
    assert not paged_rows.scatter_rows(chunk, mixed, slots)
    want = [PagedKV(v.k.clone(), v.v.clone()) for v in mixed]
    reference.scatter(chunk, want, slots)
    kernels.scatter(chunk, mixed, slots)
    for a, b in zip(want, mixed, strict=True):
        verify_same_bytes(a.k, b.k, "mixed layers: K")
        verify_same_bytes(a.v, b.v, "mixed layers: V")


def test_without_numba_the_torch_path_copies_and_says_so_once():
    """Scenario: an image whose Python has no numba (or cannot set it up). Scatter and a
    quantized load still land bit-exact through torch, and one warning says why."""
    script = textwrap.dedent("""
        import logging, sys
        sys.modules["numba"] = None  # `import numba` now raises ModuleNotFoundError
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        import torch
        from lmcache_ext import kernels
        from lmcache_ext.chunk import ChunkMeta
        from lmcache_ext.codecs.paged_decode import decode_into
        from lmcache_ext.codecs.quantize import INT8
        from lmcache_ext.kernels import PagedLayout, paged_rows, reference
        caches = [torch.zeros(4, 2, 16, 16) for _ in range(3)]
        views = kernels.paged_kv_layers(caches, PagedLayout.CPU_BLOCKED, 2, 8)
        want = [torch.zeros(4, 2, 16, 16) for _ in range(3)]
        chunk, slots = torch.randn(3, 2, 20, 2, 8), torch.arange(5, 25)
        kernels.scatter(chunk, views, slots)
        reference.scatter(chunk, kernels.paged_kv_layers(want, PagedLayout.CPU_BLOCKED, 2, 8),
                          slots)
        assert all(torch.equal(a, b) for a, b in zip(caches, want))
        assert not paged_rows.scatter_rows(chunk, views, slots)
        assert not decode_into(INT8, INT8.encode(chunk), ChunkMeta.of(chunk), 0, 20, views,
                               slots)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert done.stderr.count("compiled CPU copy loops are unavailable (ModuleNotFoundError") == 1

"""The compiled loops of ``paged_rows`` (numba; importing this module compiles nothing).
Inputs are checked by the callers: the loops do no bounds checks."""

from __future__ import annotations

import numba

JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@numba.njit(**JIT)
def scatter_rows(chunk, chunk_strides, layers, heads, dim, slots, keys, key_strides, values,
                 value_strides):
    """A chunk's rows (``chunk``: its memory from its first element; ``chunk_strides``: layer,
    K/V, token, head) into the layers' ``keys`` and ``values`` (``PagedRows``) at ``slots``
    (negative: skipped)."""
    for layer in range(layers):
        for side in range(2):
            dest = keys[layer] if side == 0 else values[layer]
            strides = key_strides if side == 0 else value_strides
            block_size = strides[3]
            for t in range(slots.shape[0]):
                slot = slots[t]
                if slot < 0:
                    continue
                at = (slot // block_size) * strides[0] + (slot % block_size) * strides[1]
                source = (layer * chunk_strides[0] + side * chunk_strides[1]
                          + t * chunk_strides[2])
                for _ in range(heads):
                    row, part = dest[at:at + dim], chunk[source:source + dim]
                    for d in range(dim):
                        row[d] = part[d]
                    at += strides[2]
                    source += chunk_strides[3]

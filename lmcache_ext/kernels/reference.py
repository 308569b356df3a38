"""Plain torch gather/scatter between paged KV views and chunk buffers: the definition of right.

Token by token: runs on any device; the oracle of the Triton kernel's and of the CPU block
path's tests, and that block path's fallback for rows it cannot copy block-wise
(``gather_rows``/``scatter_rows``). A negative slot means "skip this token" (vLLM pads slot
mappings with -1): gather leaves that row of the chunk untouched and scatter writes nothing for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmcache_ext.kernels.layouts import PagedKV, check_chunk


def _valid(slots: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows with a slot >= 0, their slots), both int64 on ``device``."""
    slots = slots.to(device=device, dtype=torch.int64)
    rows = torch.nonzero(slots >= 0).squeeze(1)
    return rows, slots[rows]


def _slot_rows(part: torch.Tensor) -> torch.Tensor | None:
    """``[blocks, block_size, H, D]`` as ``[slots, H, D]`` when that is a view (block stride =
    block_size x position stride, as in vLLM's LBNHC layout), else None."""
    if part.stride(0) != part.shape[1] * part.stride(1):
        return None
    return part.flatten(0, 1)


def gather_rows(views: Sequence[PagedKV], rows: torch.Tensor, slots: torch.Tensor,
                chunk: torch.Tensor) -> None:
    """``chunk[:, :, rows[i]]`` = the KV at ``slots[i]`` of every layer, token by token.

    ``rows``: ascending int64 chunk rows; ``slots``: their slots, all >= 0 (unchecked).
    """
    block_size = views[0].block_size
    blocks, offsets = slots // block_size, slots % block_size
    every_row = rows.numel() == chunk.shape[2]  # ascending and all of them: rows == arange
    for layer, view in enumerate(views):
        for kv, part in enumerate((view.k, view.v)):
            flat, dest = _slot_rows(part), chunk[layer, kv]
            if flat is not None and every_row and dest.is_contiguous():
                torch.index_select(flat, 0, slots, out=dest)  # one copy, straight into place
                continue
            picked = flat.index_select(0, slots) if flat is not None else part[blocks, offsets]
            dest.index_copy_(0, rows, picked)


def scatter_rows(chunk: torch.Tensor, views: Sequence[PagedKV], rows: torch.Tensor,
                 slots: torch.Tensor) -> None:
    """The KV at ``slots[i]`` of every layer = ``chunk[:, :, rows[i]]``, token by token.

    ``rows``: int64 chunk rows; ``slots``: their slots, all >= 0 (unchecked).
    """
    block_size = views[0].block_size
    blocks, offsets = slots // block_size, slots % block_size
    for layer, view in enumerate(views):
        for kv, part in enumerate((view.k, view.v)):
            flat = _slot_rows(part)
            # Both write through the view into the engine's blocks, whatever the strides.
            if flat is not None:
                flat.index_copy_(0, slots, chunk[layer, kv, rows])
            else:
                part[blocks, offsets] = chunk[layer, kv, rows]


def gather(views: Sequence[PagedKV], slots: torch.Tensor, chunk: torch.Tensor) -> None:
    """Copy the KV at ``slots`` of every layer into ``chunk`` ``[layers, 2, tokens, H, D]``."""
    check_chunk(views, chunk, slots)
    rows, kept = _valid(slots, views[0].k.device)
    gather_rows(views, rows, kept, chunk)


def scatter(chunk: torch.Tensor, views: Sequence[PagedKV], slots: torch.Tensor) -> None:
    """Copy ``chunk`` ``[layers, 2, tokens, H, D]`` into the KV at ``slots`` of every layer."""
    check_chunk(views, chunk, slots)
    rows, kept = _valid(slots, views[0].k.device)
    scatter_rows(chunk, views, rows, kept)

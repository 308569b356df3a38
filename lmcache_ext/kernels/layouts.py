"""The paged KV layouts a serving engine hands us, and how to see K and V in each of them.

Every supported layout is turned into two strided *views* (no copy) shaped
``[num_blocks, block_size, kv_heads, head_dim]``: one for K, one for V. The kernels only ever
address those views, so a new layout is one more entry here, not one more kernel.

The layouts (per layer, as vLLM gives them to a KV connector):

- ``PACKED`` (vLLM >= 0.26): ``[num_blocks, kv_heads, block_size, 2 * head_dim]``, K in the first
  half of the last dim and V in the second. The view is an ``as_strided`` slice of one flat buffer
  whose physical order is a ``KVCacheLayout`` permutation (LBNHC, LBHNC, BLNHC, ...), so it is
  usually non-contiguous: strides are read from the tensor, never assumed.
- ``CPU_BLOCKED`` (vLLM's CPU attention backend, all versions): the same 4-D tensor read as
  ``[num_blocks, kv_heads, 2, block_size, head_dim]``: per block and head all K rows, then all V
  rows. Same shape as ``PACKED``, different meaning: only the attention backend tells them apart.
- ``BLOCK_FIRST`` (vLLM < 0.26: FlashAttention and FlashInfer in 0.23, K/V = ``unbind(1)``):
  ``[num_blocks, 2, block_size, kv_heads, head_dim]``, possibly with HND strides.
- ``KV_FIRST`` (older backends): ``[2, num_blocks, block_size, kv_heads, head_dim]``.

MLA caches (one latent per token, no separate K and V) do not fit the chunk format
``[layers, 2, tokens, kv_heads, head_dim]`` and are refused with ``UnsupportedLayout``.

A token's slot is ``block_id * block_size + position % block_size``. When vLLM splits its
scheduler blocks into smaller kernel blocks, dim 0 of the view counts kernel blocks; because the
kernel blocks of one scheduler block sit at one constant stride, the scheduler's slot number is
also the kernel view's slot number, so slot mappings need no translation.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch


class UnsupportedLayout(ValueError):
    """A paged KV cache whose layout we cannot read: never guessed, always an error."""


class PagedLayout(enum.Enum):
    PACKED = "packed"  # vLLM >= 0.26: [blocks, heads, block_size, 2 * head_dim]
    CPU_BLOCKED = "cpu_blocked"  # CPU backend: [blocks, heads, block_size, 2 * head_dim]
    BLOCK_FIRST = "block_first"  # vLLM < 0.26: [blocks, 2, block_size, heads, head_dim]
    KV_FIRST = "kv_first"  # older backends: [2, blocks, block_size, heads, head_dim]


@dataclass(frozen=True)
class PagedKV:
    """One layer's paged K and V as strided views ``[num_blocks, block_size, heads, head_dim]``.

    The views alias the serving engine's cache: writing into them writes into its blocks.
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def num_slots(self) -> int:
        return self.k.shape[0] * self.k.shape[1]


def _expect(cache: torch.Tensor, dims: int, what: str, ok: bool) -> None:
    if cache.dim() != dims or not ok:
        raise UnsupportedLayout(
            f"a {what} KV cache must be {dims}-dimensional {_SHAPES[what]}, got shape "
            f"{tuple(cache.shape)} (an MLA or otherwise unsupported layout?)")


_SHAPES = {
    "packed": "[blocks, kv_heads, block_size, 2 * head_dim]",
    "cpu_blocked": "[blocks, kv_heads, block_size, 2 * head_dim]",
    "block_first": "[blocks, 2, block_size, kv_heads, head_dim]",
    "kv_first": "[2, blocks, block_size, kv_heads, head_dim]",
}


def paged_kv(cache: torch.Tensor, layout: PagedLayout, num_kv_heads: int,
             head_dim: int) -> PagedKV:
    """K and V views of one layer's cache; ``UnsupportedLayout`` if the shape does not match."""
    if layout is PagedLayout.PACKED:
        _expect(cache, 4, layout.value,
                cache.dim() == 4 and cache.shape[1] == num_kv_heads
                and cache.shape[3] == 2 * head_dim)
        # [B, H, N, 2D] -> K, V as [B, N, H, D]
        k = cache[..., :head_dim].permute(0, 2, 1, 3)
        v = cache[..., head_dim:].permute(0, 2, 1, 3)
        return PagedKV(k, v)
    if layout is PagedLayout.CPU_BLOCKED:
        _expect(cache, 4, layout.value,
                cache.dim() == 4 and cache.shape[1] == num_kv_heads
                and cache.shape[3] == 2 * head_dim)
        blocks, heads, size, _ = cache.shape
        # As vLLM's CPU backend does: view [B, H, 2N, D], K = first N rows, V = the rest.
        try:
            split = cache.view(blocks, heads, 2, size, head_dim)
        except RuntimeError as exc:
            raise UnsupportedLayout(f"a cpu_blocked KV cache must be contiguous within a "
                                    f"block and head: {exc}") from exc
        return PagedKV(split[:, :, 0].permute(0, 2, 1, 3), split[:, :, 1].permute(0, 2, 1, 3))
    if layout is PagedLayout.KV_FIRST:
        _expect(cache, 5, layout.value,
                cache.dim() == 5 and cache.shape[0] == 2
                and tuple(cache.shape[3:]) == (num_kv_heads, head_dim))
        return PagedKV(cache[0], cache[1])
    if layout is PagedLayout.BLOCK_FIRST:
        _expect(cache, 5, layout.value,
                cache.dim() == 5 and cache.shape[1] == 2
                and tuple(cache.shape[3:]) == (num_kv_heads, head_dim))
        return PagedKV(cache[:, 0], cache[:, 1])
    raise UnsupportedLayout(f"unknown paged layout {layout!r}")


def paged_kv_layers(caches: Sequence[torch.Tensor], layout: PagedLayout, num_kv_heads: int,
                    head_dim: int) -> list[PagedKV]:
    """``paged_kv`` for every layer, checking that all layers agree on dtype and block size."""
    views = [paged_kv(c, layout, num_kv_heads, head_dim) for c in caches]
    if len({(v.k.dtype, v.block_size, v.k.device) for v in views}) > 1:
        raise UnsupportedLayout("all layers must share one dtype, block size and device")
    return views


def check_chunk(views: Sequence[PagedKV], chunk: torch.Tensor, slots: torch.Tensor,
                host_slots: torch.Tensor | None = None) -> None:
    """``chunk`` must be ``[layers, 2, len(slots), heads, head_dim]`` in the caches' dtype and
    every slot below the cache's slot count: ValueError otherwise.

    The bounds are checked on a host tensor only, never by reading a device tensor back (that
    would wait for the GPU on the copy path): on ``slots`` when it is on the CPU, else on
    ``host_slots`` (its host copy, same length). Device slots alone are not bounds-checked
    here; the Triton kernel then skips any slot past the cache instead of touching memory
    outside it."""
    if not views:
        raise ValueError("no KV cache layers given")
    first = views[0].k
    want = (len(views), 2, slots.shape[0], first.shape[2], first.shape[3])
    if tuple(chunk.shape) != want or chunk.dtype != first.dtype:
        raise ValueError(f"chunk must be {first.dtype} {want} [layers, 2, tokens, kv_heads, "
                         f"head_dim], got {chunk.dtype} {tuple(chunk.shape)}")
    if slots.dim() != 1 or slots.dtype not in (torch.int32, torch.int64):
        raise ValueError("slot mapping must be a 1-D int32/int64 tensor")
    host = slots if slots.device.type == "cpu" else host_slots
    if host is None or not host.numel():
        return
    if host.device.type != "cpu" or tuple(host.shape) != tuple(slots.shape):
        raise ValueError(f"host_slots must be the slots' host copy {tuple(slots.shape)}, got "
                         f"{host.device} {tuple(host.shape)}")
    top = int(host.max())
    if top >= views[0].num_slots:
        raise ValueError(f"slot {top} is past the cache's {views[0].num_slots} slots")


T = TypeVar("T")


class LayerSetMemo(Generic[T]):
    """What ``build`` makes of the last layer set, so a connector copying chunk after chunk
    through the same views works it out once. Keyed by the identity of the ``PagedKV`` objects,
    held weakly (the memo never keeps an engine's cache alive); assumes their tensors are not
    re-pointed in place (``set_``). One entry, replaced whole: safe across threads."""

    def __init__(self, build: Callable[[Sequence[PagedKV]], T]) -> None:
        self._build = build
        self._entry: tuple[tuple[weakref.ref, ...], T] | None = None

    def get(self, views: Sequence[PagedKV]) -> T:
        entry = self._entry
        if entry is not None and len(entry[0]) == len(views) and all(
                ref() is view for ref, view in zip(entry[0], views, strict=True)):
            return entry[1]
        built = self._build(views)
        self._entry = (tuple(weakref.ref(v) for v in views), built)
        return built

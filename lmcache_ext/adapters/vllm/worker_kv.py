"""vLLM's paged KV caches on one rank, as the connector's loads and saves reach them."""

from __future__ import annotations

import numpy as np
import torch

from lmcache_ext import kernels
from lmcache_ext.adapters.vllm.load_pipeline import LoadStreams
from lmcache_ext.adapters.vllm.staging import StagingArea
from lmcache_ext.kernels.streams import StreamOrder


class RankKV:
    """The registered caches' per-layer views (no copy), the staging buffers, the device's
    stream order and the side streams of each thread that copies: in-step loads (vLLM's
    thread, ``step_streams``), background loads (the loader, ``background_streams``), saves
    (the saver, ``save_stream``). Set once by ``register``; before it, CPU streams and no
    caches."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.views: list[kernels.PagedKV] = []
        self.staging: StagingArea | None = None
        self.use_device(torch.device("cpu"))

    def register(self, views: list[kernels.PagedKV], staging: StagingArea) -> None:
        self.views, self.staging = views, staging
        self.use_device(views[0].k.device)

    def use_device(self, device: torch.device) -> None:
        self.order = StreamOrder(device)
        self.step_streams = LoadStreams(self.order.side(), self.order.side())
        self.background_streams = LoadStreams(self.order.side(), self.order.side())
        self.save_stream = self.order.side()

    def host_slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """The paged-cache slot of each position in [start, end): int64 on the host, pinned
        where the KV is on a GPU (its copy there then needs no host wait), built once per
        transfer. Raises ValueError if a position's block is missing or past the cache."""
        # numpy, not torch: a few vectorized ops on small arrays, where torch's intra-op
        # threads cost milliseconds on a busy host (benchmarks/bookkeeping.py: 15 us vs 0.1-20 ms).
        size = self.block_size
        if end <= start:
            return torch.empty(0, dtype=torch.int64)
        first, last = start // size, (end - 1) // size
        if last >= len(block_ids):
            raise ValueError(f"positions up to {end} need {last + 1} blocks, the "
                             f"transfer names {len(block_ids)}")
        blocks = np.asarray(block_ids[first:last + 1], dtype=np.int64)
        offsets = start - first * size
        slots = (blocks[:, None] * size + np.arange(size)).reshape(-1)[
            offsets:offsets + end - start]
        low, high = int(slots.min()), int(slots.max())
        if not 0 <= low <= high < self.views[0].num_slots:
            raise ValueError(f"slots {low}..{high} are outside the cache's "
                             f"{self.views[0].num_slots}")
        slots = torch.from_numpy(slots)
        return slots.pin_memory() if self.order.cuda else slots

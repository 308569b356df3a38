"""``OPTION_LMCACHE_AUTO_CONFIG=true``: size the CPU and disk tiers for the machine at start.

Reads free RAM (``/proc/meminfo`` MemAvailable), free disk under the cache directory, the number
of tensor-parallel workers and the model as LMI reads them (``lmi_settings``) and, if it can find
the model's ``config.json``, its KV bytes per token
(so the log says how many tokens each tier holds). Sizes are per worker (each worker keeps its
own shard, as in LMCache). Headroom for the model server: 20% of free RAM plus 4 GiB per worker
(vLLM's processes, weight loading, pinned staging buffers); 10% of free disk.
No side effects but reading files; the caller exports the result.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lmcache_ext.container.lmi_settings import LmiSettings
from lmcache_ext.sizing.advisor import ModelShape, fmt_tokens, read_model_config
from lmcache_ext.units import GIB

RAM_SHARE = 0.8
WORKER_RESERVE_GIB = 4.0
DISK_SHARE = 0.9
MIN_TIER_GIB = 0.5  # below this a tier holds too few chunks to be worth having


@dataclass(frozen=True)
class AutoSizes:
    """Chosen sizes in GiB per worker (None: that tier is not sized) and the reasoning."""

    cpu_gib: float | None
    disk_gib: float | None
    lines: tuple[str, ...]
    problem: str | None = None  # set when a tier cannot be sized (too little RAM or disk)


def mem_available_bytes(meminfo: str = "/proc/meminfo") -> int:
    with open(meminfo, encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemAvailable line")


def find_model_config(settings: LmiSettings) -> Path | None:
    """config.json of the model LMI loads (a folder, or a cached HF id), or the model dir's."""
    model_id, _source = settings.model_id
    candidates = [Path(model_id) / "config.json"]
    if not model_id.startswith("/") and "/" in model_id:
        hf_home = settings.env.get("HF_HOME", os.path.expanduser("~/.cache/huggingface"))
        pattern = f"{hf_home}/hub/models--{model_id.replace('/', '--')}/snapshots/*/config.json"
        candidates += [Path(p) for p in sorted(glob.glob(pattern))]
    candidates.append(Path(settings.model_dir) / "config.json")
    return next((path for path in candidates if path.is_file()), None)


def _model_line(settings: LmiSettings) -> tuple[ModelShape | None, str]:
    path = find_model_config(settings)
    if path is None:
        model_id, source = settings.model_id
        return None, (f"model {model_id} ({source}): config.json not found here, sizes in GiB "
                      f"only")
    try:
        model = read_model_config(path)
    except (OSError, ValueError, KeyError) as exc:
        return None, f"model config {path} unreadable ({exc}): sizes in GiB only"
    return model, f"model {path}: {model.kv_bytes_per_token} B of KV per token"


def _tokens(model: ModelShape | None, gib: float, workers: int) -> str:
    if model is None:
        return ""
    return f" = {fmt_tokens(gib * workers * GIB / model.kv_bytes_per_token)} tokens"


def size_cpu(free_ram: int, workers: int, model: ModelShape | None) -> tuple[float, str]:
    total = free_ram * RAM_SHARE - WORKER_RESERVE_GIB * GIB * workers
    per_worker = round(max(total, 0) / workers / GIB, 1)
    return per_worker, (f"CPU tier: {RAM_SHARE:.0%} of {free_ram / GIB:.1f} GiB free RAM - "
                        f"{WORKER_RESERVE_GIB:g} GiB x {workers} worker(s) = {per_worker} GiB per "
                        f"worker{_tokens(model, per_worker, workers)}")


def size_disk(directory: str, existing: int, workers: int,
              model: ModelShape | None) -> tuple[float, str]:
    free = shutil.disk_usage(directory).free + existing
    per_worker = round(free * DISK_SHARE / workers / GIB, 1)
    return per_worker, (f"disk tier: {DISK_SHARE:.0%} of {free / GIB:.1f} GiB free in {directory} "
                        f"(cache files included) / {workers} worker(s) = {per_worker} GiB per "
                        f"worker{_tokens(model, per_worker, workers)}")


def auto_size(settings: LmiSettings, disk_dir: str | None, disk_existing: int) -> AutoSizes:
    """Size the tiers; ``disk_dir`` must exist (the caller created it) or be None (no disk)."""
    workers, how = settings.tp_degree()
    model, model_line = _model_line(settings)
    cpu, cpu_line = size_cpu(mem_available_bytes(), workers, model)
    lines = [f"workers: {workers} ({how})", model_line, cpu_line]
    problem = None
    if cpu < MIN_TIER_GIB:
        problem = f"only {cpu} GiB of RAM per worker is free for the CPU tier"
    disk = None
    if disk_dir:
        disk, disk_line = size_disk(disk_dir, disk_existing, workers, model)
        lines.append(disk_line)
        if disk < MIN_TIER_GIB:
            problem = f"only {disk} GiB of disk per worker is free in {disk_dir}"
    else:
        lines.append("disk tier: off (no local_disk); auto-config never turns a tier on")
    return AutoSizes(cpu, disk, tuple(lines), problem)

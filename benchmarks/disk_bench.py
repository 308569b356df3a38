"""Disk tier benchmark: O_DIRECT and buffered chunk write/read GB/s beside fio, and restart time.

For a 7B-shaped chunk (28 layers, 256 tokens, 4 KV heads x 128, bf16: 14.7 MB) and a
SmolLM2-135M-shaped one (30 layers, 256 tokens, 3 KV heads x 64, bf16: 5.9 MB):
- write: ``DiskTier.put`` on 2 threads (as write-behind runs), until the data is on disk (sync);
- read: the page cache is dropped first, then ``DiskTier.get`` on 4 threads (as a request's
  chunks are read ahead), header and checksum verified on every chunk;
- fio: O_DIRECT sequential read (psync, 1 MiB blocks) of the same total bytes in the same
  directory, the device's limit for one reader, run right after each tier read round;
  ``disk_read_vs_fio`` is the tier's O_DIRECT read of the 7B shape over it (best round of each).
``disk_startup_s_10k``: a tier starting over 10,000 chunk files (page cache dropped).
GB/s are 10^9 bytes per second of KV payload. Needs root to drop the page cache; without it the
result says ``page_cache_dropped: false`` and reads may come from memory.

    python benchmarks/disk_bench.py [--dir DIR] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.storage import Chunk, DiskTier  # noqa: E402

NAMESPACE = "bench00000000000"
SHAPES = {  # [layers, 2, tokens, kv_heads, head_dim], bf16
    "7b": (28, 2, 256, 4, 128),
    "smollm2_135m": (30, 2, 256, 3, 64),
}
WRITE_THREADS, READ_THREADS = 2, 4
DISTINCT_SOURCES = 4  # chunks cycle over a few source tensors: the disk does not care, RAM does


def drop_page_cache() -> bool:
    """Flush dirty pages and drop the page cache (root only). False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _key(n: int) -> ChunkKey:
    return ChunkKey(NAMESPACE, n.to_bytes(8, "little") * 4)


def _sources(shape: tuple[int, ...]) -> list[Chunk]:
    generator = torch.Generator().manual_seed(0)
    return [Chunk(torch.randn(shape, generator=generator).to(torch.bfloat16))
            for _ in range(DISTINCT_SOURCES)]


def _timed_map(threads: int, fn, items) -> tuple[float, list]:
    with ThreadPoolExecutor(threads) as pool:
        start = time.perf_counter()
        results = list(pool.map(fn, items))
        return time.perf_counter() - start, results


def measure_tier(directory: str, shape: tuple[int, ...], count: int, odirect: bool,
                 rounds: int, beside: Callable[[], float | None] | None = None) -> dict:
    """Write then read ``count`` chunks of ``shape`` through a fresh disk tier in ``directory``.

    Reads run ``rounds`` times, each from a dropped page cache, and the best counts: this
    machine's disk speed swings by tens of percent from one second to the next. ``beside`` (fio)
    runs after each read round, so both see the same conditions.
    """
    shutil.rmtree(directory, ignore_errors=True)
    sources = _sources(shape)
    nbytes = sources[0].kv.numel() * 2
    tier = DiskTier(directory, count * (nbytes + 8192), NAMESPACE, odirect)

    def put(n: int) -> bool:
        return tier.put(_key(n), sources[n % len(sources)])

    def get(n: int) -> bool:
        lease = tier.get(_key(n))
        if lease is None:
            return False
        lease.release()  # as the engine does once the chunk is copied out
        return True

    start = time.perf_counter()
    _, stored = _timed_map(WRITE_THREADS, put, range(count))
    os.sync()  # buffered writes count only once they reach the disk
    write_s = time.perf_counter() - start
    total = nbytes * count
    reads, reads_1thread, beside_samples, served, same_files = [], [], [], [], []
    for _ in range(rounds):
        dropped = drop_page_cache()
        seconds, found = _timed_map(READ_THREADS, get, range(count))
        reads.append(total / seconds / 1e9)
        served.append(sum(found))
        if beside is not None:
            beside_samples.append(beside())
            same_files.append(_fio_on_chunk_files(tier, total))
        drop_page_cache()
        reads_1thread.append(total / _timed_map(1, get, range(count))[0] / 1e9)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "odirect_requested": odirect, "odirect_active": tier.odirect_active,
        "chunk_bytes": nbytes, "chunks": count, "total_bytes": total,
        "write_gbps": total / write_s / 1e9, "read_gbps": max(reads),
        "read_1thread_gbps": max(reads_1thread), "read_samples_gbps": reads,
        "beside_samples_gbps": beside_samples, "page_cache_dropped": dropped,
        "stored": sum(stored), "served_min": min(served),
        "fio_same_files_samples_gbps": same_files,
    }


def _fio_on_chunk_files(tier: DiskTier, total: int) -> float | None:
    """fio reading the tier's own chunk files one after another (read-only: fio must not lay
    them out again): the device's speed on exactly the bytes and file layout the tier read."""
    drop_page_cache()
    # --opendir, not a ':'-joined --filename: fio cuts long option values short.
    return fio_read_gbps("", total, f"--opendir={tier.directory}", "--readonly",
                         "--file_service_type=sequential")[0]


def fio_read_gbps(path: str, total_bytes: int, *extra: str) -> tuple[float | None, str]:
    """fio O_DIRECT sequential read of ``total_bytes`` from ``path`` (a file fio lays out on the
    first call and keeps; empty when ``extra`` names the files): (GB/s, note)."""
    if shutil.which("fio") is None:
        return None, "fio not installed (apt-get install -y fio): fio figures are null"
    where = [f"--filename={path}"] if path else []
    command = ["fio", "--name=seqread", *where, "--rw=read", "--direct=1",
               "--bs=1M", "--ioengine=psync", f"--size={total_bytes}", "--output-format=json",
               *extra]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        bw = json.loads(out[out.index("{"):])["jobs"][0]["read"]["bw_bytes"]
        return bw / 1e9, "fio psync O_DIRECT sequential read, 1 MiB blocks, 1 job, best round"
    except (subprocess.CalledProcessError, ValueError, KeyError) as exc:
        return None, f"fio failed: {exc}"


def startup_seconds(directory: str, files: int) -> dict:
    """Start-up of a tier over ``files`` tiny chunk files, page cache dropped and warm."""
    shutil.rmtree(directory, ignore_errors=True)
    tier = DiskTier(directory, files * 8192, NAMESPACE, True)
    tiny = Chunk(torch.zeros((1, 2, 16, 1, 8), dtype=torch.bfloat16))
    _timed_map(8, lambda n: tier.put(_key(n), tiny), range(files))
    drop_page_cache()
    cold = DiskTier(directory, files * 8192, NAMESPACE, True)
    warm = DiskTier(directory, files * 8192, NAMESPACE, True)
    assert cold.usage().num_chunks == files, cold.usage()
    shutil.rmtree(directory, ignore_errors=True)
    return {"cold_s": cold.startup_seconds, "warm_s": warm.startup_seconds}


def measure_disk(directory: str, quick: bool) -> dict:
    """All disk figures as a flat dict (the JSON keys), with per-shape detail under ``shapes``."""
    work = tempfile.mkdtemp(prefix="lmcache_ext_disk_bench-", dir=directory)
    rounds = 2 if quick else 3
    fio_notes: list[str] = []
    try:
        shapes = {}
        for name, shape in SHAPES.items():
            nbytes = 2 * torch.Size(shape).numel()
            count = max(8, (400 if quick else 1600) * 10**6 // nbytes)
            fio_path = os.path.join(work, "fio-seqread.dat")

            def fio(total: int = count * nbytes, path: str = fio_path) -> float | None:
                gbps, note = fio_read_gbps(path, total)
                fio_notes.append(note)
                return gbps

            shapes[name] = {
                mode: measure_tier(os.path.join(work, f"{name}-{mode}"), shape, count,
                                   mode == "odirect", rounds, fio if mode == "odirect" else None)
                for mode in ("odirect", "buffered")
            }
            if os.path.exists(fio_path):
                os.unlink(fio_path)
        startup = startup_seconds(os.path.join(work, "startup"), 10_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _summary(shapes, startup, fio_notes[-1] if fio_notes else "fio not run")


def _summary(shapes: dict, startup: dict, fio_note: str) -> dict:
    main = shapes["7b"]["odirect"]
    fio_samples = [g for g in main["beside_samples_gbps"] if g is not None]
    fio = max(fio_samples) if fio_samples else None
    for modes in shapes.values():
        samples = [g for g in modes["odirect"].pop("beside_samples_gbps") if g is not None]
        modes["odirect"]["fio_read_gbps"] = max(samples) if samples else None
        modes["odirect"]["fio_samples_gbps"] = samples
        same = [g for g in modes["odirect"].pop("fio_same_files_samples_gbps") if g is not None]
        modes["odirect"]["fio_same_files_gbps"] = max(same) if same else None
        modes["odirect"]["fio_same_files_samples_gbps"] = same
    return {
        "disk_read_gbps": main["read_gbps"],
        "disk_write_gbps": main["write_gbps"],
        "disk_read_buffered_gbps": shapes["7b"]["buffered"]["read_gbps"],
        "disk_write_buffered_gbps": shapes["7b"]["buffered"]["write_gbps"],
        "fio_read_gbps": fio,
        "disk_read_vs_fio": main["read_gbps"] / fio if fio else None,
        "disk_startup_s_10k": startup["cold_s"],
        "disk_startup_s_10k_warm": startup["warm_s"],
        "fio_same_files_gbps": main["fio_same_files_gbps"],
        "disk_read_vs_fio_same_files": (main["read_gbps"] / main["fio_same_files_gbps"]
                                        if main["fio_same_files_gbps"] else None),
        "fio_note": fio_note,
        "odirect_active": main["odirect_active"],
        "page_cache_dropped": main["page_cache_dropped"],
        "shapes": shapes,
    }


def _table(result: dict) -> str:
    lines = [f"{'shape':<14}{'mode':<10}{'MB/chunk':>9}{'write GB/s':>12}{'read GB/s':>11}"
             f"{'read 1 thr':>12}{'fio GB/s':>10}"]
    for name, modes in result["shapes"].items():
        for mode, r in modes.items():
            fio = r.get("fio_read_gbps")
            lines.append(f"{name:<14}{mode:<10}{r['chunk_bytes'] / 1e6:>9.1f}"
                         f"{r['write_gbps']:>12.2f}{r['read_gbps']:>11.2f}"
                         f"{r['read_1thread_gbps']:>12.2f}"
                         f"{'-' if fio is None else f'{fio:.2f}':>10}")
    fio = result["fio_read_gbps"]
    lines.append(f"fio read: {'n/a' if fio is None else f'{fio:.2f} GB/s'} ({result['fio_note']})")
    ratio = result["disk_read_vs_fio"]
    lines.append(f"disk_read_vs_fio: {'n/a' if ratio is None else f'{ratio:.2f}'} (target >= 0.8)")
    same = result["fio_same_files_gbps"]
    if same:
        lines.append(f"fio over the tier's own 7B chunk files: {same:.2f} GB/s, tier/fio "
                     f"{result['disk_read_vs_fio_same_files']:.2f}")
    lines.append(f"start-up over 10K chunk files: {result['disk_startup_s_10k']:.3f} s cold, "
                 f"{result['disk_startup_s_10k_warm']:.3f} s warm")
    lines.append(f"O_DIRECT active: {result['odirect_active']}, page cache dropped: "
                 f"{result['page_cache_dropped']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(),
                        help="directory on the disk to measure (default: the temp dir)")
    parser.add_argument("--quick", action="store_true", help="about 400 MB per run, not 1.6 GB")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    result = measure_disk(args.dir, args.quick)
    print(_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

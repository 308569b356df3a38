"""``lmcache-ext route`` as a user runs it: a real process in front of real replicas."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lmcache_ext.sessions.protocol import NEW_SESSION, NEW_SESSION_HEADER, SESSION_HEADER
from lmcache_ext.testing.tiny_model import build_tiny_model
from tests.routing.conftest import chat, closed_port, post

START_LIMIT_S = 120


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcache_ext.cli", "route", *args],
                          capture_output=True, text=True, timeout=60, env=_env())


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "LMCACHE" not in k}


@contextmanager
def routing(*args: str) -> Iterator[str]:
    """A router process; yields its URL once it says it is routing."""
    command = [sys.executable, "-m", "lmcache_ext.cli", "--log-level", "WARNING", "route"]
    process = subprocess.Popen([*command, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=_env())
    try:
        for line in process.stdout:
            if line.startswith("lmcache-ext routing on "):
                yield line.split()[3]
                break
        else:
            pytest.fail(f"route exited with {process.wait()} before routing")
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.parametrize("args, needle", [
    ((), "give --replicas N or --backend URL"),
    (("--replicas", "2", "--backend", "http://127.0.0.1:1"), "not both"),
    (("--backend", "ftp://host:1"), "expected http://HOST:PORT"),
    (("--backend", "http://127.0.0.1:1", "--prefix-length", "0"), "prefix_length: 0 must be"),
    (("--backend", "http://127.0.0.1:1", "--concurrency-threshold", "0"),
     "concurrency_threshold: 0 must be"),
    (("--replicas", "0"), "--replicas: 0 must be >= 1"),
    (("--backend", "http://127.0.0.1:1", "--timeout-s", "0"), "--timeout-s: 0.0 must be > 0"),
])
def test_bad_arguments_exit_2_with_the_reason(args, needle):
    result = run(*args)
    assert result.returncode == 2 and needle in result.stderr


def test_route_to_running_backends_keeps_sessions(replicas):
    port = closed_port()
    backends = [arg for r in replicas for arg in ("--backend", r.url)]
    with routing(*backends, "--port", str(port), "--mode", "random") as url:
        created = post(url, {"requestType": "NEW_SESSION"}, {SESSION_HEADER: NEW_SESSION})
        session_id = created.headers[NEW_SESSION_HEADER.lower()].split(";")[0]
        answers = [post(url, chat(), {SESSION_HEADER: session_id}) for _ in range(5)]
        assert {a.replica for a in answers} == {created.replica}


def test_route_starts_built_in_replicas(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    with routing("--replicas", "2", "--model", str(model), "--port", str(closed_port()),
                 "--mode", "least_outstanding") as url:
        answers = [post(url, {"inputs": "hello there", "parameters": {"max_new_tokens": 2}})
                   for _ in range(4)]
        assert all(a.status == 200 for a in answers)
        assert {a.replica for a in answers} <= {"replica-0", "replica-1"}

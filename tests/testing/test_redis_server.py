"""A missing redis-server is an error that names the fix: in a benchmark and in a test (a failure,
never a skip)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmcache_ext.testing.redis_server import MISSING, RedisServer

REPO = Path(__file__).resolve().parents[2]


def test_starting_a_server_without_redis_server_on_the_path_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no redis-server on the PATH
    with pytest.raises(RuntimeError) as raised:
        RedisServer(tmp_path / "redis").start()
    assert str(raised.value) == MISSING
    assert "apt-get install redis-server" in MISSING


def test_a_test_that_needs_redis_fails_with_the_fix_and_is_never_skipped(tmp_path):
    """Scenario: a newcomer runs the Redis tests on a machine without redis-server."""
    test = "tests/storage/test_remote.py::test_put_get_round_trip_is_bit_exact_and_remove_deletes"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                          cwd=REPO, env={"PATH": str(tmp_path), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    # The fixture fails, so pytest reports an error in set-up: a failure either way, not a skip.
    assert "1 error" in done.stdout and "skipped" not in done.stdout, done.stdout
    assert MISSING in done.stdout


def test_a_server_given_cpus_runs_on_those_only(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    server = RedisServer(tmp_path / "redis", cpus=frozenset({cpu})).start()
    try:
        assert os.sched_getaffinity(server.process.pid) == {cpu}
        assert server.client().ping()
    finally:
        server.stop()

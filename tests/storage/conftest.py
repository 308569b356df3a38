"""Fixtures that start real redis-server processes (``lmcache_ext.testing.redis_server``) and stop
them. A missing redis-server fails the test with the fix; never a skip."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lmcache_ext.testing.redis_server import (
    RedisServer,
    free_port,
    make_certificate,
    redis_server_binary,
    start_cluster,
)


def _require_redis() -> None:
    try:
        redis_server_binary()
    except RuntimeError as exc:  # a missing server fails the test with the fix; never a skip
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture
def redis_server(tmp_path) -> Iterator[RedisServer]:
    """A fresh, empty redis-server on a free loopback port, stopped after the test."""
    _require_redis()
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory) -> Iterator[list[RedisServer]]:
    """A 3-primary Redis Cluster on loopback ports, shared by a module's tests."""
    _require_redis()
    servers = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
def redis_tls_server(tmp_path) -> Iterator[tuple[RedisServer, str]]:
    """A redis-server that speaks only TLS, and the path of the CA that signed its certificate."""
    _require_redis()
    cert, key = make_certificate(tmp_path)
    server = RedisServer(tmp_path / "redis", tls_port=free_port(), extra_args=(
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
        "--tls-auth-clients", "no")).start()
    yield server, str(cert)
    server.stop()

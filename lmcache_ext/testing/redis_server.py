"""Real redis-server processes for tests and benchmarks: loopback, free ports, no persistence.

Each server runs in its own directory with ``--save '' --appendonly no`` (nothing written to disk)
and is stopped by its owner. A missing redis-server is an error with the fix, never a skip.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

# `make setup` installs it (scripts/setup_system.sh), as root, or names the command otherwise.
MISSING = ("redis-server not found: run `make setup` (it installs it as root), or "
           "`apt-get install redis-server`")
START_TIMEOUT_S = 10.0


def redis_server_binary() -> str:
    """Path of redis-server; raises RuntimeError with the install hint when there is none."""
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(MISSING)
    return path


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A loopback port nobody listens on; for a cluster node its bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        if _port_free(port) and (not cluster or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


@dataclass
class RedisServer:
    """One redis-server. ``start`` waits until it answers PING; ``stop`` terminates it."""

    workdir: Path
    port: int = 0
    tls_port: int = 0  # > 0: serve TLS there (and plain TCP nowhere)
    extra_args: tuple[str, ...] = ()
    # Run the server on these CPUs only (None: wherever the kernel puts it): a benchmark keeps
    # a loopback server off the core an engine computes on, as a remote server would be.
    cpus: frozenset[int] | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.port and not self.tls_port:
            self.port = free_port()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        listen = ["--port", "0", "--tls-port", str(self.tls_port)] if self.tls_port else \
            ["--port", str(self.port)]
        return [redis_server_binary(), *listen, "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *self.extra_args]

    def start(self, ready: bool = True) -> RedisServer:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.workdir)
        log.close()
        if self.cpus is not None:
            os.sched_setaffinity(self.process.pid, self.cpus)
        if ready:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log_tail()}")
            if self.tls_port or self._pings():
                if not self.tls_port or _port_open(self.tls_port):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start: {self.log_tail()}")

    def _pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except (redis.AuthenticationError, redis.ResponseError):
            return True  # it answered (wants a password): it is up
        except redis.RedisError:
            return False

    def client(self, **kwargs) -> redis.Redis:
        """A plain redis-py client for checking and tampering with the server's data."""
        # No retries: redis-py's default retries a refused password with back-off (seconds).
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2, retry=Retry(NoBackoff(), 0), **kwargs)

    def wait_for_values(self, count: int, within_s: float = 120.0) -> int:
        """Wait until the server holds at least ``count`` values (saves reach it after their
        request returns) or ``within_s`` passed; the number it holds."""
        client = self.client()
        deadline = time.monotonic() + within_s
        while (held := client.dbsize()) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        client.close()
        return held

    def stop(self) -> None:
        """Terminate (SIGTERM) and wait; the data is gone (no persistence)."""
        if self.process is None:
            return
        process, self.process = self.process, None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)

    def log_tail(self) -> str:
        path = self.workdir / "redis.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_cluster(workdir: Path, nodes: int = 3) -> list[RedisServer]:
    """A Redis Cluster of ``nodes`` primaries (no replicas) on loopback, slots assigned, state ok.
    The caller stops every server (also when this raises: they are started one by one)."""
    servers: list[RedisServer] = []
    try:
        for index in range(nodes):
            port = free_port(cluster=True)
            servers.append(RedisServer(
                workdir / f"node{index}", port,
                extra_args=("--cluster-enabled", "yes", "--cluster-config-file",
                            f"nodes-{port}.conf", "--cluster-node-timeout", "2000")).start())
        addresses = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run(["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0",
                        "--cluster-yes"], check=True, capture_output=True, timeout=30)
        _wait_cluster_ok(servers)
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def _wait_cluster_ok(servers: list[RedisServer]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        states = [s.client().cluster("info").get("cluster_state") for s in servers]
        if all(state == "ok" for state in states):
            return
        time.sleep(0.05)
    raise RuntimeError(f"cluster did not reach cluster_state:ok: {states}")


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed EC certificate for 127.0.0.1 (it is its own CA): (cert, key)."""
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl not found: apt-get install openssl")
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=30)
    return cert, key

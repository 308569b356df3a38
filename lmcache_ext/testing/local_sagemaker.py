"""A local SageMaker endpoint: what boto3 and the SageMaker SDK talk to when no AWS is at hand.

Real processes, started as on SageMaker, with the seed's env vars:
- a ``redis-server`` (the shared tier every instance of a multi-instance endpoint reads);
- ``replicas`` instances, each the container entrypoint as a process (it checks the cache
  settings, then hands over to ``lmcache-ext serve``, the built-in engine standing in for LMI)
  with ``OPTION_LMCACHE_CONFIG_FILE`` (the seed's CPU config), ``OPTION_KV_TRANSFER_CONFIG``,
  ``OPTION_LMCACHE_REMOTE_URL`` (the Redis above) and stateful sessions on;
- ``lmcache-ext route --endpoint-name NAME`` in front of them: SageMaker runtime's REST API
  (``/endpoints/NAME/invocations`` and ``-response-stream``, session headers, event-stream
  framing, ModelError), session-sticky routing, other requests by least outstanding requests
  (SageMaker's ``LEAST_OUTSTANDING_REQUESTS`` routing).

A client reaches it with ``endpoint_url=endpoint.url`` (boto3) or the environment
``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME=endpoint.url`` (boto3 and the SageMaker SDK alike), any
credentials and region. ``close`` stops everything; a process that dies during start-up is an
error carrying its log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from lmcache_ext.container.routes import SEED_KV_TRANSFER_CONFIG
from lmcache_ext.testing.redis_server import RedisServer, free_port

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "container"
START_TIMEOUT_S = 120.0
REGION = "us-east-1"  # any region: the local endpoint ignores it
FAKE_CREDENTIALS = {"aws_access_key_id": "local", "aws_secret_access_key": "local"}


@dataclass
class LocalSageMaker:
    """Start with ``start``; ``url`` is the SageMaker runtime URL, ``name`` the endpoint."""

    workdir: Path
    model: Path
    name: str = "lmcache-ext-local"
    replicas: int = 2
    session_expiry_s: float | None = None  # None: the server's default
    shared_tier: bool = True  # False: no redis-server, replicas without remote_url
    start_timeout_s: float = START_TIMEOUT_S  # per process (a real model on a busy machine)
    extra_env: dict[str, str] = field(default_factory=dict)
    redis: RedisServer | None = field(default=None, repr=False)
    processes: list[subprocess.Popen] = field(default_factory=list, repr=False)
    replica_urls: list[str] = field(default_factory=list)
    url: str = ""

    def replica_env(self) -> dict[str, str]:
        """The env one instance starts with: this machine's, less any cache setting, plus the
        seed's variables."""
        config = self.workdir / "lmcache_config.yaml"
        config.write_text((REPO_CONFIGS / "lmcache_config_cpu.yaml").read_text())
        clean = {k: v for k, v in os.environ.items()
                 if "LMCACHE" not in k and not k.startswith("OPTION_")}
        env = {**clean, "OPTION_LMCACHE_CONFIG_FILE": str(config),
               "OPTION_KV_TRANSFER_CONFIG": SEED_KV_TRANSFER_CONFIG,
               "OPTION_ENABLE_STATEFUL_SESSIONS": "true",
               "LMI_ENTRYPOINT": str(Path(sys.executable).parent / "lmcache-ext")}
        if self.redis is not None:
            env["OPTION_LMCACHE_REMOTE_URL"] = self.redis.url
        if self.session_expiry_s is not None:
            env["OPTION_SESSIONS_EXPIRATION"] = f"{self.session_expiry_s:g}"
        return {**env, **self.extra_env}

    def start(self) -> LocalSageMaker:
        try:
            if self.shared_tier:
                self.redis = RedisServer(self.workdir / "redis").start()
            env = self.replica_env()
            for index in range(self.replicas):
                port = free_port()
                self._spawn(f"replica-{index}",
                            [sys.executable, "-m", "lmcache_ext.container.entrypoint", "serve",
                             "--port", str(port), "--model", str(self.model)], env)
                self.replica_urls.append(f"http://127.0.0.1:{port}")
            for index, url in enumerate(self.replica_urls):
                self._wait_for_ping(url, index)
            port = free_port()
            command = [sys.executable, "-m", "lmcache_ext.cli", "route", "--port", str(port),
                       "--endpoint-name", self.name]
            for url in self.replica_urls:
                command += ["--backend", url]
            self._spawn("router", command, env)
            self.url = f"http://127.0.0.1:{port}"
            self._wait_for_ping(self.url, len(self.processes) - 1)
        except BaseException:
            self.close()
            raise
        return self

    def log(self, index: int) -> str:
        """Process ``index``'s output so far (replicas first, the router last)."""
        path = self.workdir / f"process-{index}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _spawn(self, label: str, command: list[str], env: dict[str, str]) -> None:
        path = self.workdir / f"process-{len(self.processes)}.log"
        with open(path, "w") as out:
            out.write(f"# {label}: {' '.join(command)}\n")
            out.flush()
            self.processes.append(subprocess.Popen(command, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT))

    def _wait_for_ping(self, url: str, index: int) -> None:
        process = self.processes[index]
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited {process.returncode}:\n{self.log(index)}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{url} not up in {self.start_timeout_s:.0f} s:\n{self.log(index)}")

    def close(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.redis is not None:
            self.redis.stop()

"""Containers of our image for the image tests, driven with the docker CLI as a user drives them.

Each container uses the host's network (`--network host`, the only network here) and listens on
a port of its own (``SAGEMAKER_BIND_TO_PORT``, which the stand-in's server honours as SageMaker's
containers do). The model directory is mounted read-only at /opt/ml/model.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
# vLLM's own KV cache (GiB) per container: small, the machine is shared.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
READY_TIMEOUT_S = 600.0


def build_image(tag: str, base: str) -> float:
    """`docker build` of the repository's Dockerfile on ``base``; seconds it took."""
    began = time.perf_counter()
    done = subprocess.run(["docker", "build", "-q", "--network", "host", "--build-arg",
                           f"BASE_IMAGE={base}", "-t", tag, str(REPO)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise AssertionError(f"docker build failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - began


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ContainerSpec:
    """One container: the model directory, env vars, extra ``docker run`` arguments (volumes)."""

    model_dir: Path
    env: dict = field(default_factory=dict)
    args: tuple = ()


@dataclass(frozen=True)
class Reply:
    code: int
    headers: dict
    body: Any
    seconds: float


class Container:
    """A container of the image; ``remove`` always cleans up."""

    def __init__(self, image: str, spec: ContainerSpec, log_dir: Path):
        self.image, self.spec, self.log_dir = image, spec, log_dir
        self.name = f"lmcache-ext-test-{uuid.uuid4().hex[:8]}"
        self.port = free_port()

    def run(self) -> None:
        env = {**ENGINE_ENV, **self.spec.env, "SAGEMAKER_BIND_TO_PORT": str(self.port)}
        command = ["docker", "run", "-d", "--network", "host", "--name", self.name,
                   "--shm-size", "1g",
                   "-v", f"{self.spec.model_dir}:/opt/ml/model:ro", *self.spec.args]
        for key, value in env.items():
            command += ["-e", f"{key}={value}"]
        subprocess.run([*command, self.image], check=True, capture_output=True)

    def docker(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(["docker", *args, self.name], capture_output=True, text=True)
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} {self.name}: {done.stderr}")
        return done.stdout

    def logs(self) -> str:
        done = subprocess.run(["docker", "logs", self.name], capture_output=True, text=True)
        return done.stdout + done.stderr

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def state(self) -> dict:
        return json.loads(self.docker("inspect", "--format", "{{json .State}}"))

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Seconds until /ping answers 200; fails with the log when the container stops."""
        began = time.perf_counter()
        while time.perf_counter() - began < timeout_s:
            if not self.state()["Running"]:
                raise AssertionError(f"{self.name} exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=5) as r:
                    if r.status == 200:
                        return time.perf_counter() - began
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"{self.name}: /ping not 200 in {timeout_s} s:\n{self.log_tail()}")

    def invoke(self, body: Any, headers: dict | None = None, timeout_s: float = 300) -> Reply:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/invocations", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", **(headers or {})}, method="POST")
        began = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as answer:
                code, got, raw = answer.status, dict(answer.headers), answer.read()
        except urllib.error.HTTPError as error:
            code, got, raw = error.code, dict(error.headers), error.read()
        seconds = time.perf_counter() - began
        try:
            decoded = json.loads(raw) if raw else None
        except ValueError:
            decoded = raw.decode("utf-8", "replace")
        return Reply(code, got, decoded, seconds)

    def wait_exit(self, timeout_s: float) -> int | None:
        """The exit code once stopped within ``timeout_s``, else None."""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            state = self.state()
            if not state["Running"]:
                return state["ExitCode"]
            time.sleep(0.2)
        return None

    def remove(self) -> None:
        (self.log_dir / f"{self.name}.log").write_text(self.logs())
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True)

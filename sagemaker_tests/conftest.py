"""The endpoint the tests talk to.

Two modes, chosen by the environment (a legitimate condition: CI has no AWS account):
- ``SAGEMAKER_ENDPOINT_NAME`` set (with AWS credentials and ``AWS_REGION`` the usual boto3 way):
  a real SageMaker endpoint through boto3's ``sagemaker-runtime`` client (``invoke_endpoint``
  and ``invoke_endpoint_with_response_stream``). Never runs in CI unless those are set.
- otherwise a local endpoint the tests start: the container entrypoint as a real process, with
  the seed's env vars, handing over to ``lmcache-ext serve`` (the built-in CPU engine stands in
  for LMI) on a tiny random-weight model. SageMaker's runtime URLs cannot point at it, so the
  same payloads go over plain HTTP to ``/invocations``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

REPO = Path(__file__).resolve().parents[1]
SEED_KV = '{"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}'
START_TIMEOUT_S = 60


class Endpoint(Protocol):
    reports_cached_tokens: bool

    def invoke(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    def invoke_stream(self, payload: dict[str, Any]) -> bytes: ...


@dataclass
class BotoEndpoint:
    """A real endpoint; LMI with vLLM does not report cached tokens in its LMI-schema details."""

    name: str
    client: Any
    reports_cached_tokens: bool = False

    def invoke(self, payload: dict[str, Any]) -> dict[str, Any]:
        reply = self.client.invoke_endpoint(EndpointName=self.name, Body=json.dumps(payload),
                                            ContentType="application/json")
        return json.loads(reply["Body"].read())

    def invoke_stream(self, payload: dict[str, Any]) -> bytes:
        reply = self.client.invoke_endpoint_with_response_stream(
            EndpointName=self.name, Body=json.dumps(payload), ContentType="application/json")
        return b"".join(event["PayloadPart"]["Bytes"] for event in reply["Body"]
                        if "PayloadPart" in event)


@dataclass
class LocalEndpoint:
    url: str
    reports_cached_tokens: bool = True

    def _post(self, payload: dict[str, Any]) -> bytes:
        request = urllib.request.Request(f"{self.url}/invocations", data=json.dumps(payload)
                                         .encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.read()

    def invoke(self, payload: dict[str, Any]) -> dict[str, Any]:
        return json.loads(self._post(payload))

    def invoke_stream(self, payload: dict[str, Any]) -> bytes:
        return self._post(payload)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_ping(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"local endpoint exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"local endpoint not up in {START_TIMEOUT_S} s:\n{log.read_text()}")


def _local_env(folder: Path) -> dict[str, str]:
    config = folder / "lmcache_config.yaml"
    config.write_text((REPO / "container" / "lmcache_config_cpu.yaml").read_text())
    clean = {k: v for k, v in os.environ.items()
             if "LMCACHE" not in k and not k.startswith("OPTION_")}
    return {**clean, "OPTION_LMCACHE_CONFIG_FILE": str(config),
            "OPTION_KV_TRANSFER_CONFIG": SEED_KV,
            "LMI_ENTRYPOINT": str(Path(sys.executable).parent / "lmcache-ext")}


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory) -> Iterator[Endpoint]:
    name = os.environ.get("SAGEMAKER_ENDPOINT_NAME")
    if name:
        import boto3  # only the real-endpoint mode needs it

        yield BotoEndpoint(name, boto3.client("sagemaker-runtime"))
        return
    from lmcache_ext.testing.tiny_model import build_tiny_model

    folder = tmp_path_factory.mktemp("local-endpoint")
    model = build_tiny_model(folder / "model")
    port, log = _free_port(), folder / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "lmcache_ext.container.entrypoint", "serve", "--port",
             str(port), "--model", str(model)], env=_local_env(folder), stdout=out,
            stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, process, log)
        yield LocalEndpoint(url)
    finally:
        process.terminate()
        process.wait(timeout=30)

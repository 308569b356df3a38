"""Routers in front of real HTTP replicas: three ``SessionReplica`` servers (no model)."""

from __future__ import annotations

import http.client
import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from lmcache_ext.routing.policy import PrefixAware, make_policy
from lmcache_ext.routing.router import Backend, Router
from lmcache_ext.testing.session_replica import SessionReplica


@pytest.fixture
def replicas():
    started = [SessionReplica(f"r{i}").start() for i in range(3)]
    yield started
    for replica in started:
        replica.release()
        replica.close()


def start_router(replicas, mode: str = "random", settings: PrefixAware | None = None,
                 **kwargs) -> Router:
    """A router (seeded policy) in front of ``replicas`` (anything with ``url`` and ``name``)."""
    backends = [Backend.from_url(r.url, r.name) for r in replicas]
    return Router(backends, make_policy(mode, seed=0, settings=settings),
                  **kwargs).start()


@pytest.fixture
def router(replicas):
    started = start_router(replicas)
    yield started
    started.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self):
        return json.loads(self.body)

    @property
    def replica(self) -> str | None:
        return self.headers.get("x-lmcache-ext-replica")


def post(url: str, body, headers: dict | None = None, path: str = "/invocations") -> Answer:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.request("POST", path, json.dumps(body).encode(),
                 {"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chat(text: str = "hello") -> dict:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4}


def runtime(url: str):
    """boto3's sagemaker-runtime client pointed at ``url`` (fake credentials, no retries)."""
    return boto3.client("sagemaker-runtime", endpoint_url=url, region_name="us-east-1",
                        aws_access_key_id="test", aws_secret_access_key="test",
                        config=Config(retries={"max_attempts": 1, "mode": "standard"}))

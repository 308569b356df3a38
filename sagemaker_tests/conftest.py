"""The endpoint the tests talk to, and the clients they talk through.

One suite, two targets, chosen by the environment:
- ``SAGEMAKER_ENDPOINT_NAME`` set: that real endpoint, with AWS credentials and region the usual
  boto3 way (``AWS_PROFILE``, ``AWS_REGION``, ...). Deploy one with
  ``python -m sagemaker_tests.deploy``.
- otherwise a local one (``lmcache_ext.testing.local_sagemaker``): the container entrypoint with
  the seed's env vars on two instances sharing a Redis tier, behind a local SageMaker runtime
  server; boto3 and the SDK reach it through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` with fake
  credentials, so botocore's own parsers judge the wire format.

In both, every request goes through boto3's ``sagemaker-runtime`` client or the SageMaker SDK v3
(``clients``), never raw HTTP. Tests that take ``client`` run once with each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from botocore.config import Config

from sagemaker_tests.clients import Boto3Client, SdkClient

ENDPOINT_ENV = "SAGEMAKER_ENDPOINT_NAME"
ENDPOINT_URL_ENV = "AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME"  # botocore's per-service endpoint URL
LOCAL_SESSION_EXPIRY_S = 6.0  # short, so the expiry case runs in seconds
LOCAL_MAX_CONTEXT = 2048  # the local model's context: room for a document of several chunks


@dataclass
class Target:
    """What the suite runs against. ``local`` is None for a real endpoint."""

    endpoint_name: str
    session: Any  # boto3.Session
    region: str
    local: Any = None  # LocalSageMaker
    chunk_tokens: int = 256  # the seed's chunk_size

    @property
    def document_scale(self) -> int:
        """How many times the tests repeat a document's text: on a real endpoint a hit is told
        by time, and a real model prefills a short text too fast for that (40 times is ~5K
        tokens); the local model's context is short."""
        return 1 if self.local is not None else 40

    @property
    def reports_cached_tokens(self) -> bool:
        """Our built-in engine reports cached tokens in its answers; LMI's LMI-schema answers
        do not, so on a real endpoint a hit shows only in the time."""
        return self.local is not None

    def runtime(self) -> Any:
        """boto3's sagemaker-runtime client, one attempt per call (errors are the test's)."""
        return self.session.client("sagemaker-runtime", region_name=self.region,
                                   config=Config(retries={"max_attempts": 1}))


@pytest.fixture(scope="session")
def target(tmp_path_factory) -> Iterator[Target]:
    name = os.environ.get(ENDPOINT_ENV)
    if name:
        session = boto3.Session()
        if session.region_name is None:
            raise RuntimeError(f"{ENDPOINT_ENV}={name}: set AWS_REGION (or a profile's "
                               f"region) for the endpoint")
        yield Target(name, session, session.region_name)
        return
    from lmcache_ext.testing.local_sagemaker import FAKE_CREDENTIALS, REGION, LocalSageMaker
    from lmcache_ext.testing.tiny_model import build_tiny_model

    folder = tmp_path_factory.mktemp("local-sagemaker")
    model = build_tiny_model(folder / "model", max_context=LOCAL_MAX_CONTEXT)
    local = LocalSageMaker(folder, model, session_expiry_s=LOCAL_SESSION_EXPIRY_S).start()
    before = os.environ.get(ENDPOINT_URL_ENV)
    os.environ[ENDPOINT_URL_ENV] = local.url
    try:
        yield Target(local.name, boto3.Session(region_name=REGION, **FAKE_CREDENTIALS),
                     REGION, local)
    finally:
        if before is None:
            os.environ.pop(ENDPOINT_URL_ENV, None)
        else:
            os.environ[ENDPOINT_URL_ENV] = before
        local.close()


@pytest.fixture
def boto3_client(target) -> Boto3Client:
    return Boto3Client(target.runtime(), target.endpoint_name)


@pytest.fixture(params=["boto3", "sdk"])
def client(request, target) -> Boto3Client | SdkClient:
    if request.param == "boto3":
        return Boto3Client(target.runtime(), target.endpoint_name)
    return SdkClient(target.session, target.region, target.endpoint_name)

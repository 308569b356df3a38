"""The endpoint the tests talk to, and the clients they talk through.

One suite, three targets, chosen by the environment:
- ``SAGEMAKER_ENDPOINT_NAME`` set: that real endpoint, with AWS credentials and region the usual
  boto3 way (``AWS_PROFILE``, ``AWS_REGION``, ...). Deploy one with
  ``python -m sagemaker_tests.deploy``.
- ``LOCAL_SAGEMAKER_RUNTIME_URL`` set: a local SageMaker runtime already running there
  (``lmcache-ext route --endpoint-name NAME --backend ...``; the name in
  ``LOCAL_SAGEMAKER_ENDPOINT_NAME``, default ``lmcache-ext-local``) in front of containers of our
  image on LMI (test e of ``tests/image`` starts them on the LMI stand-in), reached as below;
- otherwise a local one (``lmcache_ext.testing.local_sagemaker``): the container entrypoint with
  the seed's env vars on two instances sharing a Redis tier, behind a local SageMaker runtime
  server; boto3 and the SDK reach it through ``AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME`` with fake
  credentials, so botocore's own parsers judge the wire format.

In both, every request goes through boto3's ``sagemaker-runtime`` client or the SageMaker SDK v3
(``clients``), never raw HTTP. Tests that take ``client`` run once with each.
"""

from __future__ import annotations

import contextlib
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
RUNTIME_URL_ENV = "LOCAL_SAGEMAKER_RUNTIME_URL"
RUNTIME_NAME_ENV = "LOCAL_SAGEMAKER_ENDPOINT_NAME"
BUILTIN, LMI = "builtin", "lmi"  # the model server behind the endpoint
LOCAL_SESSION_EXPIRY_S = 6.0  # short, so the expiry case runs in seconds
LOCAL_MAX_CONTEXT = 2048  # the local model's context: room for a document of several chunks


@dataclass
class Target:
    """What the suite runs against. ``local`` is the built-in local endpoint (None otherwise);
    ``server`` the model server behind the endpoint: ``LMI`` for a real endpoint and for our
    image's containers, ``BUILTIN`` for the built-in local endpoint."""

    endpoint_name: str
    session: Any  # boto3.Session
    region: str
    local: Any = None  # LocalSageMaker
    chunk_tokens: int = 256  # the seed's chunk_size
    server: str = LMI
    local_runtime: bool = False  # a local SageMaker runtime (fake credentials), not AWS
    streams: bool = True  # False: the LMI stand-in, whose model server does not stream
    scale: int = 40

    @property
    def document_scale(self) -> int:
        """How many times the tests repeat a document's text: where a hit is told by time, a
        model prefills a short text too fast for that (40 times is ~5K tokens on a real
        endpoint's tokenizer; the containers' small model: ~2K tokens at 12); the built-in
        local model's context is short and it reports cached tokens."""
        return 1 if self.local is not None else self.scale

    @property
    def reports_cached_tokens(self) -> bool:
        """Our built-in engine reports cached tokens in its answers; LMI's answers do not
        (djl-serving 7e13b08: its LMI-schema formatter writes ``generated_text`` and ``details``
        only, ``lmi_vllm/request_response_utils.py`` lines 137-163, and it builds vLLM's
        OpenAI services without ``enable_prompt_tokens_details``,
        ``lmi_vllm/vllm_async_service.py`` lines 183-202), so there a hit shows in the time."""
        return self.server == BUILTIN

    @property
    def refusal_status(self) -> int:
        """The container's status for a payload it cannot take or a session it does not hold.
        The built-in server answers 400. LMI answers an in-band 424 for anything that fails
        while it parses a request (``vllm_async_service.py`` lines 347-350, "Input parsing
        failed"), an unknown or closed session id included (its ``get_session`` raises there,
        line 221; ``session_manager.py`` lines 116-117); SageMaker passes either on as a
        ``ModelError`` with that ``OriginalStatusCode``."""
        return 400 if self.server == BUILTIN else 424

    @property
    def answers_lookups(self) -> bool:
        """Whether ``lmcache-ext warm``'s lookups are answered from the cache: the built-in
        server and our LMI handler in the image's containers do (a real endpoint may run LMI's
        own handler, which does not)."""
        return self.local is not None or self.local_runtime

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

    runtime_url = os.environ.get(RUNTIME_URL_ENV)
    if runtime_url:
        with _endpoint_url(runtime_url):
            yield Target(os.environ.get(RUNTIME_NAME_ENV, "lmcache-ext-local"),
                         boto3.Session(region_name=REGION, **FAKE_CREDENTIALS), REGION,
                         local_runtime=True, streams=False, scale=12)
        return
    from lmcache_ext.testing.tiny_model import build_tiny_model

    folder = tmp_path_factory.mktemp("local-sagemaker")
    model = build_tiny_model(folder / "model", max_context=LOCAL_MAX_CONTEXT)
    local = LocalSageMaker(folder, model, session_expiry_s=LOCAL_SESSION_EXPIRY_S).start()
    try:
        with _endpoint_url(local.url):
            yield Target(local.name, boto3.Session(region_name=REGION, **FAKE_CREDENTIALS),
                         REGION, local, server=BUILTIN, local_runtime=True)
    finally:
        local.close()


@contextlib.contextmanager
def _endpoint_url(url: str) -> Iterator[None]:
    """boto3 and the SDK reach ``url`` for sagemaker-runtime while the block runs."""
    before = os.environ.get(ENDPOINT_URL_ENV)
    os.environ[ENDPOINT_URL_ENV] = url
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ENDPOINT_URL_ENV, None)
        else:
            os.environ[ENDPOINT_URL_ENV] = before


@pytest.fixture
def boto3_client(target) -> Boto3Client:
    return Boto3Client(target.runtime(), target.endpoint_name)


@pytest.fixture(params=["boto3", "sdk"])
def client(request, target) -> Boto3Client | SdkClient:
    if request.param == "boto3":
        return Boto3Client(target.runtime(), target.endpoint_name)
    return SdkClient(target.session, target.region, target.endpoint_name)

"""An application's client for a SageMaker endpoint with stateful sessions: one conversation ->
one session, created on first use, re-created when the endpoint says it expired or is unknown,
closed on request.

- ``transport``: one request to the endpoint, over boto3's ``sagemaker-runtime``
  (``SageMakerTransport``) or plain HTTP to a local ``/invocations`` (``HttpTransport``).
- ``chat``: the chat request body and the parsing of its answers (whole and streamed).
- ``conversations``: ``SessionClient``, the conversations and their sessions.
- ``warm``: pre-warm the cache with documents (``warm``, ``read_documents``; ``lmcache-ext
  warm``).
"""

from lmcache_ext.client.conversations import SessionClient, Turn, TurnStream
from lmcache_ext.client.transport import (
    EndpointError,
    HttpTransport,
    SageMakerTransport,
    SessionGone,
)
from lmcache_ext.client.warm import Document, DocumentResult, WarmSummary, read_documents, warm

__all__ = ["Document", "DocumentResult", "EndpointError", "HttpTransport", "SageMakerTransport",
           "SessionClient", "SessionGone", "Turn", "TurnStream", "WarmSummary", "read_documents",
           "warm"]

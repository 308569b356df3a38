"""Builds the built-in CPU endpoint: config -> model -> cache engine -> generator -> HTTP server."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

import torch
from prometheus_client import CollectorRegistry

from lmcache_ext.chunk import ChunkMeta
from lmcache_ext.config import EngineConfig
from lmcache_ext.cost import CostModel
from lmcache_ext.engine import CacheEngine
from lmcache_ext.metrics import EngineMetrics, SessionMetrics
from lmcache_ext.serving.generator import Generator
from lmcache_ext.serving.http_server import make_server
from lmcache_ext.serving.model import LoadedModel, load_model
from lmcache_ext.serving.service import Service
from lmcache_ext.serving.sessions import ServerSessions
from lmcache_ext.sessions.drain import DrainReport

log = logging.getLogger(__name__)
DEFAULT_PORT = 8080
PORT_ENV = "SAGEMAKER_BIND_TO_PORT"


@dataclass
class Endpoint:
    """A running endpoint's parts (tests and benchmarks reach into them)."""

    server: ThreadingHTTPServer
    service: Service
    engine: CacheEngine | None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self, discard_queued: bool = False) -> None:
        """Stop serving and close everything; ``discard_queued``: drop write-behinds not yet
        written (counted) instead of waiting for them."""
        self.server.shutdown()
        self.server.server_close()
        self.service.sessions.close()
        if self.engine is not None:
            self.engine.close(discard_queued)

    def drain_and_close(self, timeout_s: float) -> DrainReport | None:
        """The SIGTERM path, all within ``timeout_s`` (``drain_timeout_s``): refuse new
        connections, let requests in flight finish (at most half the time), write the
        sessions' pinned conversations and the write-behind queue to the shared tier, close.
        What the time did not allow is logged and dropped, never waited for (``timeout_s`` 0:
        no drain, queued write-behinds dropped). Call it once ``serve_forever`` has returned,
        or from another thread."""
        began = time.monotonic()
        self.server.shutdown()
        self.server.server_close()  # new connections are refused from here on
        busy = self.service.in_flight.wait_idle(timeout_s / 2)
        if busy:
            log.warning("drain: %d request(s) still in flight after %.1f s; their turns may "
                        "not be drained", busy, timeout_s / 2)
        report = self.service.sessions.drain(max(0.0, timeout_s - (time.monotonic() - began)))
        self.close(discard_queued=timeout_s <= 0 or (report is not None and not report.complete))
        return report


def resolve_port(port: int | None) -> int:
    if port is not None:
        return port
    return int(os.environ.get(PORT_ENV, DEFAULT_PORT))


def probe_prefill(loaded: LoadedModel, chunk_size: int, cost: CostModel) -> None:
    """Time one chunk's prefill so the first request's retrieval decision is measured too."""
    ids = torch.arange(chunk_size).remainder(loaded.model.config.vocab_size).unsqueeze(0)
    with torch.inference_mode():
        loaded.model(input_ids=ids)  # warm-up: first calls pay one-off costs
        began = time.perf_counter()
        loaded.model(input_ids=ids)
    cost.observe_prefill(chunk_size, time.perf_counter() - began)
    log.info("prefill probe: %.0f tokens/s", cost.prefill_tokens_per_s or 0.0)


def build_endpoint(config: EngineConfig, model_path: str | None, host: str, port: int,
                   cache_on: bool = True, loaded: LoadedModel | None = None,
                   session_clock: Callable[[], float] = time.time) -> Endpoint:
    """Everything but serve_forever. ``loaded`` reuses a model already in memory (tests);
    ``session_clock`` is the sessions' time (epoch seconds; tests move it to expire them)."""
    loaded = loaded or load_model(model_path)
    registry = CollectorRegistry(auto_describe=True)
    engine = None
    cost = None
    if cache_on:
        engine = CacheEngine(config, loaded.layout, model_name=loaded.name,
                             metrics=EngineMetrics(registry))
        shape = loaded.layout.shape(config.chunk_size)
        nbytes = ChunkMeta(loaded.layout.dtype, shape, config.chunk_size).nbytes
        cost = CostModel(config.chunk_size, nbytes, config.min_retrieve_tokens,
                         enabled=config.cost_aware_retrieval)
        probe_prefill(loaded, config.chunk_size, cost)
        engine.probe_read_speeds()
    generator = Generator(loaded, engine, config.chunk_size, cost)
    session_metrics = engine.metrics.sessions if engine is not None else \
        SessionMetrics(registry)
    sessions = ServerSessions(config, engine, session_metrics, clock=session_clock)
    service = Service(generator, registry, sessions, config.max_concurrent_lookups)
    server = make_server(service, host, port)
    endpoint = Endpoint(server, service, engine)
    log.info("serving %s on %s (cache %s)", loaded.name, endpoint.url, "on" if cache_on else "off")
    return endpoint

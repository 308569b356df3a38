"""N replicas of the built-in engine in this process, on free loopback ports, sharing one loaded
model (its weights are read-only; each replica has its own cache engine, generator and lock, so
it is a separate instance in all that matters to routing). Imports torch: load it only to start
replicas."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lmcache_ext.config import EngineConfig
from lmcache_ext.routing.router import Backend
from lmcache_ext.serving.app import Endpoint, build_endpoint
from lmcache_ext.serving.model import LoadedModel, load_model


@dataclass
class Replicas:
    """Running replicas; ``close`` stops them all."""

    endpoints: list[Endpoint]
    threads: list[threading.Thread] = field(repr=False)

    @property
    def backends(self) -> list[Backend]:
        return [Backend.from_url(e.url, f"replica-{i}") for i, e in enumerate(self.endpoints)]

    def close(self) -> None:
        for endpoint in self.endpoints:
            endpoint.close()


def start_replicas(count: int, config: EngineConfig, model_path: str | None = None,
                   loaded: LoadedModel | None = None, host: str = "127.0.0.1",
                   cache_on: bool = True,
                   session_clock: Callable[[], float] = time.time) -> Replicas:
    """Start ``count`` replicas serving ``model_path`` (or ``loaded``) with ``config``;
    ``session_clock`` is their sessions' time (tests move it to expire sessions)."""
    if count < 1:
        raise ValueError(f"replicas: {count} must be >= 1")
    loaded = loaded or load_model(model_path)
    endpoints: list[Endpoint] = []
    threads: list[threading.Thread] = []
    try:
        for index in range(count):
            endpoint = build_endpoint(config, None, host, 0, cache_on=cache_on, loaded=loaded,
                                      session_clock=session_clock)
            endpoints.append(endpoint)
            thread = threading.Thread(target=endpoint.server.serve_forever, daemon=True,
                                      name=f"replica-{index}")
            thread.start()
            threads.append(thread)
    except BaseException:
        Replicas(endpoints, threads).close()
        raise
    return Replicas(endpoints, threads)

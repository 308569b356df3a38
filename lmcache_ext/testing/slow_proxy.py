"""A slow network in front of a real server: a TCP proxy that holds each request for a while.

Tests and benchmarks put it between the cache and a real redis-server to get a tier with a
known latency (e.g. 50 ms per chunk read) without faking the tier: every byte still goes to
Redis and back. Each burst the client sends is held ``delay_s`` before it is passed on; replies
pass at once. ``delay_s`` may be changed while it runs (a link that slows down, then recovers).
While the target is down, a new connection is closed at once (the client sees it drop) and the
proxy keeps accepting: a restarted target is reached again. One thread per direction per
connection; ``stop`` closes everything. ``accepted`` counts the connections passed on (a test
can act after the client's Nth request when its client opens one per request).
"""

from __future__ import annotations

import socket
import threading
import time
from contextlib import suppress

BUFFER_BYTES = 1 << 20


class SlowProxy:
    def __init__(self, target_host: str, target_port: int, delay_s: float):
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self.accepted = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._acceptor = threading.Thread(target=self._accept, name="slow-proxy", daemon=True)

    def start(self) -> SlowProxy:
        self._acceptor.start()
        return self

    def url(self, scheme: str = "redis") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._stopped.set()
        with suppress(OSError):
            self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._acceptor.join(timeout=5)

    def __enter__(self) -> SlowProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # stopped
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:  # the target is down: this client's connection drops, not ours
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(client, server, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(BUFFER_BYTES):
                if slow and self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

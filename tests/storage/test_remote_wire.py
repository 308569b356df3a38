"""The remote tier's own GET read (``remote_wire``): values read whole into reused buffers from a
real redis-server, replies that break the protocol or stop half-way from the other end of a real
socket. (A cluster redirect through the tier: ``test_remote.py``.)"""

from __future__ import annotations

import os
import socket

import pytest
import redis

from lmcache_ext.storage import remote_wire
from lmcache_ext.storage.direct_io import BufferCache

# Around the first read's 4 KiB, the buffers' page padding, and a 2 MiB (huge page) buffer.
SIZES = [0, 1, 100, 4000, 4094, 4095, 4096, 4097, 8192, 2 * 1024 * 1024, 3 * 1024 * 1024 + 7]


def test_values_of_every_size_are_read_whole_and_buffers_are_reused(redis_server):
    client = redis_server.client()
    pool = redis.BlockingConnectionPool(port=redis_server.port, max_connections=1)
    buffers = BufferCache()
    for size in SIZES:
        value = os.urandom(size)
        client.set(b"v", value)
        buffer, nbytes = remote_wire.get_into(pool, b"v", buffers.take)
        assert nbytes == size and bytes(buffer.view[:nbytes]) == value
        buffers.give_back(buffer)
        again, _ = remote_wire.get_into(pool, b"v", buffers.take)
        assert again is buffer  # the same size again: the buffer given back is read into
        buffers.give_back(again)
    assert remote_wire.get_into(pool, b"absent", buffers.take) is None


def test_an_error_reply_raises_and_keeps_the_connection(redis_server):
    client = redis_server.client()
    client.rpush(b"list", b"x")
    client.set(b"v", b"value")
    pool = redis.BlockingConnectionPool(port=redis_server.port, max_connections=1)
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        remote_wire.get_into(pool, b"list", BufferCache().take)
    conn = pool.get_connection()
    sock = conn._sock
    pool.release(conn)
    buffer, nbytes = remote_wire.get_into(pool, b"v", BufferCache().take)
    assert bytes(buffer.view[:nbytes]) == b"value"
    conn = pool.get_connection()
    assert conn._sock is sock  # the error line was read whole: the stream stayed in step
    pool.release(conn)


@pytest.mark.parametrize("reply, error", [
    (b"+OK\r\n", "unexpected Redis reply"),
    (b"$5\r\nhelloXX", "did not end with CRLF"),
    (b"$x5\r\nhello\r\n", "unexpected Redis reply"),
    (b"$" + b"9" * 5000, "longer than"),
])
def test_a_reply_that_breaks_the_protocol_is_an_error(reply, error):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.settimeout(1.0)
        theirs.sendall(reply)
        with pytest.raises(redis.ConnectionError, match=error):
            remote_wire.read_bulk(ours, BufferCache().take)


def test_a_reply_cut_short_is_an_error_and_a_stalled_one_times_out():
    for close in (True, False):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            ours.settimeout(0.2)
            theirs.sendall(b"$100\r\n" + b"x" * 10)
            if close:
                theirs.shutdown(socket.SHUT_WR)
            expected = redis.ConnectionError if close else TimeoutError
            with pytest.raises(expected):
                remote_wire.read_bulk(ours, BufferCache().take)

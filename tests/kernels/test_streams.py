"""The order between vLLM's compute stream and the connector's side streams
(``kernels/streams.py``). Imports no vLLM: the cuda-marked test runs on the GPU machine too."""

from __future__ import annotations

import pytest
import torch

from lmcache_ext.kernels.streams import StreamOrder


def test_stream_order_on_a_cpu_is_synchronous_no_ops():
    order = StreamOrder(torch.device("cpu"))
    assert order.mark() is None
    side = order.side()
    ran = []
    with side.run(order.mark()):
        ran.append(True)
    assert ran == [True] and side.mark() is None
    order.wait_on_current(None)
    side.synchronize()


@pytest.mark.cuda
def test_a_side_stream_waits_for_work_queued_before_its_mark():
    """On a GPU: a long kernel queued on the current stream, then a mark; the side stream's
    copy after it sees the kernel's result (without the wait it would read the old value)."""
    device = torch.device("cuda")
    order = StreamOrder(device)
    src = torch.zeros(1 << 20, device=device)
    torch.cuda._sleep(50_000_000)  # keep the current stream busy
    src.fill_(1.0)
    planned = order.mark()
    side = order.side()
    with side.run(planned):
        out = src.clone()
        done = side.mark()
    StreamOrder.done(done)
    assert bool((out == 1.0).all())

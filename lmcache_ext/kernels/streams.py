"""Stream order for the worker's copies: CUDA streams and events on a GPU, the same calls as
synchronous no-ops on a CPU (so one code path runs, and is tested, on both).

The rules the worker keeps with it:
- work on a side stream (a background load, the saver's copies) first waits for an event
  ``mark()``-ed on the stream that was current when the work was planned (vLLM's compute stream):
  it never touches blocks a forward pass queued before it may still read or write;
- a host buffer read by a ``non_blocking`` copy (a tier's lease, a staging buffer) is given back
  only once the copy's event has completed (``done``);
- a forward pass that needs what a side stream wrote waits for its event on the device
  (``wait_on_current``), never on the host.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class StreamOrder:
    """One device's order of copies. ``Event`` values are opaque: a CUDA event, or None on a
    CPU (where every copy has finished when its call returns). Thread-safe; a ``SideStream``
    is used by one thread at a time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        """An event recorded now on the calling thread's current stream (None on a CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def side(self) -> SideStream:
        """A new side stream on this device (a no-op stream on a CPU)."""
        return SideStream(self.device if self.cuda else None)

    def wait_on_current(self, event: Any) -> None:
        """The current stream's later work waits for ``event`` (on the device; no host wait)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    @staticmethod
    def done(event: Any) -> None:
        """Block the host until ``event`` has completed (at once for None)."""
        if event is not None:
            event.synchronize()


class SideStream:
    """A CUDA stream, or nothing on a CPU. ``run(after)`` makes it current for a block of
    work that waits on the device for the ``after`` events first."""

    def __init__(self, device: torch.device | None):
        self._stream = torch.cuda.Stream(device=device) if device is not None else None

    @contextmanager
    def run(self, *after: Any) -> Iterator[None]:
        if self._stream is None:
            yield
            return
        for event in after:
            if event is not None:
                self._stream.wait_event(event)
        with torch.cuda.stream(self._stream):
            yield

    def mark(self) -> Any:
        """An event recorded now on this stream (None on a CPU)."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self._stream)
        return event

    def synchronize(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

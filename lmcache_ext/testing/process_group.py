"""Stopping a server started in a session of its own (``start_new_session=True``), children too."""

from __future__ import annotations

import os
import signal
import subprocess
from contextlib import suppress


def stop_group(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM to the process's group; SIGKILL once ``grace_s`` passed. Waits for the process.
    A group already gone is fine."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

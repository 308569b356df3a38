"""A Docker daemon for the image build and the image tests: the running one, else one started here
and stopped after (``make setup`` and the tests leave the machine as they found it).

``with docker_daemon(): ...`` in Python; ``python -m lmcache_ext.testing.dockerd CMD ARGS...``
runs a command with a daemon up and exits with its status. Needs root and ``dockerd``
(Debian's ``docker.io``, installed by ``scripts/setup_system.sh``).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


class DockerUnavailable(RuntimeError):
    """No daemon runs and none can be started; the text says what is missing."""


def daemon_answers() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@contextlib.contextmanager
def docker_daemon() -> Iterator[None]:
    """A daemon that answers ``docker`` for the duration; stopped after if started here."""
    if daemon_answers():
        yield
        return
    if shutil.which("dockerd") is None or shutil.which("docker") is None:
        raise DockerUnavailable("no Docker daemon runs and dockerd/docker are not installed: "
                                "run `make setup` (scripts/setup_system.sh installs docker.io)")
    log = Path(tempfile.gettempdir()) / "lmcache-ext-dockerd.log"
    with open(log, "ab") as out:
        daemon = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not daemon_answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise DockerUnavailable(f"dockerd did not start (exit {daemon.poll()}): "
                                        f"see {log}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m lmcache_ext.testing.dockerd CMD [ARGS...]", file=sys.stderr)
        return 2
    with docker_daemon():
        return subprocess.run(argv).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

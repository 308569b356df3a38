"""A small real file system that tests can fill: an ext4 image file, loop-mounted (root only).

tmpfs fills up too, but refuses O_DIRECT, so the disk tier would fall back to buffered I/O;
on a loop-mounted ext4 image the tier writes exactly as on an instance's NVMe, and a full disk
is a real ENOSPC from the kernel. ``fill(leave_bytes)`` writes a filler file (another tenant's
data) until only ``leave_bytes`` are free; ``unfill`` deletes it (the operator freed space).
A mount that fails is an error naming the command, never a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

FILLER = "filler.bin"


class SmallFileSystem:
    """``with SmallFileSystem(workdir, size_mib) as fs:`` mounts ``fs.path``; unmounted (and the
    image deleted) on exit."""

    def __init__(self, workdir: Path, size_mib: int):
        self.image = workdir / "fs.img"
        self.path = workdir / "mnt"
        self.size_mib = size_mib
        self._mounted = False

    def __enter__(self) -> SmallFileSystem:
        for tool in ("mkfs.ext4", "mount", "umount"):
            if shutil.which(tool) is None:
                raise RuntimeError(f"{tool} not found: apt-get install e2fsprogs mount")
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as image:
            image.truncate(self.size_mib << 20)
        _run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)])
        _run(["mount", "-o", "loop", str(self.image), str(self.path)])
        self._mounted = True
        return self

    def free_bytes(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave_bytes: int) -> None:
        """Write a filler file until about ``leave_bytes`` are free."""
        size = max(0, self.free_bytes() - leave_bytes)
        with open(self.path / FILLER, "wb") as filler:
            block = b"\0" * (1 << 20)
            while size > 0:
                size -= filler.write(block[:min(size, len(block))])
            filler.flush()
            os.fsync(filler.fileno())

    def unfill(self) -> None:
        (self.path / FILLER).unlink(missing_ok=True)

    def __exit__(self, *exc: object) -> None:
        if self._mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False, capture_output=True)
            self._mounted = False
        self.image.unlink(missing_ok=True)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (root is needed): "
                           f"{result.stderr.strip()}")

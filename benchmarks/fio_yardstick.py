"""fio as the disk tier's yardstick: O_DIRECT reads of given files under several configurations.

No single fio configuration is the device's limit: on a virtual disk the read speed depends on the
queue depth, the engine, the block size and, most of all here, on the pages of the read buffer.
An O_DIRECT read pins every destination page; with fio's default 4 KiB-page buffers that pinning
capped reads near 1 GB/s on this project's VM, while the same reads into 2 MiB huge pages (which
the disk tier uses) ran at about 2.3 GB/s. So every configuration reads into huge pages (hugetlb
pages reserved for the run, root only) and one reads into 4 KiB pages to show that cost.

Each configuration reads the same files (hard links named 00000, 00001, ... in the order the
tier reads them), each file once, sequentially within a file; jobs get the files dealt out
round-robin. GB/s are fio's ``bw_bytes`` (10^9 bytes/s) summed over jobs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

MIB = 1 << 20
HUGE_PAGE = 2 * MIB
INSTALL_HINT = ("fio not installed (`make setup` installs it; or apt-get install -y fio): "
                "fio figures are null")
_NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
_LINE_MAX = 8000  # fio reads job-file lines into 8192-byte buffers and cuts longer ones short


class FioError(RuntimeError):
    """fio exited non-zero, printed no JSON, or reported a job error."""


@dataclass(frozen=True)
class FioConfig:
    name: str
    ioengine: str  # psync, io_uring or libaio
    iodepth: int  # I/Os in flight per job (1 for psync)
    jobs: int  # parallel jobs, the files dealt out round-robin
    block_bytes: int  # 0: one read per file, the file's size (as the tier reads a chunk)
    huge_pages: bool = True  # read buffers in hugetlb pages (when reserved) or 4 KiB pages

    def block_size(self, file_bytes: int) -> int:
        return self.block_bytes or file_bytes


def configs(engine: str) -> tuple[FioConfig, ...]:
    """The configurations compared: one reader at queue depth 1, an async engine at depths 8 and
    32, and the tier's own pattern (4 readers, one read per chunk file)."""
    return (
        FioConfig("psync_qd1_1MiB", "psync", 1, 1, MIB),
        FioConfig("psync_qd1_1MiB_4KiB_pages", "psync", 1, 1, MIB, huge_pages=False),
        FioConfig(f"{engine}_qd8_1MiB", engine, 8, 1, MIB),
        FioConfig(f"{engine}_qd32_1MiB", engine, 32, 1, MIB),
        FioConfig("psync_4jobs_whole_file", "psync", 1, 4, 0),
    )


def installed() -> bool:
    return shutil.which("fio") is not None


def link_in_order(paths: Sequence[str], directory: str) -> list[str]:
    """Hard-link ``paths`` into ``directory`` as 00000, 00001, ...: short names keep fio's
    ``filename=`` lists under its line limit, and the same inodes are the same bytes on disk."""
    os.makedirs(directory)
    names = [f"{n:05d}" for n in range(len(paths))]
    for path, name in zip(paths, names, strict=True):
        os.link(path, os.path.join(directory, name))
    return names


def job_file(config: FioConfig, directory: str, names: Sequence[str], file_bytes: int,
             huge_pages: bool) -> str:
    """The fio job file text: one section per job, each reading its share of ``names``."""
    lines = ["[global]", "rw=read", "direct=1", "file_service_type=sequential",
             "group_reporting", f"directory={directory}", f"ioengine={config.ioengine}",
             f"iodepth={config.iodepth}", f"bs={config.block_size(file_bytes)}"]
    if huge_pages and config.huge_pages:
        lines.append("iomem=shmhuge")
    for job in range(config.jobs):
        files = ":".join(names[job::config.jobs])
        if len(files) > _LINE_MAX:
            raise ValueError(f"{len(names)} files make a filename= line fio would cut short")
        lines += [f"[job{job}]", f"filename={files}"]
    return "\n".join(lines) + "\n"


def run_read(config: FioConfig, directory: str, names: Sequence[str], file_bytes: int,
             huge_pages: bool) -> float:
    """Run ``config`` over ``names`` (files of ``file_bytes``) in ``directory``; GB/s of all
    jobs. Raises FioError, also when fio did not read every whole block of every file exactly
    once (a file skipped, cut short or read twice would skew the figure)."""
    text = job_file(config, directory, names, file_bytes, huge_pages)
    path = os.path.join(directory, f".{config.name}.fio")
    with open(path, "w") as f:
        f.write(text)
    try:
        # --readonly is a command-line option only: fio refuses any write to these files.
        done = subprocess.run(["fio", "--readonly", "--output-format=json", path],
                              capture_output=True, text=True)
    finally:
        os.unlink(path)
    if done.returncode != 0:
        raise FioError(f"fio {config.name} exited {done.returncode}: {done.stderr.strip()}")
    gbps, read_bytes = parse_read(done.stdout)
    block = config.block_size(file_bytes)
    expected = len(names) * (file_bytes // block * block)  # fio skips a tail shorter than bs
    if read_bytes != expected:
        raise FioError(f"fio {config.name} read {read_bytes} bytes, not {expected}")
    return gbps


def parse_read(stdout: str) -> tuple[float, int]:
    """(read GB/s, bytes read) from fio's ``--output-format=json`` stdout, summed over the jobs
    listed (one with group_reporting); notes such as "fio: opendir added N files" may come
    first. Raises FioError on a job error or unreadable output."""
    try:
        report = json.loads(stdout[stdout.index("{"):])
        jobs = report["jobs"]
        errors = [job["error"] for job in jobs if job["error"]]
        gbps = sum(job["read"]["bw_bytes"] for job in jobs) / 1e9
        read_bytes = sum(job["read"]["io_bytes"] for job in jobs)
    except (ValueError, KeyError, TypeError) as exc:
        raise FioError(f"unreadable fio output ({exc!r}): {stdout[:200]!r}") from exc
    if errors or gbps <= 0:
        raise FioError(f"fio reported errors {errors} or read nothing")
    return gbps, read_bytes


def async_engine(directory: str, name: str, file_bytes: int) -> str:
    """io_uring if fio can read file ``name`` with it (kernels or sandboxes may forbid it),
    else libaio."""
    probe = FioConfig("probe_io_uring", "io_uring", 1, 1, 0)
    try:
        run_read(probe, directory, [name], file_bytes, huge_pages=False)
        return "io_uring"
    except FioError:
        return "libaio"


def huge_pages_work(directory: str, name: str, file_bytes: int) -> bool:
    """Whether fio can read file ``name`` into hugetlb pages now (pages reserved, and shared
    memory allowed)."""
    probe = FioConfig("probe_huge_pages", "psync", 1, 1, 0)
    try:
        run_read(probe, directory, [name], file_bytes, huge_pages=True)
        return True
    except FioError:
        return False


def huge_pages_needed(chosen: Sequence[FioConfig], file_bytes: int) -> int:
    """hugetlb pages for the most demanding configuration (configurations run one at a time):
    per job, iodepth blocks plus two pages (fio 3.33 at iodepth 32 x 1 MiB needed 18, not 16)."""
    def pages(config: FioConfig) -> int:
        per_job = config.iodepth * config.block_size(file_bytes)
        return config.jobs * (-(-per_job // HUGE_PAGE) + 2)
    return max(pages(c) for c in chosen if c.huge_pages)


@contextmanager
def huge_pages_reserved(pages: int) -> Iterator[bool]:
    """Add ``pages`` hugetlb pages to the kernel's pool for the block; True if they were added
    (root, and memory not too fragmented). The pool goes back to its old size on exit; a
    process killed inside leaves them reserved (``echo N > /proc/sys/vm/nr_hugepages``)."""
    try:
        with open(_NR_HUGEPAGES) as f:
            before = int(f.read())
        _set_huge_pages(before + pages)
    except OSError:
        yield False
        return
    try:
        with open(_NR_HUGEPAGES) as f:
            yield int(f.read()) >= before + pages
    finally:
        _set_huge_pages(before)


def _set_huge_pages(count: int) -> None:
    with open(_NR_HUGEPAGES, "w") as f:
        f.write(f"{count}\n")

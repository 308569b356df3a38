"""The CPU tier's memory: one slab of exactly the budget, allocated once at start; page-locked
(pinned) where a GPU is present, on the GPU's NUMA node where the platform says which.

Why one slab: torch's pinned allocator rounds every allocation up to a power of two and caches
freed blocks for good, so pinning chunk by chunk overshoots the budget by up to 2x (70B chunks of
10/20/40/80 MiB pin 16/32/64/128 MiB). Here ordinary memory of exactly ``nbytes`` is registered
with CUDA (``cudaHostRegister``): the pinned bytes are the budget, no more. Registration faults
every page in from the calling thread, which runs meanwhile on the GPU's NUMA node's CPUs, so
the pages are local to the GPU (best effort: said in the log either way). Without CUDA the slab is
plain memory whose pages fault in on first use.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger(__name__)
HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context


def allocate_slab(nbytes: int) -> torch.Tensor:
    """A flat uint8 host tensor of ``nbytes`` (pinned where a GPU is present)."""
    slab = torch.empty(nbytes, dtype=torch.uint8)
    if nbytes == 0 or not torch.cuda.is_available():
        return slab
    device = torch.cuda.current_device()
    node = gpu_numa_node(device)
    with _on_node(node):
        status = int(torch.cuda.cudart().cudaHostRegister(slab.data_ptr(), nbytes,
                                                          HOST_REGISTER_PORTABLE))
    if status != 0:
        raise RuntimeError(f"pinning the CPU tier's {nbytes} bytes failed (cudaError {status})")
    log.info("lmcache-ext: CPU tier pinned %.2f GiB in one slab%s", nbytes / 2**30,
             f" on NUMA node {node} (GPU {device}'s)" if node is not None
             else " (GPU's NUMA node unknown: placed by the OS)")
    return slab


def release_slab(slab: torch.Tensor) -> None:
    """Unpin a slab from ``allocate_slab`` (no-op where it was not pinned)."""
    if slab.numel() and torch.cuda.is_available() and slab.is_pinned():
        torch.cuda.cudart().cudaHostUnregister(slab.data_ptr())


def gpu_numa_node(device: int) -> int | None:
    """The NUMA node of CUDA device ``device`` as sysfs states it, or None if unknown."""
    address = _pci_address(torch.cuda.get_device_properties(device))
    if address is None:
        return None
    try:
        with open(f"/sys/bus/pci/devices/{address}/numa_node") as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _pci_address(props: object) -> str | None:
    """The device's PCI address ``dddd:bb:dd.0``: from torch's properties where it has them,
    else by its UUID in the NVIDIA driver's ``/proc/driver/nvidia/gpus/<address>/information``."""
    ids = [getattr(props, name, None) for name in ("pci_domain_id", "pci_bus_id",
                                                   "pci_device_id")]
    if all(isinstance(i, int) for i in ids):
        return f"{ids[0]:04x}:{ids[1]:02x}:{ids[2]:02x}.0"
    uuid = str(getattr(props, "uuid", "")).lower().removeprefix("gpu-")
    for info in glob.glob("/proc/driver/nvidia/gpus/*/information") if uuid else ():
        try:
            with open(info) as f:
                if uuid in f.read().lower():
                    return os.path.basename(os.path.dirname(info)).lower()
        except OSError:
            continue
    return None


def parse_cpu_list(text: str) -> set[int]:
    """sysfs's CPU list ("0-3,8,10-11") as a set of CPU ids."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


@contextmanager
def _on_node(node: int | None) -> Iterator[None]:
    """Run the calling thread on NUMA node ``node``'s CPUs meanwhile (first-touch placement);
    as it is where the node or the affinity cannot be had."""
    try:
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            cpus = parse_cpu_list(f.read()) & os.sched_getaffinity(0)
        before = os.sched_getaffinity(0)
    except (OSError, ValueError, TypeError, AttributeError):
        cpus, before = set(), set()
    if node is None or not cpus:
        yield
        return
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)

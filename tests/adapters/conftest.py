from __future__ import annotations

import pytest

from tests.adapters.vllm_setup import close_rigs


@pytest.fixture(autouse=True)
def _close_rigs():
    """Every rig a test made is shut down after it (no thread or socket outlives a test)."""
    yield
    close_rigs()

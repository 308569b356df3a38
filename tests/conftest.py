"""Suite-wide: a ``cuda``-marked test needs a CUDA GPU. ``make test`` deselects them (``-m "not
cuda"``); ``scripts/gpu_check.sh`` runs them; run anywhere else they fail, never skip."""

from __future__ import annotations

import pytest


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is None:
        return
    import torch
    if not torch.cuda.is_available():
        pytest.fail("this test is marked cuda and needs a CUDA GPU (torch.cuda.is_available() "
                    "is False): run it with scripts/gpu_check.sh on a GPU machine, or deselect "
                    "it with -m 'not cuda'", pytrace=False)

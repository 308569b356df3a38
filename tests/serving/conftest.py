"""Models for the serving tests: a tiny random one (fast) and the real default one (once)."""

from __future__ import annotations

import pytest

from lmcache_ext.serving.model import LoadedModel, load_model
from lmcache_ext.testing.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> LoadedModel:
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny-model"))
    return load_model(str(folder))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The built-in default model (converted from the bundled GGUF on first use, ~30 s)."""
    return load_model(None)

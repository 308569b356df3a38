import os

import pytest

# Before anything imports vLLM: without it VllmConfig cannot infer a device on this machine.
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
try:
    import vllm  # noqa: F401
except ImportError as exc:  # CI installs vLLM: a missing one is a failure, never a skip
    pytest.fail(f"vLLM is not importable ({exc}); install it with "
                f"`scripts/setup_vllm.sh .venv 0.33.0`", pytrace=False)

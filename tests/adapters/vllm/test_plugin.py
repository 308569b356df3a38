"""The vLLM plugin where vLLM itself resolves connector names: in a fresh process, vLLM's own
plugin loading finds our entry point in the installed distribution, then vLLM's
KVConnectorFactory resolves LMCache's names to our class (and to LMCache's with the switch
off). Runs on every vLLM this project supports (each venv of `make test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib.metadata import distribution

import pytest

from lmcache_ext.adapters.vllm.takeover import (
    OUR_CONNECTOR,
    OUR_MODULE,
    OUR_MODULES,
    TAKEN_OVER,
    takeover_enabled,
)
from tests.helpers import REPO

RESOLVE = """
import json, sys
from vllm.config import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.plugins import load_general_plugins
load_general_plugins()
found = {}
module = sys.argv[1] or None  # a kv_connector_module_path, or "" for none
for name in sys.argv[2:]:
    config = KVTransferConfig(kv_connector=name, kv_role="kv_both",
                              kv_connector_module_path=module)
    try:
        cls = KVConnectorFactory.get_connector_class(config)
        found[name] = cls.__module__ + "." + cls.__qualname__
    except ImportError as exc:  # LMCache's MP connector imports lmcache, absent here
        found[name] = "ImportError: " + str(exc)
print(json.dumps(found))
"""
OURS = f"{OUR_MODULE}.{OUR_CONNECTOR}"
NAMES = [*TAKEN_OVER, OUR_CONNECTOR]


def resolve(env: dict[str, str] | None = None, module: str = "",
            names: list[str] = NAMES) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("LMCACHE_EXT_TAKEOVER",
                                                               "VLLM_PLUGINS")}
    done = subprocess.run([sys.executable, "-c", RESOLVE, module, *names], capture_output=True,
                          text=True, timeout=300, env={**clean, **(env or {})}, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_installed_distribution_declares_the_plugin_of_pyproject():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    installed = {e.name: e.value for e in distribution("lmcache-ext").entry_points
                 if e.group == "vllm.general_plugins"}
    assert installed == declared["vllm.general_plugins"], \
        "the installed lmcache-ext is older than pyproject.toml: run `make setup`"


def test_lmcaches_names_resolve_to_ours_in_vllms_factory():
    assert resolve() == {name: OURS for name in NAMES}


def test_the_module_path_users_configs_name_still_loads_our_connector():
    """``lmcache_ext.adapters.vllm_connector``, the path users' ``kv_connector_module_path``
    named before the vLLM room existed, is a shim of the room's connector module."""
    for module in OUR_MODULES:
        assert resolve(module=module, names=[OUR_CONNECTOR]) == {OUR_CONNECTOR: OURS}


def test_the_off_switch_leaves_lmcaches_names_to_lmcache():
    found = resolve({"LMCACHE_EXT_TAKEOVER": "false"})
    assert found["LMCacheConnectorV1"] == \
        "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector.LMCacheConnectorV1"
    assert found["LMCacheMPConnector"] != OURS  # LMCache's (it imports lmcache, absent here)
    assert found[OUR_CONNECTOR] == OURS  # our own name works either way


@pytest.mark.parametrize("text, expected", [("", True), ("true", True), ("0", False),
                                            ("FALSE", False), (" off ", False)])
def test_the_switchs_values(text, expected):
    assert takeover_enabled({"LMCACHE_EXT_TAKEOVER": text}) is expected


def test_a_bad_switch_is_an_error_naming_the_variable():
    with pytest.raises(ValueError, match="LMCACHE_EXT_TAKEOVER='perhaps'"):
        takeover_enabled({"LMCACHE_EXT_TAKEOVER": "perhaps"})

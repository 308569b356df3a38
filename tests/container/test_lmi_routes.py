"""Every way an LMI user switches LMCache on ends with our connector: a real process chain of our
entrypoint, then a stand-in for LMI's next stage (serving.properties over env, LMI's auto-config
exports), then vLLM's own argument parsing, config and connector factory after its plugin
loading (real vLLM: whichever this venv has). Needs the package installed (``make setup``): vLLM
finds the plugin in the installed distribution's entry points."""

from __future__ import annotations

import json
from pathlib import Path

from tests.container.entry_helpers import SEED_KV, Run, lmi_stand_in, run_entrypoint
from tests.helpers import TINY_LLAMA

OURS = "lmcache_ext.adapters.vllm.connector.LMCacheExtConnector"
LMCACHES = "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_connector.LMCacheConnectorV1"


def model_dir(tmp: Path, properties: str = "") -> Path:
    """/opt/ml/model as a user ships it: the model's config.json and maybe serving.properties."""
    folder = tmp / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    if properties:
        (folder / "serving.properties").write_text(properties)
    return folder


def chain(tmp: Path, env: dict[str, str], properties: str = "") -> Run:
    folder = model_dir(tmp, properties)
    run = run_entrypoint(tmp, {"SM_MODEL_DIR": str(folder), **env},
                         next_stage=lmi_stand_in(tmp), timeout=300)
    assert run.returncode == 0, f"{run.log}\n{run.record and run.record.get('error')}"
    return run


def verify_ours(run: Run, route: str, **sizes: float) -> None:
    assert run.record["class"] == OURS, run.record
    assert f"LMCache is switched on by {route}" in run.log, run.log
    for key, value in sizes.items():
        assert run.record["config"][key] == value, (key, run.record["sources"])


def test_env_kv_transfer_config(tmp_path):
    """Row 1: OPTION_KV_TRANSFER_CONFIG, exactly as the seed writes it."""
    run = chain(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV,
                           "OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE": "1.5"})
    verify_ours(run, "kv_transfer_config (env OPTION_KV_TRANSFER_CONFIG)", max_local_cpu_size=1.5)
    assert run.record["kv_connector"] == "LMCacheConnectorV1"


def test_serving_properties_with_a_relative_config_file(tmp_path):
    """Rows 2 and 5: LMI's LMCache guide puts the config in serving.properties, the config file
    named relative to the model directory; the file wins over env (LMI's putIfAbsent)."""
    (model_dir(tmp_path) / "lmcache.yaml").write_text("max_local_cpu_size: 2.5\n")
    properties = (f"engine=Python\noption.kv_transfer_config={SEED_KV}\n"
                  "option.lmcache_config_file=lmcache.yaml\noption.lmcache_chunk_size=512\n")
    nixl = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    run = chain(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": nixl}, properties)
    verify_ours(run, "kv_transfer_config (", max_local_cpu_size=2.5, chunk_size=512)
    config_file = str(tmp_path / "model" / "lmcache.yaml")
    assert run.record["sources"]["max_local_cpu_size"] == f"file {config_file}"
    assert run.env["LMCACHE_CONFIG_FILE"] == config_file


def test_serving_properties_with_a_broken_kv_config_fails_fast_naming_the_line(tmp_path):
    no_role = '{"kv_connector":"LMCacheConnectorV1"}'
    properties = f"engine=Python\noption.kv_transfer_config={no_role}\n"
    folder = model_dir(tmp_path, properties)
    run = run_entrypoint(tmp_path, {"SM_MODEL_DIR": str(folder)})
    assert run.returncode == 2 and run.record is None
    assert f"{folder}/serving.properties line 2 option.kv_transfer_config" in run.log
    assert "kv_role" in run.log


def test_auto_config_by_env(tmp_path):
    """Row 3: LMI's documented OPTION_LMCACHE_AUTO_CONFIG=true, nothing else; our entrypoint
    sizes the tiers and consumes the variable, so LMI's own auto-config does not run."""
    run = chain(tmp_path, {"OPTION_LMCACHE_AUTO_CONFIG": "true",
                           "OPTION_LMCACHE_LOCAL_DISK": str(tmp_path / "cache")})
    cpu = float(run.env["OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE"])
    disk = float(run.env["OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE"])
    verify_ours(run, "auto-config (env OPTION_LMCACHE_AUTO_CONFIG=true)",
                max_local_cpu_size=cpu, max_local_disk_size=disk)
    assert run.record["config"]["extra_config"] == {"use_odirect": True}
    assert "LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR" not in run.env  # LMI's did not run


def test_auto_config_in_serving_properties(tmp_path):
    """Row 3 from serving.properties: LMI's auto-config runs too and exports LMCACHE_*; its
    LMCache-only keys are not applicable, and the sizes our entrypoint set win."""
    run = chain(tmp_path, {"OPTION_LMCACHE_LOCAL_DISK": str(tmp_path / "cache")},
                "option.lmcache_auto_config=true\n")
    assert run.env["LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR"] == "true"  # LMI's export
    cpu = float(run.env["OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE"])
    verify_ours(run, "auto-config (", max_local_cpu_size=cpu)
    assert run.record["sources"]["max_local_cpu_size"] == "env OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE"
    assert "enable_lazy_memory_allocator" in run.record["not_applicable"]


def test_offloading_backend(tmp_path):
    """Row 4: kv_offloading_backend=lmcache (vLLM makes it LMCacheMPConnector); the size is
    vLLM's total over the TP ranks, ours is per rank."""
    run = chain(tmp_path, {"OPTION_KV_OFFLOADING_BACKEND": "lmcache",
                           "OPTION_KV_OFFLOADING_SIZE": "8", "OPTION_TENSOR_PARALLEL_DEGREE": "2"})
    verify_ours(run, "offloading backend (env OPTION_KV_OFFLOADING_BACKEND=lmcache",
                max_local_cpu_size=4.0)
    assert run.record["kv_connector"] == "LMCacheMPConnector"


def test_the_off_switch_gives_lmcache_back(tmp_path):
    run = chain(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV, "LMCACHE_EXT_TAKEOVER": "false"})
    assert run.record["class"] == LMCACHES
    assert "LMCACHE_EXT_TAKEOVER=false: LMCache itself runs" in run.log

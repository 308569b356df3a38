"""The container entrypoint as users meet it: real process, real env vars, real files and
directories; LMI's entrypoint is a stand-in that records what it was handed."""

from __future__ import annotations

import json
import sys

from lmcache_ext.config import TABLE
from tests.container.entry_helpers import SEED_KV, run_entrypoint
from tests.helpers import REPO, SEED_CPU, SEED_NVME

OURS = {"kv_connector": "LMCacheExtConnector",
        "kv_connector_module_path": "lmcache_ext.adapters.vllm.connector"}


def test_the_seeds_env_vars_turn_our_cache_on(tmp_path):
    """Scenario: the seed's two env vars, exactly as written, with the seed's CPU config file."""
    run = run_entrypoint(tmp_path, {"OPTION_LMCACHE_CONFIG_FILE": str(SEED_CPU),
                                    "OPTION_KV_TRANSFER_CONFIG": SEED_KV})
    assert run.returncode == 0, run.log
    assert run.record["argv"] == ["serve"]
    # Handed over as written: vLLM's registry (our plugin) decides the class, see test_lmi_routes.
    assert run.env["OPTION_KV_TRANSFER_CONFIG"] == SEED_KV
    assert run.env["LMCACHE_CONFIG_FILE"] == str(SEED_CPU)  # what LMI would export, set early
    assert "LMCache is switched on by kv_transfer_config (env OPTION_KV_TRANSFER_CONFIG): vLLM " \
        "runs lmcache-ext's LMCacheExtConnector in its place" in run.log
    assert f"max_local_cpu_size = 5.0 GiB  (file {SEED_CPU})" in run.log
    assert "chunk_size = 256 tokens" in run.log


def test_our_own_connector_name_works_and_the_config_is_handed_over_unchanged(tmp_path):
    kv = {"kv_connector": "LMCacheExtConnector", "kv_role": "kv_both",
          "kv_connector_extra_config": {"chunk_size": 512}, "kv_buffer_device": "cuda"}
    for given in (kv, {**kv, **OURS}):
        run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": json.dumps(given)})
        assert run.returncode == 0, run.log
        assert run.kv == given
        assert "LMCache is switched on by kv_transfer_config" in run.log


def test_lmcaches_own_module_path_is_the_users_choice(tmp_path):
    """Scenario: LMCache's docs name its module; vLLM's factory then imports it, not us."""
    kv = {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both",
          "kv_connector_module_path": "lmcache.integration.vllm.lmcache_connector_v1"}
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": json.dumps(kv)})
    assert run.returncode == 0, run.log
    assert run.kv == kv
    assert "kv_connector LMCacheConnectorV1 (module lmcache.integration.vllm." \
        "lmcache_connector_v1): not taken over" in run.log


def test_the_nvme_seed_config_with_its_directory_moved_by_env(tmp_path):
    cache = tmp_path / "nvme" / "cache"
    run = run_entrypoint(tmp_path, {"OPTION_LMCACHE_CONFIG_FILE": str(SEED_NVME),
                                    "OPTION_KV_TRANSFER_CONFIG": SEED_KV,
                                    "OPTION_LMCACHE_LOCAL_DISK": f"file://{cache}/"})
    assert run.returncode == 0, run.log
    assert cache.is_dir()  # created before LMI starts
    assert len([ln for ln in run.log.splitlines() if "O_DIRECT" in ln]) == 1, run.log  # said once
    assert f"local_disk = \"file://{cache}/\"  (env OPTION_LMCACHE_LOCAL_DISK)" in run.log


# A valid, non-default value for every key; the test below fails when a key is added to the
# table without one here.
EVERY_KEY = {
    "chunk_size": "512", "local_cpu": "false", "max_local_cpu_size": "1.5",
    "local_disk": "{disk}", "max_local_disk_size": "0.5", "remote_url": "redis://cache:6379",
    "remote_key_prefix": "tenant-a", "remote_password_env": "REDIS_PASSWORD",
    "remote_auth_key_env": "KV_KEY", "remote_auth_previous_key_env": "KV_OLD_KEY",
    "local_disk_auth_key_env": "KV_DISK_KEY", "local_disk_auth_previous_key_env": "KV_OLD_DISK",
    "remote_timeout_s": "2.5", "remote_backoff_s": "9", "remote_ttl_s": "3600",
    "remote_serde": "naive", "save_unfull_chunk": "true", "extra_config": '{"use_odirect": true}',
    "pre_caching_hash_algorithm": "xxh3_128", "model_name": "my-model", "cache_salt": "s1",
    "write_behind_queue_chunks": "8", "cost_aware_retrieval": "false",
    "min_retrieve_tokens": "64", "save_decode_cache": "false", "use_layerwise": "false",
    "worker_lookup_timeout_s": "0.5", "worker_lookup_backoff_s": "10",
    "emf_metrics": "true", "emf_interval_s": "30", "emf_namespace": "LMCacheExtTest",
    "enable_stateful_sessions": "false", "sessions_expiration_s": "300",
    "session_pin_max_gib": "0.25", "session_pins_max_fraction": "0.2", "drain_timeout_s": "12",
    "max_open_sessions": "500", "max_concurrent_lookups": "8",
    "staging_chunks": "2", "async_load": "never", "local_disk_codec": "int8",
    "remote_encryption_key_env": "KV_SEAL", "remote_encryption_previous_key_env": "KV_OLD_SEAL",
    "local_disk_encryption_key_env": "KV_DISK_SEAL",
    "local_disk_encryption_previous_key_env": "KV_OLD_DISK_SEAL",
}


def test_every_key_can_be_set_as_an_option_env_var(tmp_path):
    assert set(EVERY_KEY) == {key.name for key in TABLE}
    env = {f"OPTION_LMCACHE_{k.upper()}": v.replace("{disk}", str(tmp_path / "disk"))
           for k, v in EVERY_KEY.items()}
    run = run_entrypoint(tmp_path, {**env, "OPTION_KV_TRANSFER_CONFIG": SEED_KV})
    assert run.returncode == 0, run.log
    for key in TABLE:
        assert f"{key.name} = " in run.log and f"(env OPTION_LMCACHE_{key.name.upper()})" \
            in run.log, key.name
    assert "chunk_size = 512 tokens  (env OPTION_LMCACHE_CHUNK_SIZE)" in run.log
    assert run.env["OPTION_LMCACHE_CHUNK_SIZE"] == "512"  # the engine reads the same env


def test_precedence_file_then_lmcache_env_then_option_env(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("chunk_size: 128\n")
    run = run_entrypoint(tmp_path, {
        "LMCACHE_CONFIG_FILE": str(other), "OPTION_LMCACHE_CONFIG_FILE": str(SEED_CPU),
        "LMCACHE_MAX_LOCAL_CPU_SIZE": "7", "LMCACHE_CHUNK_SIZE": "512",
        "OPTION_LMCACHE_CHUNK_SIZE": "1024", "OPTION_KV_TRANSFER_CONFIG": SEED_KV})
    assert run.returncode == 0, run.log
    assert "chunk_size = 1024 tokens  (env OPTION_LMCACHE_CHUNK_SIZE)" in run.log
    assert "max_local_cpu_size = 7.0 GiB  (env LMCACHE_MAX_LOCAL_CPU_SIZE)" in run.log
    assert run.env["LMCACHE_CONFIG_FILE"] == str(SEED_CPU)  # OPTION_'s file wins


def test_without_a_kv_transfer_config_lmi_starts_unchanged(tmp_path):
    run = run_entrypoint(tmp_path, {"OPTION_MODEL_ID": "org/model"}, args=("serve", "a b"))
    assert run.returncode == 0, run.log
    assert run.record["argv"] == ["serve", "a b"]
    assert "OPTION_KV_TRANSFER_CONFIG" not in run.env
    assert "cache off" in run.log


def test_another_connector_is_handed_over_unchanged(tmp_path):
    kv = '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": kv})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_KV_TRANSFER_CONFIG"] == kv


def test_the_next_stage_replaces_the_entrypoint(tmp_path):
    """exec, not a child: LMI's exit status is the container's."""
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV, "STAND_IN_EXIT": "7"})
    assert run.returncode == 7
    assert run.record is not None


def test_the_shell_entrypoint_of_the_image(tmp_path):
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV,
                                    "LMI_PYTHON": sys.executable},
                         command=[str(REPO / "container" / "entrypoint.sh")])
    assert run.returncode == 0, run.log
    assert run.env["OPTION_KV_TRANSFER_CONFIG"] == SEED_KV
    assert "LMCache is switched on by kv_transfer_config" in run.log


def test_auto_config_false_is_the_cache_off(tmp_path):
    run = run_entrypoint(tmp_path, {"OPTION_LMCACHE_AUTO_CONFIG": "false"})
    assert run.returncode == 0, run.log
    assert "cache off" in run.log and run.env["OPTION_LMCACHE_AUTO_CONFIG"] == "false"


def test_lmis_session_options_in_serving_properties_reach_vllms_workers(tmp_path):
    """Scenario: option.enable_stateful_sessions / option.sessions_expiration in
    serving.properties (LMI's handler reads them there) are exported for the engine in vLLM's
    workers, and a switch LMI would read differently from us stops the container naming the
    line."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "serving.properties").write_text(
        "option.enable_stateful_sessions=FALSE\noption.sessions_expiration=300\n")
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV,
                                    "SM_MODEL_DIR": str(model)})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_ENABLE_STATEFUL_SESSIONS"] == "FALSE"
    assert run.env["OPTION_SESSIONS_EXPIRATION"] == "300"
    assert "enable_stateful_sessions = false  (env OPTION_ENABLE_STATEFUL_SESSIONS)" in run.log
    assert "sessions_expiration_s = 300.0 s  (env OPTION_SESSIONS_EXPIRATION)" in run.log
    (model / "serving.properties").write_text("option.enable_stateful_sessions=1\n")
    run = run_entrypoint(tmp_path, {"OPTION_KV_TRANSFER_CONFIG": SEED_KV,
                                    "SM_MODEL_DIR": str(model)})
    assert run.returncode == 2 and run.record is None
    assert "OPTION_ENABLE_STATEFUL_SESSIONS" in run.log and "true or false" in run.log
    assert "serving.properties line 1 option.enable_stateful_sessions" in run.log

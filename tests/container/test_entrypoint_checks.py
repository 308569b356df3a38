"""Every check the entrypoint makes before LMI starts: a failure exits 2, names the env var the
value came from, and LMI (the stand-in) never runs. And OPTION_LMCACHE_AUTO_CONFIG."""

from __future__ import annotations

import json

import pytest

from tests.container.entry_helpers import SEED_KV, run_entrypoint
from tests.helpers import LLAMA_LIKE, SEED_CPU


def _bad_yaml(tmp):
    path = tmp / "bad.yaml"
    path.write_text("chunk_size: [256\n")
    return str(path)


def _under_a_file(tmp):
    blocker = tmp / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "cache")


# (case, env builder, the env var the message must name, more text it must hold)
KV = "OPTION_KV_TRANSFER_CONFIG"
FAILURES = [
    ("kv not json", lambda t: {"OPTION_KV_TRANSFER_CONFIG": "{kv_connector: LMCacheConnectorV1}"},
     "OPTION_KV_TRANSFER_CONFIG", "not valid JSON"),
    ("kv without role", lambda t: {KV: '{"kv_connector":"LMCacheConnectorV1"}'},
     "OPTION_KV_TRANSFER_CONFIG", "kv_role"),
    ("kv bad role", lambda t: {KV: '{"kv_connector":"x","kv_role":"both"}'},
     "OPTION_KV_TRANSFER_CONFIG", "kv_both"),
    ("kv not an object", lambda t: {"OPTION_KV_TRANSFER_CONFIG": '["kv_both"]'},
     "OPTION_KV_TRANSFER_CONFIG", "JSON object"),
    ("cache vars without kv", lambda t: {"OPTION_LMCACHE_CONFIG_FILE": str(SEED_CPU),
                                         "OPTION_KV_TRANSFER_CONFIG": None},
     "OPTION_LMCACHE_CONFIG_FILE", "nothing switches the cache on"),
    ("auto-config with a config file", lambda t: {"OPTION_LMCACHE_AUTO_CONFIG": "true",
                                                  "OPTION_LMCACHE_CONFIG_FILE": str(SEED_CPU)},
     "OPTION_LMCACHE_CONFIG_FILE", "LMI refuses auto-configuration with a config file"),
    ("offloading without a size", lambda t: {"OPTION_KV_OFFLOADING_BACKEND": "lmcache",
                                             "OPTION_KV_TRANSFER_CONFIG": None},
     "OPTION_KV_OFFLOADING_BACKEND", "vLLM offloads only with a size"),
    ("takeover not a boolean", lambda t: {"LMCACHE_EXT_TAKEOVER": "perhaps"},
     "LMCACHE_EXT_TAKEOVER", "boolean"),
    ("plugin left out", lambda t: {"VLLM_PLUGINS": "other_plugin"},
     "VLLM_PLUGINS", "lmcache_ext"),
    ("bad value", lambda t: {"OPTION_LMCACHE_CHUNK_SIZE": "100"},
     "OPTION_LMCACHE_CHUNK_SIZE", "multiple of 16"),
    ("unknown key", lambda t: {"OPTION_LMCACHE_CHUNK_SIZ": "256"},
     "OPTION_LMCACHE_CHUNK_SIZ", "did you mean 'chunk_size'"),
    ("missing file", lambda t: {"OPTION_LMCACHE_CONFIG_FILE": str(t / "nope.yaml")},
     "OPTION_LMCACHE_CONFIG_FILE", "no such file"),
    ("bad yaml", lambda t: {"OPTION_LMCACHE_CONFIG_FILE": _bad_yaml(t)},
     "OPTION_LMCACHE_CONFIG_FILE", "not valid YAML"),
    ("disk dir cannot be made", lambda t: {"OPTION_LMCACHE_LOCAL_DISK": _under_a_file(t),
                                           "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE": "1"},
     "OPTION_LMCACHE_LOCAL_DISK", "not usable"),
    ("disk too small", lambda t: {"OPTION_LMCACHE_LOCAL_DISK": str(t / "c"),
                                  "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE": "1000000"},
     "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE", "does not fit"),
    ("disk without size", lambda t: {"OPTION_LMCACHE_LOCAL_DISK": str(t / "c")},
     "max_local_disk_size", "needs a size"),
    ("auto not a boolean", lambda t: {"OPTION_LMCACHE_AUTO_CONFIG": "maybe"},
     "OPTION_LMCACHE_AUTO_CONFIG", "boolean"),
    ("no next stage", lambda t: {"LMI_ENTRYPOINT": str(t / "missing.sh")},
     "LMI_ENTRYPOINT", "not an executable"),
]


@pytest.mark.parametrize("build, var, text", [f[1:] for f in FAILURES],
                         ids=[f[0] for f in FAILURES])
def test_each_failure_exits_2_naming_the_env_var_before_lmi_starts(tmp_path, build, var, text):
    # Every case but one has the seed's KV config; None removes a variable.
    env = {"OPTION_KV_TRANSFER_CONFIG": SEED_KV, **build(tmp_path)}
    env = {name: value for name, value in env.items() if value is not None}
    run = run_entrypoint(tmp_path, env)
    assert run.returncode == 2, run.log
    assert run.record is None, "LMI must not start"
    assert var in run.log and text in run.log, run.log
    assert "not starting the model server" in run.log


def test_auto_config_sizes_both_tiers_from_the_machine(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_LIKE))
    cache = tmp_path / "cache"
    run = run_entrypoint(tmp_path, {
        "OPTION_KV_TRANSFER_CONFIG": SEED_KV, "OPTION_LMCACHE_AUTO_CONFIG": "true",
        "OPTION_MODEL_ID": str(model), "OPTION_TENSOR_PARALLEL_DEGREE": "1",
        "OPTION_LMCACHE_LOCAL_DISK": str(cache), "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"})
    assert run.returncode == 0, run.log
    cpu = float(run.env["OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE"])
    assert cpu > 0
    assert "131072 B of KV per token" in run.log  # 2 x 32 layers x 8 heads x 128 x 2 B
    assert f"max_local_cpu_size = {cpu} GiB  (env OPTION_LMCACHE_MAX_LOCAL_CPU_SIZE)" in run.log
    # A disk size the user set by env is kept: auto-config only fills what is not set.
    assert run.env["OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE"] == "0.1"
    assert "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE kept as 0.1" in run.log


def test_auto_config_alone_is_lmis_documented_usage(tmp_path):
    """Scenario: LMI's documented auto-config, no OPTION_KV_TRANSFER_CONFIG (used to exit 2):
    LMI's connector name, a disk tier with O_DIRECT, both tiers sized; the variable is consumed
    so that LMI does not size a second time."""
    cache = tmp_path / "cache"
    run = run_entrypoint(tmp_path, {"OPTION_LMCACHE_AUTO_CONFIG": "true",
                                    "OPTION_LMCACHE_LOCAL_DISK": f"file://{cache}/",
                                    "TENSOR_PARALLEL_DEGREE": "2"})
    assert run.returncode == 0, run.log
    assert run.kv == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert "OPTION_LMCACHE_AUTO_CONFIG" not in run.env
    assert run.env["OPTION_LMCACHE_EXTRA_CONFIG"] == '{"use_odirect": true}'
    assert float(run.env["OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE"]) > 0 and cache.is_dir()
    assert "workers: 2 (env TENSOR_PARALLEL_DEGREE=2)" in run.log
    assert "LMCache is switched on by auto-config (env OPTION_LMCACHE_AUTO_CONFIG=true)" in run.log


def test_auto_configs_disk_is_lmis_directory_unless_set(tmp_path):
    """Without a local_disk of the user's, auto-config uses LMI's /tmp/cache (checked here only
    as far as the handed-over env: the test must not fill this machine's /tmp/cache)."""
    run = run_entrypoint(tmp_path, {"OPTION_LMCACHE_AUTO_CONFIG": "true",
                                    "LMCACHE_LOCAL_DISK": str(tmp_path / "mine"),
                                    "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1"})
    assert run.returncode == 0, run.log
    assert "OPTION_LMCACHE_LOCAL_DISK" not in run.env  # the user's LMCACHE_LOCAL_DISK is kept
    assert "LMCACHE_MAX_LOCAL_DISK_SIZE kept as 0.1" in run.log

"""Config: the seed files, every source and its precedence, and every error naming its key."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from lmcache_ext.config import (
    TABLE,
    ConfigError,
    EngineConfig,
    describe,
    load_config,
    resolve_disk_dir,
)
from lmcache_ext.units import GIB
from tests.helpers import SEED_CPU, SEED_NVME


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lmcache_config.yaml"
    path.write_text(text)
    return str(path)


def problems_of(**kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)
    return info.value.problems


def only_problem(**kwargs) -> str:
    problems = problems_of(**kwargs)
    assert len(problems) == 1, problems
    return problems[0]


# ------------------------------------------------------------------ the seed's two files


def test_seed_cpu_file_means_what_it_says():
    config = load_config(path=str(SEED_CPU), env={})
    assert config.chunk_size == 256
    assert config.local_cpu is True
    assert config.cpu_budget_bytes == 5 * GIB
    assert config.local_disk is None and config.disk_budget_bytes == 0
    assert config.source_of("chunk_size") == f"file {SEED_CPU}"
    assert config.source_of("local_cpu") == "default"


def test_seed_nvme_file_means_what_it_says():
    config = load_config(path=str(SEED_NVME), env={})
    assert config.disk_dir == "/tmp/cache"  # the seed's file://tmp/cache/ is absolute
    assert config.disk_budget_bytes == 5 * GIB
    assert config.use_odirect is True
    assert config.cpu_budget_bytes == 5 * GIB


def test_seed_env_var_names_the_file():
    env = {"OPTION_LMCACHE_CONFIG_FILE": str(SEED_NVME)}
    assert load_config(env=env).use_odirect is True
    assert load_config(env={"LMCACHE_CONFIG_FILE": str(SEED_CPU)}).local_disk is None


@pytest.mark.parametrize("value", ["file:///tmp/cache/", "/tmp/cache/", "file://tmp/cache/",
                                   "/tmp/cache"])
def test_disk_locations_resolve_to_one_absolute_dir(value):
    assert resolve_disk_dir(value) == "/tmp/cache"


def test_relative_disk_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(env={}, overrides={"local_disk": "cache", "max_local_disk_size": 1})
    assert config.disk_dir == str(tmp_path / "cache")


# ------------------------------------------------------------------ sources and precedence


def test_defaults_match_the_table():
    config = load_config(env={})
    for key in TABLE:
        assert getattr(config, key.name) == key.default, key.name
        assert config.source_of(key.name) == "default"


def test_every_default_is_written_once_in_the_table():
    """EngineConfig's fields take their defaults from TABLE; none is written a second time."""
    keys = {key.name for key in TABLE}
    fields_seen = set()
    for node in ast.walk(ast.parse(inspect.getsource(EngineConfig))):
        if isinstance(node, ast.AnnAssign) and node.target.id in keys:
            call = node.value
            assert isinstance(call, ast.Call) and call.func.id == "_default", node.target.id
            assert [arg.value for arg in call.args] == [node.target.id]
            fields_seen.add(node.target.id)
    assert fields_seen == keys
    assert EngineConfig() == load_config(env={})


def test_precedence_file_then_lmcache_env_then_option_env_then_override(tmp_path):
    path = write(tmp_path, "chunk_size: 32\nmax_local_cpu_size: 1.0\nsave_unfull_chunk: false\n")
    env = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "2.5", "LMCACHE_SAVE_UNFULL_CHUNK": "TRUE",
           "OPTION_LMCACHE_SAVE_UNFULL_CHUNK": "0", "LMCACHE_CHUNK_SIZE": "64"}
    config = load_config(path=path, env=env, overrides={"chunk_size": 128})
    assert config.max_local_cpu_size == 2.5
    assert config.source_of("max_local_cpu_size") == "env LMCACHE_MAX_LOCAL_CPU_SIZE"
    assert config.save_unfull_chunk is False
    assert config.source_of("save_unfull_chunk") == "env OPTION_LMCACHE_SAVE_UNFULL_CHUNK"
    assert config.chunk_size == 128 and config.source_of("chunk_size") == "override"


def test_explicit_path_wins_over_file_named_in_env(tmp_path):
    path = write(tmp_path, "chunk_size: 512\n")
    config = load_config(path=path, env={"LMCACHE_CONFIG_FILE": str(SEED_CPU)})
    assert config.chunk_size == 512


def test_every_key_can_be_set_from_env():
    texts = {int: "32", float: "1.5", bool: "true", str: "x", dict: "{}"}
    for key in TABLE:
        if key.choices or key.check or key.type is dict:
            continue
        config = load_config(env={f"OPTION_LMCACHE_{key.name.upper()}": texts[key.type]})
        assert config.source_of(key.name) == f"env OPTION_LMCACHE_{key.name.upper()}"


@pytest.mark.parametrize("text,expected", [("True", True), ("false", False), ("1", True),
                                           ("0", False), ("FALSE", False)])
def test_env_bools_in_any_case(text, expected):
    assert load_config(env={"LMCACHE_SAVE_UNFULL_CHUNK": text}).save_unfull_chunk is expected


@pytest.mark.parametrize("text", ['{"use_odirect": true}', "{'use_odirect': True}"])
def test_extra_config_from_env_as_json_or_seed_style(text):
    env = {"OPTION_LMCACHE_EXTRA_CONFIG": text, "OPTION_LMCACHE_LOCAL_DISK": "/tmp/x",
           "OPTION_LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    assert load_config(env=env).use_odirect is True


def test_env_null_turns_a_tier_off(tmp_path):
    path = write(tmp_path, "local_disk: /tmp/c\nmax_local_disk_size: 1\n")
    config = load_config(path=path, env={"OPTION_LMCACHE_LOCAL_DISK": "null"})
    assert config.local_disk is None and config.disk_dir is None


def test_reserved_env_names_are_not_keys():
    config = load_config(env={"LMCACHE_LOG_LEVEL": "debug", "OPTION_LMCACHE_AUTO_CONFIG": "true"})
    assert isinstance(config, EngineConfig)


# What LMI's auto-config (djl_python/lmcache_utils.py, set_lmcache_env_vars) exports, exactly.
LMI_AUTO_EXPORTS = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "180", "LMCACHE_MAX_LOCAL_DISK_SIZE": "900",
                    "LMCACHE_LOCAL_DISK": "file:///tmp/cache/",
                    "LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR": "true",
                    "LMCACHE_EXTRA_CONFIG": '{"use_odirect": true}'}


def test_lmis_auto_config_exports_are_read_and_lmcache_only_keys_are_not_applicable():
    """Scenario: LMI's auto-config ran before vLLM; our workers read what it exported."""
    config = load_config(env=LMI_AUTO_EXPORTS)
    assert (config.max_local_cpu_size, config.max_local_disk_size) == (180.0, 900.0)
    assert config.disk_dir == "/tmp/cache" and config.use_odirect
    assert config.not_applicable == {
        "enable_lazy_memory_allocator": "env LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR"}
    assert "(not applicable: enable_lazy_memory_allocator  (env " \
        "LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR), an LMCache-only key: ignored)" in describe(config)


def test_lmcache_only_keys_in_a_file_are_not_applicable_either(tmp_path):
    path = write(tmp_path, "chunk_size: 256\nenable_lazy_memory_allocator: true\n"
                           "use_experimental: true\n")
    config = load_config(path=path, env={})
    assert set(config.not_applicable) == {"enable_lazy_memory_allocator", "use_experimental"}
    assert config == load_config(env={})  # they change nothing


def test_lmcache_builtin_hash_reads_as_sha256():
    config = load_config(env={}, overrides={"pre_caching_hash_algorithm": "builtin"})
    assert config.pre_caching_hash_algorithm == "sha256"


# ------------------------------------------------------------------ errors name the key


def test_unknown_key_suggests_the_right_one(tmp_path):
    message = only_problem(path=write(tmp_path, "chunk_sise: 256\n"), env={})
    assert "chunk_sise" in message and "did you mean 'chunk_size'" in message
    assert "lmcache_config.yaml" in message


def test_unknown_env_key_names_the_variable():
    message = only_problem(env={"OPTION_LMCACHE_MAX_LOCAL_CPU_SIZ": "1"})
    assert "OPTION_LMCACHE_MAX_LOCAL_CPU_SIZ" in message and "max_local_cpu_size" in message


@pytest.mark.parametrize("yaml_text,key,needle", [
    ("chunk_size: '256'\n", "chunk_size", "expected int, got str"),
    ("chunk_size: true\n", "chunk_size", "boolean"),
    ("chunk_size: 100\n", "chunk_size", "multiple of 16"),
    ("chunk_size: 0\n", "chunk_size", "multiple of 16"),
    ("max_local_cpu_size: -1\n", "max_local_cpu_size", "must be > 0"),
    ("max_local_cpu_size: 0\n", "max_local_cpu_size", "must be > 0"),
    ("local_cpu: 'yes'\n", "local_cpu", "expected bool"),
    ("remote_url: http://cache:6379\n", "remote_url", "redis://"),
    ("remote_serde: safetensor\n", "remote_serde", '"naive"'),
    ("local_disk: s3://bucket/x\nmax_local_disk_size: 1\n", "local_disk", "file:// URL"),
    ("extra_config: {use_odirekt: true}\n", "extra_config", "did you mean 'use_odirect'"),
    ("extra_config: {use_odirect: 'yes'}\n", "extra_config", "expected bool"),
    ("use_layerwise: true\n", "use_layerwise", "allowed: false"),
    ("pre_caching_hash_algorithm: md5\n", "pre_caching_hash_algorithm", "sha256"),
])
def test_bad_values_name_key_value_and_source(tmp_path, yaml_text, key, needle):
    path = write(tmp_path, yaml_text)
    message = only_problem(path=path, env={})
    assert message.startswith(f"{key}:"), message
    assert needle in message and f"file {path}" in message


def test_bad_env_value_names_the_variable():
    message = only_problem(env={"LMCACHE_CHUNK_SIZE": "big"})
    assert message.startswith("chunk_size:") and "env LMCACHE_CHUNK_SIZE" in message


def test_bad_env_bool_is_an_error():
    assert "expected a boolean" in only_problem(env={"LMCACHE_LOCAL_CPU": "maybe"})


def test_disk_tier_without_size_is_an_error(tmp_path):
    message = only_problem(path=write(tmp_path, "local_disk: /tmp/c\n"), env={})
    assert message.startswith("max_local_disk_size:") and "local_disk" in message


def test_odirect_without_disk_is_an_error():
    message = only_problem(env={"LMCACHE_EXTRA_CONFIG": '{"use_odirect": true}'})
    assert "use_odirect" in message and "local_disk" in message


def test_no_tier_at_all_is_an_error():
    assert "no tier" in only_problem(env={"LMCACHE_LOCAL_CPU": "false"})


def test_all_problems_are_reported_at_once(tmp_path):
    path = write(tmp_path, "chunk_size: 7\nmax_local_cpu_size: -2\nbogus: 1\n")
    assert len(problems_of(path=path, env={})) == 3


def test_missing_file_is_an_error_naming_it(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    message = only_problem(path=missing, env={})
    assert missing in message and "cannot be read" in message


def test_invalid_yaml_names_the_line(tmp_path):
    path = write(tmp_path, "chunk_size: 256\nlocal_disk: [unclosed\nmax_local_cpu_size: 1\n")
    message = only_problem(path=path, env={})
    assert "not valid YAML" in message and "line 3" in message


def test_yaml_that_is_not_a_mapping_is_an_error(tmp_path):
    assert "mapping" in only_problem(path=write(tmp_path, "- 1\n- 2\n"), env={})


def test_empty_file_means_defaults(tmp_path):
    assert load_config(path=write(tmp_path, ""), env={}) == EngineConfig()


# ------------------------------------------------------------------ stateful sessions


def test_sessions_are_on_by_default_with_djls_expiry():
    config = load_config(env={})
    assert config.enable_stateful_sessions is True
    assert config.sessions_expiration_s == 1200.0  # DJL's sessions_expiration default (20 min)


@pytest.mark.parametrize("text,expected", [("true", True), ("TRUE", True), ("False", False),
                                           (" false ", False)])
def test_lmis_session_options_set_the_keys_in_any_case(text, expected):
    config = load_config(env={"OPTION_ENABLE_STATEFUL_SESSIONS": text,
                              "OPTION_SESSIONS_EXPIRATION": "60"})
    assert config.enable_stateful_sessions is expected
    assert config.source_of("enable_stateful_sessions") == "env OPTION_ENABLE_STATEFUL_SESSIONS"
    assert config.sessions_expiration_s == 60.0


@pytest.mark.parametrize("text", ["1", "yes", "on", "enabled", ""])
def test_an_lmi_session_switch_other_than_true_or_false_is_an_error_naming_it(text):
    """LMI reads "1" as off; reading it as on would split the container in two."""
    with pytest.raises(ConfigError, match="OPTION_ENABLE_STATEFUL_SESSIONS.*true or false"):
        load_config(env={"OPTION_ENABLE_STATEFUL_SESSIONS": text})


def test_our_own_names_win_over_lmis_for_the_session_keys():
    config = load_config(env={"OPTION_SESSIONS_EXPIRATION": "60",
                              "OPTION_LMCACHE_SESSIONS_EXPIRATION_S": "90"})
    assert config.sessions_expiration_s == 90.0


@pytest.mark.parametrize("key,value", [("sessions_expiration_s", 0), ("session_pin_max_gib", 0),
                                       ("session_pins_max_fraction", 1.5),
                                       ("session_pins_max_fraction", -0.1)])
def test_session_budgets_out_of_range_are_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config(env={}, overrides={key: value})


def test_a_disk_budget_without_local_disk_is_an_error_naming_both_keys(tmp_path):
    message = only_problem(path=write(tmp_path, "max_local_disk_size: 5.0\n"), env={})
    assert message.startswith("max_local_disk_size:") and "local_disk" in message

"""The lmcache-ext command as a user runs it: a real process, real env vars, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import SEED_CPU, SEED_NVME


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if "LMCACHE" not in k}
    return subprocess.run([sys.executable, "-m", "lmcache_ext.cli", *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=60)


def test_config_show_prints_each_key_with_its_source():
    result = cli("config", "show", "--config", str(SEED_NVME))
    assert result.returncode == 0, result.stderr
    assert "max_local_disk_size = 5.0 GiB  (file " in result.stdout
    assert "local_cpu = true  (default)" in result.stdout
    assert "resolves to /tmp/cache" in result.stdout


def test_config_show_json_from_the_seed_env_vars():
    env = {"OPTION_LMCACHE_CONFIG_FILE": str(SEED_CPU),
           "OPTION_LMCACHE_CHUNK_SIZE": "512"}
    result = cli("config", "show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["config"]["chunk_size"] == 512
    assert shown["sources"]["chunk_size"] == "env OPTION_LMCACHE_CHUNK_SIZE"
    assert shown["config"]["max_local_cpu_size"] == 5.0


def test_config_check_passes_a_good_config():
    result = cli("config", "check", "--config", str(SEED_CPU))
    assert result.returncode == 0 and "config OK" in result.stdout


def test_config_check_accepts_lmis_lmcache_only_keys():
    """Scenario: the env LMI's auto-config leaves behind; it used to exit 2 ("unknown key")."""
    result = cli("config", "check", env={"LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR": "true"})
    assert result.returncode == 0, result.stderr
    assert "enable_lazy_memory_allocator (env LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR): an " \
        "LMCache-only key, not applicable" in result.stdout


def test_config_check_lists_every_problem_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 10\nlocal_disk: /tmp/x\n")
    result = cli("config", "check", "--config", str(bad), env={"LMCACHE_LOCAL_CPU": "perhaps"})
    assert result.returncode == 2
    for needle in ("chunk_size: 10", "max_local_disk_size", "env LMCACHE_LOCAL_CPU"):
        assert needle in result.stderr


def test_serve_with_a_bad_config_exits_2_before_loading_a_model(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_local_cpu_size: -1\n")
    result = cli("serve", "--config", str(bad))
    assert result.returncode == 2 and "max_local_cpu_size" in result.stderr


def test_config_check_reports_odirect_on_the_disk_directory(tmp_path):
    env = {"LMCACHE_LOCAL_DISK": str(tmp_path / "kv"), "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.01",
           "LMCACHE_EXTRA_CONFIG": '{"use_odirect": true}'}
    result = cli("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert "O_DIRECT works in" in result.stdout and "tiers cpu, disk" in result.stdout
    assert (tmp_path / "kv").is_dir()


def test_config_check_fails_on_a_disk_directory_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    env = {"LMCACHE_LOCAL_DISK": str(blocker / "kv"), "LMCACHE_MAX_LOCAL_DISK_SIZE": "1"}
    result = cli("config", "check", env=env)
    assert result.returncode == 2
    assert "local_disk" in result.stderr and "env LMCACHE_LOCAL_DISK" in result.stderr


def test_config_check_says_the_shared_store_is_unauthenticated_without_a_key():
    result = cli("config", "check", env={"LMCACHE_REMOTE_URL": "redis://cache:6379"})
    assert result.returncode == 0, result.stderr
    assert "WARNING: remote tier: UNAUTHENTICATED" in result.stdout


def test_config_check_says_keyed_and_checks_the_key_env_var():
    env = {"LMCACHE_REMOTE_URL": "redis://cache:6379", "LMCACHE_REMOTE_AUTH_KEY_ENV": "KV_KEY"}
    result = cli("config", "check", env={**env, "KV_KEY": "x" * 32})
    assert result.returncode == 0, result.stderr
    assert "remote tier: chunks keyed" in result.stdout and "UNAUTH" not in result.stdout
    unset = cli("config", "check", env=env)
    assert unset.returncode == 2 and "remote_auth_key_env: 'KV_KEY'" in unset.stderr
    short = cli("config", "check", env={**env, "KV_KEY": "tooshort-secret"})
    assert short.returncode == 2 and "at least 32" in short.stderr
    assert "tooshort-secret" not in short.stderr + short.stdout

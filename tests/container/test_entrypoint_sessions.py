"""The entrypoint and LMI's stateful sessions: ``OPTION_ENABLE_STATEFUL_SESSIONS=True`` (which
LMI reads as off) passed on as ``true``, and LMI pointed at lmcache-ext's handler wherever LMI
would run its vLLM service. Real process, real files; LMI is the recording stand-in."""

from __future__ import annotations

from pathlib import Path

from lmcache_ext.adapters.lmi.facts import LMI_VLLM_SERVICE
from tests.container.entry_helpers import SEED_KV, run_entrypoint
from tests.helpers import REPO

HANDLER = str(REPO / "handlers" / "lmcache_ext_vllm.py")
CACHE_ON = {"OPTION_KV_TRANSFER_CONFIG": SEED_KV, "LMI_HANDLER_FILE": HANDLER}


def model_dir(tmp_path: Path, properties: str = "", model_py: bool = False) -> dict[str, str]:
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "serving.properties").write_text(properties)
    if model_py:
        (folder / "model.py").write_text("def handle(inputs):\n    return None\n")
    return {"SM_MODEL_DIR": str(folder)}


def test_true_by_env_is_passed_on_as_true_and_lmis_vllm_service_becomes_our_handler(tmp_path):
    """Scenario: LMI's documented env for vLLM async mode, with sessions written as True."""
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ENABLE_STATEFUL_SESSIONS": "True",
                                    "OPTION_ASYNC_MODE": "true",
                                    "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_ENABLE_STATEFUL_SESSIONS"] == "true"
    assert run.env["OPTION_ENTRYPOINT"] == HANDLER
    assert "OPTION_ENABLE_STATEFUL_SESSIONS=True: LMI reads only 'true' as on" in run.log
    assert "enable_stateful_sessions = true  (env OPTION_ENABLE_STATEFUL_SESSIONS)" in run.log


def test_async_mode_without_an_entry_point_gets_our_handler_unless_a_model_py_is_there(
        tmp_path):
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ASYNC_MODE": "true",
                                    **model_dir(tmp_path)})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_ENTRYPOINT"] == HANDLER
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ASYNC_MODE": "true",
                                    **model_dir(tmp_path, model_py=True)})
    assert "OPTION_ENTRYPOINT" not in run.env  # LMI runs the model.py: the user's choice
    assert "sessions: no entry point and option.async_mode is not true (or a model.py" in run.log


def test_an_entry_point_in_serving_properties_wins_so_we_say_what_to_write(tmp_path):
    properties = f"option.entryPoint={LMI_VLLM_SERVICE}\noption.async_mode=true\n"
    run = run_entrypoint(tmp_path, {**CACHE_ON, **model_dir(tmp_path, properties),
                                    "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_ENTRYPOINT"] == LMI_VLLM_SERVICE  # the file wins in LMI anyway
    assert f"write option.entryPoint={HANDLER}" in run.log
    properties = f"option.entryPoint={HANDLER}\n"
    run = run_entrypoint(tmp_path, {**CACHE_ON, **model_dir(tmp_path, properties)})
    assert "is lmcache-ext's LMI handler: sessions pin their conversation" in run.log


def test_true_in_serving_properties_is_a_warning_the_handler_covers(tmp_path):
    properties = "option.enable_stateful_sessions=True\n"
    run = run_entrypoint(tmp_path, {**CACHE_ON, **model_dir(tmp_path, properties),
                                    "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE})
    assert run.returncode == 0, run.log
    assert "option.enable_stateful_sessions=True: LMI reads only 'true' as on; lmcache-ext's " \
        "LMI handler passes 'true' on" in run.log
    assert run.env["OPTION_ENTRYPOINT"] == HANDLER


def test_the_users_own_entry_point_and_sessions_off_are_left_alone(tmp_path):
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ENTRYPOINT": "/opt/ml/model/mine.py"})
    assert run.env["OPTION_ENTRYPOINT"] == "/opt/ml/model/mine.py"
    assert "is your own entry point: sessions pin nothing" in run.log
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ENABLE_STATEFUL_SESSIONS": "false",
                                    "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE})
    assert run.env["OPTION_ENTRYPOINT"] == LMI_VLLM_SERVICE
    assert "sessions: env OPTION_ENABLE_STATEFUL_SESSIONS is off" in run.log


def test_with_the_cache_off_the_pitfall_is_said_and_nothing_changes(tmp_path):
    run = run_entrypoint(tmp_path, {"OPTION_ENABLE_STATEFUL_SESSIONS": "True",
                                    "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE})
    assert run.returncode == 0, run.log
    assert run.env["OPTION_ENABLE_STATEFUL_SESSIONS"] == "True"
    assert run.env["OPTION_ENTRYPOINT"] == LMI_VLLM_SERVICE
    assert "LMI reads only 'true' as on and runs without stateful sessions: write true" in run.log


def test_a_missing_handler_file_stops_the_container_naming_its_variable(tmp_path):
    run = run_entrypoint(tmp_path, {**CACHE_ON, "OPTION_ENTRYPOINT": LMI_VLLM_SERVICE,
                                    "LMI_HANDLER_FILE": str(tmp_path / "gone.py")})
    assert run.returncode == 2
    assert run.record is None
    assert f"LMI_HANDLER_FILE={tmp_path / 'gone.py'}: lmcache-ext's LMI handler is not " \
        "there" in run.log


def test_the_image_holds_the_handler_where_the_entrypoint_looks_for_it():
    from lmcache_ext.container.lmi_sessions import DEFAULT_HANDLER, HANDLER_ENV
    dockerfile = (REPO / "Dockerfile").read_text()
    folder = str(Path(DEFAULT_HANDLER).parent)
    assert f"COPY handlers/ {folder}/" in dockerfile
    assert f"{HANDLER_ENV}={DEFAULT_HANDLER}" in dockerfile
    assert (REPO / "handlers" / Path(DEFAULT_HANDLER).name).is_file()


def test_vllms_workers_get_the_drain_time_when_sessions_have_a_shared_tier(tmp_path):
    """vLLM waits VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS (default 5) for its workers on shutdown;
    a worker drains its sessions for up to drain_timeout_s: the entrypoint sets the first to
    cover the second, keeps a user's value (saying when it is shorter), and leaves it alone
    without a shared tier (nothing to drain to)."""
    shared = {**CACHE_ON, "OPTION_LMCACHE_REMOTE_URL": "redis://127.0.0.1:6390",
              "OPTION_LMCACHE_DRAIN_TIMEOUT_S": "12.5"}
    run = run_entrypoint(tmp_path, shared)
    assert run.returncode == 0, run.log
    assert run.env["VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"] == "13"
    assert "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS=13: vLLM's workers get drain_timeout_s" in run.log
    run = run_entrypoint(tmp_path, {**shared, "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "5"})
    assert run.env["VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"] == "5"
    assert "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS=5 is shorter than drain_timeout_s=12.5" in run.log
    run = run_entrypoint(tmp_path, CACHE_ON)
    assert "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS" not in run.env

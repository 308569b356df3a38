"""LMI's settings read as LMI reads them: serving.properties over env, the model directory, the
model, the TP degree and the config file's path."""

from __future__ import annotations

import pytest

from lmcache_ext.container.lmi_settings import (
    SettingsError,
    parse_properties,
    read_settings,
)


def settings_with(tmp_path, properties: str | None, **env: str):
    if properties is not None:
        (tmp_path / "serving.properties").write_text(properties)
    return read_settings({"SM_MODEL_DIR": str(tmp_path), **env})


def test_properties_format():
    text = "# comment\n! also\n\nengine=Python\noption.a = 1\noption.b: two words\n" \
           "option.c=x\\\n  y\n"
    assert parse_properties(text, "f") == {"engine": ("Python", 4), "option.a": ("1", 5),
                                           "option.b": ("two words", 6), "option.c": ("xy", 7)}


def test_a_line_without_a_key_names_the_file_and_line():
    with pytest.raises(SettingsError, match="f line 2"):
        parse_properties("option.a=1\njust words\n", "f")


def test_serving_properties_win_over_option_env(tmp_path):
    settings = settings_with(tmp_path, "option.kv_transfer_config=from-file\n",
                             OPTION_KV_TRANSFER_CONFIG="from-env", OPTION_MODEL_ID="org/m")
    option = settings.get("kv_transfer_config")
    assert option.value == "from-file"
    assert option.source == f"{tmp_path}/serving.properties line 1 option.kv_transfer_config"
    assert settings.get("model_id").source == "env OPTION_MODEL_ID"


def test_the_config_file_resolves_against_the_model_directory(tmp_path):
    settings = settings_with(tmp_path, None, OPTION_LMCACHE_CONFIG_FILE="conf/lmcache.yaml")
    assert settings.config_file().value == str(tmp_path / "conf" / "lmcache.yaml")
    absolute = settings_with(tmp_path, None, OPTION_LMCACHE_CONFIG_FILE="/etc/l.yaml")
    assert absolute.config_file().value == "/etc/l.yaml"


def test_a_local_hf_model_id_is_the_model_directory(tmp_path):
    model = tmp_path / "downloaded"
    model.mkdir()
    (model / "serving.properties").write_text("option.lmcache_config_file=c.yaml\n")
    settings = read_settings({"HF_MODEL_ID": str(model), "SM_MODEL_DIR": str(tmp_path / "x")})
    assert settings.model_dir == str(model)
    assert settings.config_file().value == str(model / "c.yaml")
    assert settings.model_id == (str(model), "env HF_MODEL_ID")


@pytest.mark.parametrize("env, expected", [
    ({"OPTION_TENSOR_PARALLEL_DEGREE": "4", "TENSOR_PARALLEL_DEGREE": "2"},
     (4, "env OPTION_TENSOR_PARALLEL_DEGREE=4")),
    ({"OPTION_TENSOR_PARALLEL_DEGREE": "max", "TENSOR_PARALLEL_DEGREE": "2"},
     (2, "env TENSOR_PARALLEL_DEGREE=2")),
    ({"SM_NUM_GPUS": "8"}, (8, "env SM_NUM_GPUS=8")),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, (3, "CUDA_VISIBLE_DEVICES=0,1,2")),
])
def test_tensor_parallel_degree_as_lmi_reads_it(tmp_path, env, expected):
    assert settings_with(tmp_path, None, **env).tp_degree() == expected

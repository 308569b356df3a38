"""LMI's settings, read the way LMI reads them before it starts vLLM.

- The model directory: ``HF_MODEL_ID`` when it is a local directory, else ``/opt/ml/model``
  (``SM_MODEL_DIR`` moves it, for tests).
- ``option.*``: ``serving.properties`` in the model directory, then ``OPTION_<NAME>`` env vars
  for the names it lacks (LMI's ``putIfAbsent``: the file wins). ``OPTION_KV_TRANSFER_CONFIG``
  is ``option.kv_transfer_config``.
- The model: ``option.model_id``, else ``HF_MODEL_ID``, else the model directory.
- Tensor-parallel degree: ``option.tensor_parallel_degree``, else ``TENSOR_PARALLEL_DEGREE``;
  ``max`` or unset: ``SM_NUM_GPUS``, else the visible GPUs.
- ``option.lmcache_config_file``: absolute, or relative to the model directory.
Pure but for reading serving.properties; raises ``SettingsError`` naming the file and line.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MODEL_DIR = "/opt/ml/model"
PROPERTIES_FILE = "serving.properties"
OPTION_PREFIX = "option."
ENV_PREFIX = "OPTION_"


class SettingsError(ValueError):
    """serving.properties cannot be read; the text names the file and line."""


@dataclass(frozen=True)
class Option:
    """One ``option.<name>`` value and where it came from, for messages."""

    value: str
    source: str  # "env OPTION_X" or "/opt/ml/model/serving.properties option.x"


@dataclass(frozen=True)
class LmiSettings:
    model_dir: str
    options: Mapping[str, Option]  # by name without "option."
    env: Mapping[str, str]

    def get(self, name: str) -> Option | None:
        return self.options.get(name)

    @property
    def model_id(self) -> tuple[str, str]:
        """(model id or path, where it came from)."""
        if (option := self.get("model_id")) is not None and option.value.strip():
            return option.value.strip(), option.source
        if self.env.get("HF_MODEL_ID", "").strip():
            return self.env["HF_MODEL_ID"].strip(), "env HF_MODEL_ID"
        return self.model_dir, "the model directory"

    def tp_degree(self) -> tuple[int, str]:
        """(tensor-parallel workers, how we know). LMI's default degree is every GPU."""
        option = self.get("tensor_parallel_degree")
        named = [(option.value, option.source)] if option else []
        named.append((self.env.get("TENSOR_PARALLEL_DEGREE", ""), "env TENSOR_PARALLEL_DEGREE"))
        named.append((self.env.get("SM_NUM_GPUS", ""), "env SM_NUM_GPUS"))
        for text, source in named:
            if text.strip().isdigit() and int(text) > 0:
                return int(text), f"{source}={text.strip()}"
        visible = self.env.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible:
            return len(visible.split(",")), f"CUDA_VISIBLE_DEVICES={visible}"
        gpus = len(glob.glob("/proc/driver/nvidia/gpus/*"))
        if gpus:
            return gpus, f"{gpus} GPUs in /proc/driver/nvidia/gpus"
        return 1, "no GPU found: 1 worker"

    def config_file(self) -> Option | None:
        """``option.lmcache_config_file`` made absolute against the model directory."""
        option = self.get("lmcache_config_file")
        if option is None or not option.value.strip():
            return None
        path = os.path.join(self.model_dir, option.value.strip())  # an absolute one stays
        return Option(os.path.normpath(path), option.source)


def model_dir(env: Mapping[str, str]) -> str:
    local = env.get("HF_MODEL_ID", "").strip()
    if local and os.path.isdir(local):
        return os.path.abspath(local)
    return env.get("SM_MODEL_DIR", DEFAULT_MODEL_DIR)


def parse_properties(text: str, path: str) -> dict[str, tuple[str, int]]:
    """Java-style properties: ``key=value`` or ``key: value``, ``#``/``!`` comments, a trailing
    backslash continues the line. Returns {key: (value, line number)}."""
    found: dict[str, tuple[str, int]] = {}
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip() if not pending else raw.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        start = start or number
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        line, pending = pending + line, ""
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut <= 0:
            raise SettingsError(f"{path} line {start}: {line!r} is not key=value")
        found[line[:cut].strip()] = (line[cut + 1:].strip(), start)
        start = 0
    return found


def read_settings(env: Mapping[str, str]) -> LmiSettings:
    directory = model_dir(env)
    path = os.path.join(directory, PROPERTIES_FILE)
    options: dict[str, Option] = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise SettingsError(f"{path} cannot be read: {exc.strerror}") from exc
        for key, (value, line) in parse_properties(text, path).items():
            if key.startswith(OPTION_PREFIX):
                options[key[len(OPTION_PREFIX):]] = Option(value, f"{path} line {line} {key}")
    for var, value in env.items():
        if var.startswith(ENV_PREFIX):
            options.setdefault(var[len(ENV_PREFIX):].lower(), Option(value, f"env {var}"))
    return LmiSettings(directory, options, dict(env))

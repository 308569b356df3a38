"""LMI's module loading (djl_python/service_loader.py at the commit the package doc names):
``ModelService`` sets the ``model_dir`` property and calls the module's function (lines 23-35);
``load_model_service`` loads an absolute path or a ``.py`` in the model directory as a file,
anything else as a module, and raises ValueError for a missing file (lines 38-86)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from typing import Any


class ModelService:
    def __init__(self, module: Any, model_dir: str):
        self.module = module
        self.model_dir = model_dir

    async def invoke_handler_async(self, function_name: str, inputs: Any) -> Any:
        inputs.properties["model_dir"] = self.model_dir
        return await getattr(self.module, function_name)(inputs)


def load_model_service(model_dir: str, entry_point: str, device_id: Any) -> ModelService:
    if not (os.path.isabs(entry_point) or entry_point.endswith(".py")):
        return ModelService(importlib.import_module(entry_point), model_dir)
    path = entry_point if os.path.isabs(entry_point) else os.path.join(model_dir, entry_point)
    if not os.path.exists(path):
        raise ValueError(f"entry-point file not found {path}.")
    name = f"model_{hashlib.md5(path.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return ModelService(module, model_dir)


def has_function_in_module(module: Any, function_name: str) -> bool:
    return callable(getattr(module, function_name, None))

"""LMI's custom handler (djl_python/custom_handler_service.py at the commit the package doc
names, lines 31-59): at the first request LMI's vLLM service loads ``model.py`` from the model
directory (the ``model_dir`` property); where it has ``handle``, every request goes to it first,
and LMI serves the request itself only when it answers None. A ``handle`` that raises is an
in-band 424."""

from __future__ import annotations

import logging
from typing import Any

from djl_python.async_utils import create_non_stream_output
from djl_python.service_loader import has_function_in_module, load_model_service


class CustomHandlerService:
    def __init__(self, properties: dict):
        self.custom_handler = None
        self.initialized = False
        try:
            service = load_model_service(properties.get("model_dir", "."), "model.py", -1)
        except Exception as exc:  # LMI: no model.py, or one that fails to load
            logging.debug("No custom handler found in model.py: %s", exc)
            return
        if has_function_in_module(service.module, "handle"):
            self.custom_handler = service
            self.initialized = True

    async def handle(self, inputs: Any) -> Any:
        if self.custom_handler is None:
            return None
        try:
            return await self.custom_handler.invoke_handler_async("handle", inputs)
        except Exception as exc:
            logging.exception("Custom handler failed")
            return create_non_stream_output("", error=f"Custom handler failed: {exc}", code=424)

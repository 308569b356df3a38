"""lmcache-ext's LMI handler: LMI's vLLM service, with SageMaker sessions pinned in the KV cache.

DJL loads this file as the model's entry point: the image copies it to
``/opt/lmcache-ext/handlers/lmcache_ext_vllm.py`` and the container's entrypoint sets
``OPTION_ENTRYPOINT`` to that path when lmcache-ext's cache and LMI's stateful sessions are on and
LMI would run its vLLM service (``option.entryPoint=djl_python.lmi_vllm.vllm_async_service``,
``option.async_mode=true``). What it does is in ``lmcache_ext.adapters.lmi.handler``.

``option.entryPoint`` is the supported route. Copied into a model directory as ``model.py``
instead, LMI 0.36's vLLM service calls it from inside its own ``handle``; the handler then steps
aside on the inner call (it answers None) rather than calling itself.
"""

from djl_python.lmi_vllm import vllm_async_service as _lmi

from lmcache_ext.adapters.lmi.handler import SessionHandler, lmi_exports

_handler = SessionHandler(_lmi.handle, _lmi.service)
handle = _handler.handle
globals().update(lmi_exports(_lmi))

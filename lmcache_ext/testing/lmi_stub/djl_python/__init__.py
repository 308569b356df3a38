"""A stand-in for the part of LMI's ``djl_python`` that a custom handler sees, for tests only
(``lmcache_ext.testing.lmi_process`` puts its folder on ``sys.path``; production imports LMI's).

Modelled on djl-serving 0.36's source: ``Input`` (properties: the model's options at load, the
request's headers after; content: the body under ``data``), ``Output``, the file-backed
``SessionManager`` (uuid ids, ``sessions_expiration``, cleaned on create) and
``lmi_vllm.vllm_async_service`` (``service``, ``handle``; ``NEW_SESSION``/``CLOSE`` bodies; the
``enable_stateful_sessions == "true"`` check; payloads as ``vLLM`` ``CompletionRequest``s, so a
request's ``kv_transfer_params`` reach the engine as they do in LMI). What LMI does beyond what a
handler sees (its Java front end, formatters, LoRA, chat templates) is not here.
"""

from djl_python.inputs import Input
from djl_python.outputs import Output

__all__ = ["Input", "Output"]

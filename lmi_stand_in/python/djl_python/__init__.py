"""A stand-in for the part of LMI's ``djl_python`` that a custom handler sees, for tests only
(``lmi_stand_in.process`` puts its folder on ``sys.path``; production imports LMI's).

Modelled on djl-serving's source at commit 7e13b081383bd46293d4b49ab214d4757b1effd5 (branch
``0.36.0-lmi27-dlc``, LMI lmi27), paths under ``engines/python/setup/djl_python/``; each module
names the real file and lines it mirrors. Written for this project (read, not copied). What it
models:

- ``Input()`` takes no arguments; requests arrive through ``Input.read`` in DJL's socket format
  (``inputs.py``); ``lmi_stand_in.frontend`` is the Java side (the custom-attribute
  split, the encoder and decoder);
- ``Output`` holds bytes; in async mode every answer is ``Output.binary_encode({"data", "last",
  "code", "error"})`` made by ``async_utils.create_non_stream_output``, and errors are in-band
  (a 424 inside a 200 ``Output``) (``outputs.py``, ``async_utils.py``);
- the session manager: ``get_session`` raises for an unknown id and answers None for an expired
  one; it builds a boto3 CloudWatch client, which fails without a region (``session_manager.py``,
  ``aws/cloud_watch.py``); CLOSE answers ``X-Amzn-SageMaker-Closed-Session-Id``
  (``session_utils.py``);
- ``lmi_vllm.vllm_async_service.handle`` tries the model directory's ``model.py``
  (``CustomHandlerService``) first, then its ``VLLMHandler`` over a real vLLM engine.

What LMI does beyond what a handler sees (formatters, LoRA, chat, streaming) is not here.
"""

from djl_python.inputs import Input
from djl_python.outputs import Output

__all__ = ["Input", "Output"]

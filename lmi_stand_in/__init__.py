"""A stand-in of SageMaker LMI (lmi27) for tests, never shipped: not in the wheel (pyproject
packages lmcache_ext only) nor in the product image.

- ``python/djl_python``: LMI's Python side as a handler sees it, modelled on lmi27's source
  (djl-serving 0.36.0-lmi27-dlc), each behaviour naming the real file and lines; ``python/`` is
  what LMI puts on ``PYTHONPATH`` (``/opt/djl/python``).
- ``frontend``: DJL's Java side (the custom-attribute split, the socket encoding, async mode's
  binary answers).
- ``process``: a handler over a real vLLM engine in a process of its own, driven one invocation
  at a time (the LMI engine tests).
- ``server``: the HTTP model server in DJL's place in the stand-in base image
  (``container/lmi_stand_in/``).
"""

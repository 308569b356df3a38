"""vLLM's KV connector (``connector.LMCacheExtConnector``): the scheduler side (``scheduler``) and
the worker side (``worker`` composing ``worker_pins``, ``worker_loads``, ``worker_saves``,
``worker_kv``) in separate files, as they run in separate processes; ``channel`` between them.
Imports nothing at package level: ``takeover`` is read by processes without vLLM."""

"""Sizing: how much KV a model makes per token, what an instance holds, and which tier a context
needs (``advisor``), over a table of SageMaker instances (``instances``). Plain arithmetic, no
I/O beyond reading a model's ``config.json``; used by ``lmcache-ext advise`` and by the container's
auto-config at start.
"""

"""The container layer: the entrypoint that runs before LMI's (``entrypoint``) and tier sizing at
start (``autoconfig``, using the arithmetic in ``lmcache_ext.sizing``). The image's shell pieces
and example configs live in the top-level ``container/``.
"""

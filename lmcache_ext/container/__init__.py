"""The container layer: the entrypoint that runs before LMI's (``entrypoint``), tier sizing at
start (``autoconfig``) and the sizing advisor behind ``lmcache-ext advise`` (``advisor``,
``instances``). The image's shell pieces and example configs live in the top-level ``container/``.
"""

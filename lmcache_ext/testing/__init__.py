"""Real servers and models for tests and benchmarks, in the package so that ``tests/``,
``benchmarks/`` and ``sagemaker_tests/`` all import them from one place.

- ``redis_server``: real ``redis-server`` processes (standalone, cluster, TLS) on loopback ports.
- ``tiny_model``: a tiny random-weight Llama and a byte tokenizer, saved to a folder (no download).
- ``session_replica``: a small HTTP server speaking the session protocol without a model (router
  and client tests across many replicas).

Each module imports its own optional dependencies (redis-py; transformers): import the one you
need, this package itself imports nothing.
"""

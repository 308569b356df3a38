"""Adapters: the only modules that know a serving engine. Import a submodule directly (e.g.
``lmcache_ext.adapters.vllm.connector``); nothing here imports a serving engine eagerly."""

"""The module path users' ``kv_connector_module_path`` names (kept importable): the connector
lives in ``lmcache_ext.adapters.vllm.connector``."""
from lmcache_ext.adapters.vllm.connector import LMCacheExtConnector  # noqa: F401

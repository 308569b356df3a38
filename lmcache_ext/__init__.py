"""lmcache-ext: KV-cache offloading (CPU RAM, local NVMe, Redis/Valkey) for LLM serving."""

__version__ = "0.1.0"

"""LMI's handler (``handler``): LMI's vLLM service with SageMaker sessions' pins and lookups
answered from the workers' caches (``lookup``); ``facts``: what LMI reads and how. Imports
nothing at package level."""

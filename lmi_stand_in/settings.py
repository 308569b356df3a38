"""LMI's settings as the product reads them (serving.properties, then ``OPTION_*``), for the
stand-in's server. In the stand-in base image, which holds nothing of lmcache_ext, the Dockerfile
puts a copy of ``lmcache_ext/container/lmi_settings.py`` here instead."""
from lmcache_ext.container.lmi_settings import read_settings  # noqa: F401

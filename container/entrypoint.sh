#!/bin/sh
# The image's ENTRYPOINT: all logic lives in the package (lmcache_ext/container/entrypoint.py),
# which checks the OPTION_* env vars and then execs LMI's /usr/local/bin/dockerd-entrypoint.sh
# with these same arguments. LMI_PYTHON names LMI's interpreter if it is not python3.
exec "${LMI_PYTHON:-python3}" -m lmcache_ext.container.entrypoint "$@"

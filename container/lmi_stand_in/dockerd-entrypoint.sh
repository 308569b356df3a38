#!/bin/sh
# The stand-in's /usr/local/bin/dockerd-entrypoint.sh, shaped as LMI's (djl-serving
# serving/docker/dockerd-entrypoint.sh: `serve` runs /usr/bin/djl-serving with the other
# arguments, again while it exits 77; anything else is eval'ed). Here `serve` starts the model
# server (lmi_stand_in.server) once, and anything else is exec'ed; no restart loop
# and no Neo/partition modes.
if [ "$1" = "serve" ]; then
    shift
    exec python3 -m lmi_stand_in.server "$@"
fi
exec "$@"

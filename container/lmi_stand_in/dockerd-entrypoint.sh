#!/bin/sh
# The stand-in's /usr/local/bin/dockerd-entrypoint.sh, shaped as LMI's: `serve` starts the model
# server (DJL Serving in LMI, lmi_standin.testing.lmi_server here); anything else is run as a command.
if [ "$1" = "serve" ]; then
    shift
    exec python3 -m lmi_standin.testing.lmi_server "$@"
fi
exec "$@"

#!/usr/bin/env bash
# Install the system programs that the tests and benchmarks start, when they are missing.
#
# Usage: scripts/setup_system.sh        (called by `make setup`; idempotent, instant when all present)
#
# Each program is checked by name; the missing ones are installed with apt-get when running as
# root. Otherwise (not root, or no apt-get) it prints the packages and the command to run, and
# exits 1: a newcomer learns what is missing here, not from a failing test later.
set -euo pipefail

# program -> Debian package that provides it
declare -A PACKAGE_OF=(
    [redis-server]=redis-server   # the shared tier's tests start real servers (and a cluster)
    [redis-cli]=redis-tools       # the Redis Cluster test creates its cluster with it
    [fio]=fio                     # the disk benchmark's yardstick
    [openssl]=openssl             # the TLS test makes its own certificate
    [gcc]=gcc                     # scripts/cuda_stubs.py builds the torch 2.11 venv's stubs
    [readelf]=binutils            # ... from torch's own symbol tables
    [dockerd]=docker.io           # the image tests build and run the image (tests/image)
    [debootstrap]=debootstrap     # ... on a stand-in LMI base built from Debian
)

missing=()
for program in "${!PACKAGE_OF[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$program]}")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
command="apt-get update && apt-get install -y ${missing[*]}"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing system packages: ${missing[*]}" >&2
    echo "install them (as root, on Debian/Ubuntu): $command" >&2
    exit 1
fi
echo "installing system packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

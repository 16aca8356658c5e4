#!/usr/bin/env bash
# One-time set-up of a Debian 12 machine (as root): the system packages lazyctl and its test
# suite use, then a release build of lazyctl. Safe to run again.
#
#   scripts/setup.sh                   packages, the Python venv, the build
#   scripts/setup.sh --packages-only   packages and the venv only (packaging/docker/Dockerfile.test
#                                      runs this while building the test image: no /dev/fuse,
#                                      no source tree to build yet)
set -euo pipefail
cd "$(dirname "$0")/.."
packages_only=false
case "${1:-}" in
    "") ;;
    --packages-only) packages_only=true ;;
    *)
        echo "usage: scripts/setup.sh [--packages-only]" >&2
        exit 2
        ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages with apt-get)" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# fuse3: fusermount3 and /etc/fuse.conf; umoci/skopeo/debootstrap: build and move real images;
# docker-registry: a real OCI registry for tests; attr: getfattr/setfattr for checks; bindfs: a
# stand-in FUSE filesystem the test harness checks its own mount guard with; python3-venv: the
# virtualenv below (moto, the model loaders); crun and runc: the OCI runtimes `lazyctl run` starts
# containers with (both tested); iproute2: tc, which the benchmarks shape their link with;
# golang-github-containers-common: the default seccomp profile `lazyctl run` applies;
# faketime: libfaketime, which moves lazyd's wall clock in the fault tests (tests/tests/faults.rs);
# e2fsprogs: mkfs.ext4 for the cache disk those tests turn read-only; containerd (containerd,
# ctr, containerd-shim-runc-v2) and stargz-snapshotter (ctr-remote, whose `image rpull` pulls
# with the labels a remote snapshotter reads): the containerd tests (tests/tests/containerd.rs)
# and bench/containerd.sh run a private containerd with lazy-snapshotter as its proxy plugin;
# protobuf-compiler: protoc, which lazy-snapshotter's build compiles containerd's snapshots API
# with, and libprotobuf-dev: the well-known types it imports (google/protobuf/empty.proto...),
# only a recommendation of protobuf-compiler; nginx (1.22, with the slice and auth_request
# modules): the fleet cache tier of packaging/tier/, which bench/tier.sh measures; binutils
# (objcopy), dpkg-dev (dpkg-shlibdeps) and help2man: scripts/package.sh.
apt-get install -y -qq --no-install-recommends \
    fuse3 umoci skopeo debootstrap docker-registry attr bindfs ca-certificates \
    curl gcc pkg-config tar gzip zstd python3 python3-venv crun runc iproute2 faketime \
    e2fsprogs golang-github-containers-common containerd stargz-snapshotter \
    protobuf-compiler libprotobuf-dev nginx binutils dpkg-dev help2man >/dev/null
# docker.io: the packaging tests (scripts/test-packaging.sh) and scripts/docker-test.sh, on the
# host (the test image, which --packages-only makes, needs no Docker engine of its own).
if ! $packages_only; then
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
fi

# A virtualenv at /opt/lazy-venv, so pip never touches the system Python, with moto[server]: a
# real S3 API for the S3 tests (lazy_tests::s3 runs its moto_server), and safetensors, numpy and
# ml_dtypes (numpy's bfloat16): the model loaders of bench/model_loaders.py, which
# tests/tests/model_loaders.rs and bench/models.sh run. Checked by import, so a venv made before
# any of them was added gets it.
if ! /opt/lazy-venv/bin/python3 -c 'import moto.server, safetensors, numpy, ml_dtypes' 2>/dev/null; then
    [ -x /opt/lazy-venv/bin/python3 ] || python3 -m venv /opt/lazy-venv
    /opt/lazy-venv/bin/pip install --quiet 'moto[server]' safetensors numpy ml_dtypes
fi
# crun (1.8 in Debian 12) refuses every container on a hybrid cgroup host (v1 controllers, v2
# at /sys/fs/cgroup/unified) while a controller is still bound to v2, as hugetlb is on some VMs:
# bind such controllers to v1 instead (runc copes either way). Nothing to do on pure v1 or v2.
# (cgroupfs files report a size of 0, so the controllers are read, not tested with -s.)
unified=$(cat /sys/fs/cgroup/unified/cgroup.controllers 2>/dev/null || true)
if [ -n "$unified" ] && [ -d /sys/fs/cgroup/cpu ]; then
    for controller in $unified; do
        if ! mountpoint -q "/sys/fs/cgroup/$controller"; then
            mkdir -p "/sys/fs/cgroup/$controller"
            mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller" ||
                echo "setup.sh: cannot bind cgroup controller $controller to v1; crun may refuse to run (runc works)" >&2
        fi
    done
fi

# Likewise crun fails on a v1 hierarchy the kernel has and this process belongs to (listed in
# /proc/self/cgroup) that is not mounted under /sys/fs/cgroup ("creating cgroup directory
# /sys/fs/cgroup/perf_event/...: No such file or directory"), as on VMs whose init mounted only
# some: mount those.
if [ -d /sys/fs/cgroup/cpu ]; then
    while IFS=: read -r id controllers _; do
        case $id:$controllers in 0:* | *:name=* | *:) continue ;; esac
        if ! mountpoint -q "/sys/fs/cgroup/$controllers"; then
            mkdir -p "/sys/fs/cgroup/$controllers"
            mount -t cgroup -o "$controllers" cgroup "/sys/fs/cgroup/$controllers" ||
                echo "setup.sh: cannot mount cgroup hierarchy $controllers; crun may refuse to run (runc works)" >&2
        fi
    done </proc/self/cgroup
fi

if $packages_only; then
    echo "setup done: packages only"
    exit 0
fi

if ! command -v cargo >/dev/null; then
    echo "setup.sh: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi
if [ ! -e /dev/fuse ]; then
    modprobe fuse 2>/dev/null || true
fi
[ -e /dev/fuse ] || { echo "setup.sh: /dev/fuse is missing; load the fuse module" >&2; exit 1; }

cargo build --release --workspace --bins
echo "setup done: $(pwd)/target/release/lazyctl"

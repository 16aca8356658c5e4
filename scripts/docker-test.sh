#!/usr/bin/env bash
# Runs the integration suite inside a privileged Docker container, for a machine where you
# would rather not install the test packages (scripts/setup.sh) on the host. It builds the test
# image (packaging/docker/Dockerfile.test: Rust, fuse3, umoci, skopeo, debootstrap,
# docker-registry, crun, runc, moto, ...), mounts this checkout at /src and runs
# scripts/test.sh there, or the command given:
#
#   scripts/docker-test.sh                                        # the whole suite
#   FUZZ_SECONDS=0 scripts/docker-test.sh                         # without the fuzz run
#   scripts/docker-test.sh cargo test -p lazy-tests --test agent  # one tier or test
#
# Needs Docker (BuildKit), a host kernel with FUSE (/dev/fuse) and overlayfs, and network access
# for the image build, the crates and the Debian fixtures. The container runs as root with
# --privileged: the suite mounts FUSE filesystems and overlays, chroots, runs debootstrap and
# starts containers with crun and runc, which is what this privilege is for.
#
# This is a second way to run the same suite, not the one CI uses: CI (.ci/run) runs
# scripts/setup.sh and scripts/test.sh natively on a fresh Debian 12 machine. This script and
# its image were written on a machine without a Docker engine and have not been run there.
#
# Files it leaves: target/docker (the container's build, as root) and the fixtures in
# target/lazy-fixtures (shared with native runs: the same images, built once); a docker volume
# lazyimg-test-cargo caches downloaded crates between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${LAZY_TEST_IMAGE:-lazyimg-test:latest}
command -v docker >/dev/null || {
    echo "docker-test.sh: docker is not installed (or use scripts/setup.sh and scripts/test.sh natively)" >&2
    exit 1
}
[ -e /dev/fuse ] || {
    echo "docker-test.sh: the host has no /dev/fuse; load the fuse module (modprobe fuse)" >&2
    exit 1
}

docker build -f packaging/docker/Dockerfile.test -t "$IMAGE" .

mkdir -p target/docker target/lazy-fixtures
if [ $# -eq 0 ]; then
    set -- scripts/test.sh
fi
# --privileged --device /dev/fuse: FUSE and overlay mounts, chroot, nested containers.
# --init: reaps the processes the tests orphan (mount helpers, killed agents).
# -v /tmp: an anonymous volume (a host directory, removed with the container) rather than
#   the container's overlayfs root: overlayfs cannot be the upper layer of the tests'
#   containers' overlays, and the tests unpack images of hundreds of MB there.
# LAZY_FIXTURES_DIR: the Debian fixtures a native run built are reused (and vice versa).
exec docker run --rm --init --privileged --device /dev/fuse \
    -v "$PWD":/src -w /src \
    -v /tmp \
    -v lazyimg-test-cargo:/usr/local/cargo/registry \
    -e CARGO_TARGET_DIR=/src/target/docker \
    -e LAZY_FIXTURES_DIR=/src/target/lazy-fixtures \
    -e FUZZ_SECONDS="${FUZZ_SECONDS:-60}" \
    "$IMAGE" "$@"

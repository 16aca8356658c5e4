#!/usr/bin/env bash
# Runs the integration suite, or some of it, inside a privileged Docker container: the test
# image (packaging/docker/Dockerfile.test: Debian 12 with every package scripts/setup.sh
# installs) with this checkout and the host's Rust toolchain mounted at their own paths, so
# that the container reuses what the host built and builds only what it has not.
#
#   scripts/docker-test.sh                              the whole suite (scripts/test.sh)
#   FUZZ_SECONDS=0 scripts/docker-test.sh               without the fuzz run
#   scripts/docker-test.sh cargo test --features lazy-tests/system-tests -p lazy-tests --test agent
#
# Privilege: `docker run --privileged` where the host allows it; where it does not (a host whose
# capability bounding set lacks one docker's --privileged asks for, as CAP_SYS_RESOURCE on some
# VMs), every capability the host has, no seccomp or AppArmor profile, /dev/fuse and, on a
# cgroup v1 host, the host's cgroup tree. It says which it used.
#
# Needs, as root: a Docker engine (started here if installed and not running), /dev/fuse, the
# Rust toolchain (rustup) on the host, and Debian's mirror (the base image is made with
# debootstrap where no registry is reachable: scripts/docker-base.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/packaging/common.sh
source tests/packaging/common.sh
IMAGE=${LAZY_TEST_IMAGE:-lazyimg-test:latest}
command -v docker >/dev/null || fail "docker is not installed (apt-get install docker.io; or run scripts/test.sh natively)"
[ -e /dev/fuse ] || fail "the host has no /dev/fuse; load the fuse module (modprobe fuse)"
command -v cargo >/dev/null || fail "the host's Rust toolchain is mounted into the container: install it with rustup"

ensure_dockerd
base=$(scripts/docker-base.sh)
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp scripts/setup.sh packaging/docker/test-entrypoint.sh "$context/"
cp /etc/ssl/certs/ca-certificates.crt "$context/host-ca-certificates.crt"
echo "docker-test.sh: building $IMAGE" >&2
docker build -q --build-arg BASE="$base" -f packaging/docker/Dockerfile.test -t "$IMAGE" "$context" >/dev/null
choose_privilege "$IMAGE"

if [ $# -eq 0 ]; then
    set -- scripts/test.sh
fi
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
cargo_home=${CARGO_HOME:-$HOME/.cargo}
env=(-e "RUSTUP_HOME=$rustup_home" -e "CARGO_HOME=$cargo_home"
    -e "PATH=$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    -e "FUZZ_SECONDS=${FUZZ_SECONDS:-60}" -e CARGO_INCREMENTAL -e RUST_BACKTRACE
    # The packaging tier needs a Docker engine; it runs on the host (scripts/test-packaging.sh).
    -e PACKAGING_TESTS=0)
# --init: reaps the processes the tests orphan (mount helpers, killed agents).
# The checkout, the toolchain (read-only) and cargo's home (its registry) at their host paths.
# -v /tmp: an anonymous volume (a host directory, removed with the container) rather than the
#   container's overlayfs root: overlayfs cannot be the upper layer of the tests' containers'
#   overlays, and the tests unpack images of hundreds of MB there.
mounts=(-v "$PWD:$PWD" -w "$PWD" -v "$rustup_home:$rustup_home:ro" -v "$cargo_home:$cargo_home" -v /tmp)
for var in CARGO_TARGET_DIR LAZY_FIXTURES_DIR; do
    # A target or fixture directory set on the host is used there too, and mounted when it lies
    # outside the checkout.
    if [ -n "${!var:-}" ]; then
        dir=$(realpath -m "${!var}")
        env+=(-e "$var=$dir")
        mkdir -p "$dir"
        case $dir in "$PWD" | "$PWD"/*) ;; *) mounts+=(-v "$dir:$dir") ;; esac
    fi
done
echo "docker-test.sh: running $* in $IMAGE" >&2
exec docker run --rm --init "${PRIVILEGE_FLAGS[@]}" "${NESTING_FLAGS[@]}" "${mounts[@]}" "${env[@]}" \
    "$IMAGE" "$@"

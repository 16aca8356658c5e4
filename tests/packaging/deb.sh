#!/usr/bin/env bash
# The Debian package on a clean Debian 12 booting systemd (a container): installs it, checks
# what it installed and that it started nothing, starts lazyd with systemctl, mounts an image
# and compares it with the reference tree, restarts lazyd under the mount, runs a container,
# purges, and checks that nothing is left. The steps inside are deb-in-container.sh.
#
#   tests/packaging/deb.sh target/dist/lazyimg_VERSION_ARCH.deb
#
# As root, with dockerd running. scripts/test-packaging.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/packaging/common.sh
source tests/packaging/common.sh
deb=$(realpath "${1:?usage: tests/packaging/deb.sh PACKAGE.deb}")

ensure_dockerd
base=$(scripts/docker-base.sh)
docker build -q --build-arg BASE="$base" -t lazyimg-test-systemd - <tests/packaging/Dockerfile.systemd >/dev/null
choose_privilege "$base"

work=$(mktemp -d /tmp/lazyimg-deb.XXXXXX)
name=lazyimg-deb-$$
cleanup() {
    docker rm -fv "$name" >/dev/null 2>&1 || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# The image to mount and run: the base image itself, as `docker save` writes it, and its one
# layer unpacked as the reference tree.
mkdir "$work/pkg" "$work/ref"
cp "$deb" "$work/pkg/"
save_with_reference "$base" "$work/pkg/base.tar" "$work/ref"

# systemd in a container: its own /run (the cgroup tree writable, NESTING_FLAGS: crun and
# systemd make cgroups), /var and /tmp on volumes rather than the container's overlayfs
# (overlay upper directories, which lazyd makes under /var/lib/lazyd, cannot be on overlayfs).
docker run -d --name "$name" "${PRIVILEGE_FLAGS[@]}" "${NESTING_FLAGS[@]}" --tmpfs /run --tmpfs /run/lock \
    -v /var -v /tmp \
    -v "$work/pkg:/pkg:ro" -v "$work/ref:/ref:ro" \
    -v "$PWD/tests/packaging:/tests:ro" \
    lazyimg-test-systemd >/dev/null
for _ in $(seq 100); do
    state=$(docker exec "$name" systemctl is-system-running 2>/dev/null || true)
    case $state in running | degraded) break ;; esac
    sleep 0.2
done
case $state in running | degraded) ;; *) fail "systemd did not boot in the container (state: ${state:-none})" ;; esac

docker exec "$name" /tests/deb-in-container.sh "/pkg/$(basename "$deb")"
echo "deb.sh: passed"

#!/usr/bin/env bash
# The runtime image (scripts/docker-image.sh) run as packaging/docker/Dockerfile documents:
# lazyd in the container, lazyctl on the host through the bound socket, a mount made in the
# container seen on the host through the rshared bind and compared with the reference tree, a
# container run by the host's runtime on the image's propagated root, and `docker stop`
# unmounting everything.
#
#   tests/packaging/runtime-image.sh IMAGE LAZYCTL
#
# IMAGE: lazyimg/lazyd:VERSION; LAZYCTL: the host's lazyctl (target/dist/bin/lazyctl). As root,
# with dockerd running and crun or runc on the host. scripts/test-packaging.sh runs it.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/packaging/common.sh
source tests/packaging/common.sh
image=${1:?usage: tests/packaging/runtime-image.sh IMAGE LAZYCTL}
lazyctl=$(realpath "${2:?usage: tests/packaging/runtime-image.sh IMAGE LAZYCTL}")
ensure_dockerd
choose_privilege "$image"

# Every path lazyd uses lives under one directory, made a shared mount (as / is under systemd)
# so that the rshared binds propagate the container's mounts back here. The paths are the same
# inside and out, as the Dockerfile's run line has them.
dir=$(mktemp -d /tmp/lazyimg-image.XXXXXX)
name=lazyimg-runtime-$$
cleanup() {
    docker rm -fv "$name" >/dev/null 2>&1 || true
    umount -R -l "$dir" 2>/dev/null || true
    rm -rf --one-file-system "$dir"
}
trap cleanup EXIT
mount --bind "$dir" "$dir"
mount --make-rshared "$dir"
mkdir "$dir/run" "$dir/state" "$dir/cache" "$dir/store" "$dir/mnt" "$dir/ref"
cat >"$dir/config.toml" <<CONFIG
socket = "$dir/run/lazyd.sock"
state_dir = "$dir/state"
cache_dir = "$dir/cache"
CONFIG
socket=$dir/run/lazyd.sock

# The image to mount and run: the base image, converted on the host into a store the
# container reads; its one layer unpacked is the reference.
base=$(scripts/docker-base.sh)
save_with_reference "$base" "$dir/base.tar" "$dir/ref"
"$lazyctl" convert "docker-archive:$dir/base.tar" "dir:$dir/store:base" >/dev/null 2>&1 ||
    fail "lazyctl convert on the host"

echo "--- run the image"
docker run -d --name "$name" "${PRIVILEGE_FLAGS[@]}" --network host \
    -v "$dir/run:$dir/run" \
    -v "$dir/state:$dir/state:rshared" \
    -v "$dir/cache:$dir/cache" \
    -v "$dir/store:$dir/store:ro" \
    -v "$dir/mnt:$dir/mnt:rshared" \
    -v "$dir/config.toml:/etc/lazyd/config.toml:ro" \
    --stop-timeout 60 "$image" >/dev/null
for _ in $(seq 100); do
    "$lazyctl" --socket "$socket" status >/dev/null 2>&1 && break
    sleep 0.1
done
check "lazyctl on the host reaches lazyd in the container" "$lazyctl" --socket "$socket" status

echo "--- mount, seen on the host"
mkdir "$dir/mnt/base"
check "lazyctl mount" "$lazyctl" --socket "$socket" mount "dir:$dir/store:base" "$dir/mnt/base"
check "the mount is on the host" mountpoint -q "$dir/mnt/base"
same_tree "$dir/ref" "$dir/mnt/base"
check "lazyctl umount" "$lazyctl" --socket "$socket" umount "$dir/mnt/base"

echo "--- a container run by the host's runtime"
check_run "$dir/ref" "$lazyctl" --socket "$socket" run "dir:$dir/store:base"

echo "--- docker stop"
check "docker stop" docker stop "$name" >/dev/null
check "lazyd exited 0" test "$(docker inspect -f '{{.State.ExitCode}}' "$name")" = 0
check "no mount is left on the host" sh -c "! grep -q ' $dir/[^ ]' /proc/self/mountinfo"
echo "runtime-image.sh: passed"

#!/usr/bin/env bash
# Makes the base image of lazyimg's container images, lazyimg/debian:bookworm (packaging/docker/
# Dockerfile and Dockerfile.test build FROM it), unless docker has it already:
#
# - from Docker Hub's debian:bookworm-slim where Docker Hub is reachable;
# - else with debootstrap (--variant=minbase, from deb.debian.org) and `docker import`: no
#   registry needed, only Debian's mirror.
#
#   scripts/docker-base.sh            make it if missing
#   scripts/docker-base.sh --rebuild  make it again (a fresh Debian point release)
#
# As root (debootstrap). Prints the image's name.
set -euo pipefail
IMAGE=lazyimg/debian:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
case "${1:-}" in
    "") docker image inspect "$IMAGE" >/dev/null 2>&1 && { echo "$IMAGE"; exit 0; } ;;
    --rebuild) ;;
    *)
        echo "usage: scripts/docker-base.sh [--rebuild]" >&2
        exit 2
        ;;
esac

if docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    docker tag debian:bookworm-slim "$IMAGE"
    echo "docker-base.sh: $IMAGE is Docker Hub's debian:bookworm-slim" >&2
    echo "$IMAGE"
    exit 0
fi

echo "docker-base.sh: Docker Hub is not reachable; making $IMAGE with debootstrap from $MIRROR" >&2
command -v debootstrap >/dev/null || { echo "docker-base.sh: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
rootfs=$(mktemp -d)
# debootstrap mounts /proc and /sys inside the target: never leave them, nor delete through them.
unmount() {
    for m in proc sys; do
        umount -l "$rootfs/$m" 2>/dev/null || true
    done
}
trap 'unmount; rm -rf --one-file-system "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >&2
unmount
# What debian:bookworm-slim has: the updates and security suites, no package lists or caches.
cat >"$rootfs/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb ${MIRROR%/debian}/debian-security bookworm-security main
SOURCES
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
tar --numeric-owner --xattrs -C "$rootfs" -c . |
    docker import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --message "debootstrap --variant=minbase bookworm $MIRROR" - "$IMAGE" >/dev/null
echo "$IMAGE"

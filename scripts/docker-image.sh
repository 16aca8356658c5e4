#!/usr/bin/env bash
# Builds the runtime image lazyimg/lazyd:VERSION (and :latest): the Debian package installed on
# the base image (scripts/docker-base.sh). packaging/docker/Dockerfile has the `docker run`
# line and why each of its flags.
#
#   scripts/docker-image.sh [PACKAGE.deb]    default: target/dist/lazyimg_VERSION_ARCH.deb
#                                            (scripts/package.sh makes it)
#
# Prints the image's name.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
deb=${1:-${CARGO_TARGET_DIR:-target}/dist/lazyimg_${version}_$(dpkg --print-architecture).deb}
[ -f "$deb" ] || { echo "docker-image.sh: $deb is missing; make it with scripts/package.sh" >&2; exit 1; }

base=$(scripts/docker-base.sh)
# The build context is the package alone.
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$deb" "$context/"
docker build -q --build-arg BASE="$base" -f packaging/docker/Dockerfile \
    -t "lazyimg/lazyd:$version" -t lazyimg/lazyd:latest "$context" >/dev/null
echo "lazyimg/lazyd:$version"

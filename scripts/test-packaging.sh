#!/usr/bin/env bash
# The packaging tier of the suite (scripts/test.sh runs it last; as root):
#
# 1. scripts/package.sh: the release binaries stripped, their debug info split off, the .debs;
# 2. tests/packaging/deb.sh: the package installed on a clean Debian 12 booting systemd (a
#    container), lazyd started with systemctl, an image mounted and compared with its reference
#    tree, lazyd restarted under the mount, a container run, the package purged to nothing;
# 3. tests/packaging/runtime-image.sh: the runtime image built from the package and run as its
#    Dockerfile documents, lazyctl on the host, the mounts propagated to the host;
# 4. scripts/docker-test.sh: the agent, run and model end-to-end tests again, inside the
#    privileged test container (the whole suite there takes as long as the native run).
#
# Needs docker.io (scripts/setup.sh installs it; dockerd is started if it does not run).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tests/packaging/common.sh
source tests/packaging/common.sh
ensure_dockerd

scripts/package.sh
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
dist=${CARGO_TARGET_DIR:-target}/dist
deb=$dist/lazyimg_${version}_$(dpkg --print-architecture).deb

echo "=== the Debian package on a clean Debian 12 with systemd"
tests/packaging/deb.sh "$deb"
echo "=== the runtime image"
image=$(scripts/docker-image.sh "$deb")
tests/packaging/runtime-image.sh "$image" "$dist/bin/lazyctl"
echo "=== end-to-end tests in the privileged test container"
# As scripts/test.sh builds the tests (--workspace, the same features): nothing is rebuilt.
scripts/docker-test.sh cargo test --workspace --features agent/system-tests,tools/system-tests,lazy-tests/system-tests \
    --test agent --test run --test model -- --test-threads=2

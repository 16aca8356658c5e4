#!/usr/bin/env bash
# The whole test suite (as root: the end-to-end tests mount FUSE filesystems, chroot into them
# and run umoci/debootstrap). Tiers, all run here:
#   unit + property tests        cargo test (every crate), with the system-tests feature
#   end-to-end tests             tests/tests/*.rs (real mounts, real images, reference unpacks)
#   lint                         cargo fmt --check, cargo clippy -D warnings
#   fuzz (brief)                 scripts/fuzz.sh FUZZ_SECONDS (default 60; 0 skips): index_open for that long, the other targets briefly
#   packaging                    scripts/test-packaging.sh (PACKAGING_TESTS=0 skips): the .deb on a clean
#                                Debian 12 with systemd, the runtime image, and the agent, run and model
#                                end-to-end tests again inside the privileged test container
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "test.sh: run as root (end-to-end tests mount FUSE filesystems)" >&2
    exit 1
fi

# The suite needs about 15 GB of disk (the build, cached fixtures, a 4 GiB file unpacked by
# umoci); a run that ends with "No space left on device" shows the figure here.
echo "test.sh: disk free at start: $(df -h --output=avail . | tail -1)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# system-tests: the unit tests that need root, the local servers or system tools run too. The
# binaries are built with the same features, so the test build reuses them.
features=agent/system-tests,tools/system-tests,lazy-tests/system-tests
# The end-to-end tests run the lazyctl and lazyd binaries of this build.
cargo build --workspace --bins --features "$features"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --features "$features" -- --test-threads=2 2>&1 | tee "$log"

if [ "${PACKAGING_TESTS:-1}" != 0 ]; then
    scripts/test-packaging.sh 2>&1 | tee -a "$log"
fi

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
if [ "$FUZZ_SECONDS" -gt 0 ]; then
    scripts/fuzz.sh "$FUZZ_SECONDS"
fi

# One closing line over every cargo test binary (the fuzz run above ends the output otherwise).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;/) p += $i; if ($(i+1) ~ /^failed;/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
echo "test.sh: disk free at end: $(df -h --output=avail . | tail -1)"

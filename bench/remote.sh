#!/usr/bin/env bash
# Shaped-link benchmark of lazy fetching from a registry (see docs/BENCHMARKS.md):
#
#   docker-registry on 127.0.0.1:$REG_PORT; its replies are rate-limited to $RATE by tc htb on
#   lo, and a delaying TCP proxy (tests/examples/bench_tools.rs) adds $DELAY_MS ms to every
#   request. Every client below talks to the proxy, on an empty cache.
#
#   image: Debian bookworm minbase + a layer of $APP_FILES x $APP_FILE_MIB MiB incompressible
#          files under /opt/app (a stand-in for the libraries and data big images carry).
#   A. full pull:  skopeo copy + umoci unpack, then chroot ROOTFS $START_CMD
#   B. lazy start: lazyctl mount (manifest + index) then chroot MNT $START_CMD
#   C. download of the whole lazy image (skopeo copy of its blobs): what B avoids
#   D. cold sequential read of /opt/app through the mount vs. the link rate (curl of one blob)
#
# Usage (as root, from the repository root):  sudo bench/remote.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, RUNS=3
set -euo pipefail

BENCH_NAME=remote.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
APP_FILES=8
APP_FILE_MIB=64
START_CMD='cat /etc/os-release >/dev/null; ls /usr/bin >/dev/null; dpkg -l >/dev/null; echo ok'
require_tools cargo skopeo umoci docker-registry tc curl python3 chroot

W=$BENCH_DIR/remote
rm -rf "$W/run"
mkdir -p "$W/run" "$W/inputs"
RUN=$W/run

log "building lazyctl and the bench tools (release)"
cargo build --release -q -p tools --bin lazyctl
cargo build --release -q -p lazy-tests --example bench_tools
TARGET=${CARGO_TARGET_DIR:-target}
LAZYCTL=$(realpath "$TARGET/release/lazyctl")
TOOLS=$(realpath "$TARGET/release/examples/bench_tools")

PIDS=()
cleanup() {
    set +e
    for m in "$RUN"/mnt*; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    tc qdisc del dev lo root 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT

# --- the image --------------------------------------------------------------------------------
LAYOUT=$W/inputs/layout
if [[ ! -f $W/inputs/COMPLETE ]]; then
    log "building the benchmark image"
    rm -rf "$W/inputs/"*
    read -r DEB_LAYOUT DEB_TAG < <("$TOOLS" debian-layout)
    cp -a "$DEB_LAYOUT" "$LAYOUT"
    umoci unpack --image "$LAYOUT:$DEB_TAG" "$W/inputs/bundle" >/dev/null
    mkdir -p "$W/inputs/bundle/rootfs/opt/app"
    for i in $(seq 1 $APP_FILES); do
        head -c $((APP_FILE_MIB << 20)) /dev/urandom >"$W/inputs/bundle/rootfs/opt/app/lib$i.so"
    done
    umoci repack --image "$LAYOUT:app" "$W/inputs/bundle" >/dev/null
    rm -rf "$W/inputs/bundle"
    touch "$W/inputs/COMPLETE"
fi

# --- registry, image push, conversion (unshaped) ----------------------------------------------
start_registry "$RUN/registry"
log "pushing the image to $REG and converting it"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$LAYOUT:app" "docker://$REG/bench/app:v1"
"$LAZYCTL" convert --no-progress "docker://$REG/bench/app:v1" "docker://$REG/bench/app:v1-lazy" >"$RUN/convert.log"

# --- the shaped link --------------------------------------------------------------------------
shape_link "$TOOLS"

# --- helpers ----------------------------------------------------------------------------------

mount_lazy() { # mount_lazy IMAGE MNT CACHE METRICS: starts a lazy mount, waits for it
    mkdir -p "$2"
    "$LAZYCTL" mount --standalone --cache-dir "$3" --metrics-json "$4" "$1" "$2" 2>>"$RUN/mount.log" &
    MOUNT_PID=$!
    for _ in $(seq 600); do
        mountpoint -q "$2" && return 0
        kill -0 $MOUNT_PID 2>/dev/null || die "lazyctl mount $1 failed: $(tail -5 "$RUN/mount.log")"
        sleep 0.01
    done
    die "mount of $1 timed out"
}
umount_lazy() { # umount_lazy MNT: unmounts and waits for the mount to write its metrics
    "$LAZYCTL" umount "$1"
    wait "$MOUNT_PID"
}
served() { python3 -c "import json; print(json.load(open('$1'))['bytes_served'])"; }
fetched() { python3 -c "import json,sys; m=json.load(open('$1')); print(sum(b['$2'] for b in m['backends']))"; }

# D's reference: the link's own rate for one big blob (curl through the proxy).
BIG_BLOB=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/app:v1-lazy" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(max(m["layers"][1:], key=lambda d: d["size"])["digest"])')
t0=$(now)
BLOB_BYTES=$(curl -s -o /dev/null -w '%{size_download}' "http://$LINK/v2/bench/app/blobs/$BIG_BLOB")
LINK_SECS=$(elapsed "$t0")
LINK_RATE=$(calc "$BLOB_BYTES / $LINK_SECS / 1e6:.1f")
log "curl of one $BLOB_BYTES-byte blob: $LINK_SECS s = $LINK_RATE MB/s"

A=() B=() C=() D=()
B_FETCHED=() B_REQS=() B_SERVED=() D_FETCHED=()
for run in $(seq "$RUNS"); do
    log "run $run/$RUNS: A. full pull + unpack + start"
    rm -rf "$RUN/pull" "$RUN/bundle"
    drop_caches
    t0=$(now)
    skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$LINK/bench/app:v1" "oci:$RUN/pull:app"
    umoci unpack --image "$RUN/pull:app" "$RUN/bundle" >/dev/null
    [[ $(chroot "$RUN/bundle/rootfs" /bin/sh -c "$START_CMD") == ok ]] || die "full-pull start failed"
    A+=("$(elapsed "$t0")")
    rm -rf "$RUN/pull" "$RUN/bundle"

    log "run $run/$RUNS: B. lazy mount + start"
    rm -rf "$RUN/cache-b"
    drop_caches
    t0=$(now)
    mount_lazy "$LINK/bench/app:v1" "$RUN/mnt-b" "$RUN/cache-b" "$RUN/metrics-b.json"
    [[ $(chroot "$RUN/mnt-b" /bin/sh -c "$START_CMD") == ok ]] || die "lazy start failed"
    B+=("$(elapsed "$t0")")
    umount_lazy "$RUN/mnt-b"
    B_FETCHED+=("$(fetched "$RUN/metrics-b.json" bytes)")
    B_REQS+=("$(fetched "$RUN/metrics-b.json" requests)")
    B_SERVED+=("$(served "$RUN/metrics-b.json")")

    log "run $run/$RUNS: C. download of the whole lazy image"
    rm -rf "$RUN/lazy-copy"
    t0=$(now)
    skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$LINK/bench/app:v1-lazy" "oci:$RUN/lazy-copy:x"
    C+=("$(elapsed "$t0")")
    LAZY_BYTES=$(du -sb "$RUN/lazy-copy/blobs" | cut -f1)
    rm -rf "$RUN/lazy-copy"

    log "run $run/$RUNS: D. cold sequential read of /opt/app"
    rm -rf "$RUN/cache-d"
    mount_lazy "$LINK/bench/app:v1-lazy" "$RUN/mnt-d" "$RUN/cache-d" "$RUN/metrics-d.json"
    drop_caches
    t0=$(now)
    cat "$RUN"/mnt-d/opt/app/lib*.so >/dev/null
    D+=("$(elapsed "$t0")")
    umount_lazy "$RUN/mnt-d"
    D_FETCHED+=("$(fetched "$RUN/metrics-d.json" bytes)")
done

READ_BYTES=$((APP_FILES * APP_FILE_MIB << 20))
mA=$(median "${A[@]}")
mB=$(median "${B[@]}")
mC=$(median "${C[@]}")
mD=$(median "${D[@]}")
mBF=$(median "${B_FETCHED[@]}")
SEQ=$(calc "$READ_BYTES / $mD / 1e6:.1f")
IMAGE_RAW=$(grep -o 'of file data -> [0-9.]* MiB' "$RUN/convert.log" | head -1 || true)

cat <<EOF | tee "$W/results.md"
Shaped-link benchmark (bench/remote.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')
link: registry replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs
image: Debian bookworm minbase + $APP_FILES x $APP_FILE_MIB MiB incompressible files; lazy image $LAZY_BYTES bytes of blobs ($IMAGE_RAW)
start command: chroot ROOT /bin/sh -c '$START_CMD'

| measure | time (s) | bytes over the link |
|---|---|---|
| A. full pull: skopeo copy + umoci unpack + start | $mA | whole image |
| B. lazy: mount + start, cold cache | $mB | $mBF ($(calc "100 * $mBF / $LAZY_BYTES:.1f") % of the lazy image) in $(median "${B_REQS[@]}") requests, for $(median "${B_SERVED[@]}") bytes read through the mount |
| C. download of the whole lazy image (skopeo copy) | $mC | $LAZY_BYTES |
| D. cold sequential read of $READ_BYTES bytes through the mount | $mD | $(median "${D_FETCHED[@]}") |

- lazy start vs full pull: $(calc "$mA / $mB:.1f")x sooner; vs downloading the lazy image: $(calc "$mC / $mB:.1f")x
- cold sequential read through the mount: $SEQ MB/s = $(calc "100 * $READ_BYTES / $mD / $RATE_BYTES:.0f") % of the nominal $RATE, $(calc "100 * $READ_BYTES / $mD / 1e6 / $LINK_RATE:.0f") % of one curl download over the same link ($LINK_RATE MB/s)
- runs: A ${A[*]} | B ${B[*]} | C ${C[*]} | D ${D[*]}
EOF

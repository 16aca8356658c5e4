#!/usr/bin/env bash
# Benchmarks for lazyctl, in one run (see docs/BENCHMARKS.md for what each number means):
#   1. conversion throughput of a ~1 GiB rootfs-like tree (path:DIR, OCI tar layer, OCI gzip layer)
#   2. mount time of a 100,000-file image
#   3. sequential read of a 1 GiB file through a mount vs. natively, cold and warm page cache
#
# Usage (as root, from the repository root):  sudo bench/run.sh
# Environment:
#   BENCH_DIR=/var/tmp/lazy-bench   work directory (inputs are kept there and reused; ~5 GiB)
#   BENCH_FRESH=1                   regenerate the inputs even if a previous run left them
# Prints a markdown block for docs/BENCHMARKS.md and writes it to $BENCH_DIR/results.md.
set -euo pipefail

BENCH_DIR=${BENCH_DIR:-/var/tmp/lazy-bench}
BENCH_FRESH=${BENCH_FRESH:-0}

TREE_BUDGET=$((1 << 30)) # bytes of regular-file data in the rootfs-like tree
BIG_SIZE=$((1 << 30))    # the file read in benchmark 3
SMALL_FILES=100000
SMALL_DIRS=1000
RUNS=3       # conversions and reads: median of 3
MOUNT_RUNS=5 # mounts: median and max of 5
WARM_READS=3 # warm re-reads per mount (so 9 per measure): memory-bound, noisy under load
INPUTS_VERSION=1

die() {
    echo "bench/run.sh: $*" >&2
    exit 1
}
log() { echo "[bench $(date +%T)] $*" >&2; }

[[ -f Cargo.toml && -f tools/Cargo.toml && -f bench/helpers.py ]] ||
    die "run me from the repository root (sudo bench/run.sh)"
[[ $(id -u) == 0 ]] || die "run me as root: FUSE mounts, umount and drop_caches need it"
case $BENCH_DIR in
/*) ;;
*) die "BENCH_DIR must be an absolute path" ;;
esac
[[ $BENCH_DIR != *[[:space:]]* ]] || die "BENCH_DIR must not contain whitespace"
for tool in cargo python3 tar gzip dd findmnt; do
    command -v "$tool" >/dev/null ||
        die "$tool is not in PATH (under sudo, root's PATH may lack ~/.cargo/bin: sudo env PATH=\"\$PATH\" bench/run.sh)"
done

REPO=$(pwd)
HELPERS=(python3 "$REPO/bench/helpers.py")
INPUTS=$BENCH_DIR/inputs
STORES=$BENCH_DIR/stores
MNTS=$BENCH_DIR/mnt
LOGS=$BENCH_DIR/logs
mkdir -p "$INPUTS" "$STORES" "$MNTS" "$LOGS"
rm -f "$LOGS"/*

# ---------------------------------------------------------------------------------------------
# Helpers

SCRIPT_START=$(date +%s.%N)
CLK_TCK=$(getconf CLK_TCK)
NPROC=$(nproc)
# Each phase reports how much CPU other processes took while it ran (the machine is shared):
# the machine's busy + stolen CPU-seconds from /proc/stat, minus this script's children's
# (`times`; they include every lazyctl, dd and helper it ran and waited for).
cpu_snapshot() { # sets MACHINE_CPU and OWN_CPU; no subshell, `times` must see this shell
    MACHINE_CPU=$(awk -v hz="$CLK_TCK" '/^cpu /{printf "%.2f", ($2+$3+$4+$7+$8+$9)/hz}' /proc/stat)
    times >"$BENCH_DIR/.times"
    OWN_CPU=$(awk 'NR==2 {split($1, u, /[ms]/); split($2, s, /[ms]/);
        printf "%.2f", u[1]*60 + u[2] + s[1]*60 + s[2]}' "$BENCH_DIR/.times")
}
PHASES=()
DISTURBED=()
PHASE_NAME=""
phase() { # phase NAME: ends the current phase, starts NAME ("" ends only)
    local now=$(date +%s.%N) start_machine=${MACHINE_CPU:-0} start_own=${OWN_CPU:-0}
    cpu_snapshot
    if [[ -n $PHASE_NAME ]]; then
        local line
        line=$(awk -v n="$PHASE_NAME" -v a="$PHASE_START" -v b="$now" -v cores="$NPROC" \
            -v m1="$MACHINE_CPU" -v m0="$start_machine" -v o1="$OWN_CPU" -v o0="$start_own" \
            'BEGIN { w = b - a; other = (m1 - m0) - (o1 - o0); if (other < 0) other = 0;
                     share = w > 0 ? 100 * other / (w * cores) : 0;
                     printf "%.0f %s: %.0f s; other processes used %.0f of %.0f CPU-s", share, n, w,
                            other, w * cores }')
        PHASES+=("${line#* }")
        # More than a tenth of the machine taken by others while measuring: say so.
        if [[ $PHASE_NAME =~ ^(convert|mount-time|read)$ ]] &&
            ((${line%% *} > 10)); then
            DISTURBED+=("$PHASE_NAME (${line%% *} % of the CPU)")
        fi
    fi
    PHASE_NAME=$1
    PHASE_START=$now
    [[ -z $1 ]] || log "== $1 (load $(cut -d' ' -f1-3 /proc/loadavg))"
}

is_mounted() { grep -qF " $1 " /proc/self/mountinfo; }

MOUNT_PIDS=()
cleanup() {
    local m pid
    for m in "$MNTS"/*; do
        [[ -d $m ]] || continue
        if is_mounted "$m"; then
            "$LAZYCTL" umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
        fi
    done
    for pid in "${MOUNT_PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
}
LAZYCTL=/bin/false
trap cleanup EXIT
trap 'exit 130' INT TERM

# mount_bg IMAGE MNT LOG: starts a foreground `lazyctl mount` in the background, waits for it.
mount_bg() {
    local image=$1 mnt=$2 logf=$3 i
    RUST_LOG=info,fuser::mnt=error NO_COLOR=1 "$LAZYCTL" mount --standalone "$image" "$mnt" 2>>"$logf" &
    MOUNT_PID=$!
    MOUNT_PIDS+=("$MOUNT_PID")
    for ((i = 0; i < 3000; i++)); do
        is_mounted "$mnt" && return 0
        kill -0 "$MOUNT_PID" 2>/dev/null || die "lazyctl mount $image failed; see $logf"
        sleep 0.01
    done
    die "$mnt not mounted after 30 s; see $logf"
}
umount_wait() {
    "$LAZYCTL" umount "$1"
    wait "$MOUNT_PID" || die "lazyctl mount exited with status $? after umount"
}

# timeit LOG CMD...: prints "wall_s user_s sys_s" of CMD.
timeit() {
    local logf=$1
    shift
    "${HELPERS[@]}" timeit "$logf" -- "$@"
}

# Page-cache eviction. drop_caches when the kernel lets us; otherwise per-file
# posix_fadvise(DONTNEED) through `dd iflag=nocache count=0` on the files given.
DROP_METHOD=""
drop_cache() {
    sync
    if [[ $DROP_METHOD != fadvise ]] && (echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
        DROP_METHOD=drop_caches
    else
        DROP_METHOD=fadvise
        find "$@" -type f -exec dd iflag=nocache count=0 status=none if={} \;
    fi
}

# run_read "VAR..." CMD...: runs CMD (stopping the script if it fails) and reads its one line of
# output into the VARs (globals).
run_read() {
    local names=$1 out
    shift
    out=$("$@") || die "failed: $*"
    # shellcheck disable=SC2086
    read -r $names <<<"$out"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
maxof() { printf '%s\n' "$@" | sort -g | tail -1; }
calc() { awk "BEGIN{printf \"$1\", $2}"; }
mbps() { calc "%.0f" "$1 / 1e6 / $2"; } # mbps BYTES SECONDS
met() { if awk "BEGIN{exit !($1)}"; then echo met; else echo "**missed**"; fi; }

# ---------------------------------------------------------------------------------------------
phase "build"
log "cargo build --release -p tools"
if ! cargo build --release -p tools >"$LOGS/build.log" 2>&1; then
    tail -30 "$LOGS/build.log" >&2
    die "cargo build --release -p tools failed; see $LOGS/build.log"
fi
tail -1 "$LOGS/build.log" >&2
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
LAZYCTL=$TARGET_DIR/release/lazyctl
[[ -x $LAZYCTL ]] || die "$LAZYCTL was not built"

# ---------------------------------------------------------------------------------------------
phase "machine"
UPTIME_START=$(uptime)
CPU_MODEL=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
KERNEL=$(uname -r)
FS_INFO=$(findmnt -no SOURCE,FSTYPE -T "$BENCH_DIR" | tr -s ' ')
FS_DEV=$(basename "$(findmnt -no SOURCE -T "$BENCH_DIR")")
ROTA=$(cat "/sys/class/block/$FS_DEV/queue/rotational" 2>/dev/null || echo "?")
MEM_TOTAL=$(awk '/^MemTotal/{printf "%.1f", $2/1048576}' /proc/meminfo)
MEM_AVAIL=$(awk '/^MemAvailable/{printf "%.1f", $2/1048576}' /proc/meminfo)
COMMIT=$(git -C "$REPO" --no-optional-locks rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$REPO" --no-optional-locks status --porcelain 2>/dev/null | wc -l)
FREE_GB=$(df -P --block-size=1G "$BENCH_DIR" | awk 'NR==2{print $4}')
((FREE_GB >= 8)) || [[ -f $INPUTS/.complete-v$INPUTS_VERSION ]] ||
    die "$BENCH_DIR has ${FREE_GB} GiB free; the inputs and stores need about 5 (8 to be safe)"
log "$NPROC x $CPU_MODEL, kernel $KERNEL, $FS_INFO, ${MEM_AVAIL}/${MEM_TOTAL} GiB free; $UPTIME_START"

# ---------------------------------------------------------------------------------------------
# Inputs, made deterministically from this machine's /usr and kept for the next run.
phase "inputs"
if [[ $BENCH_FRESH == 1 || ! -f $INPUTS/.complete-v$INPUTS_VERSION ]]; then
    log "generating inputs in $INPUTS (kept for later runs; BENCH_FRESH=1 regenerates)"
    rm -rf "$INPUTS"
    mkdir -p "$INPUTS/tree" "$INPUTS/big"

    # 1. A rootfs-like tree: libraries, Python, docs/locales/icons, binaries of this host.
    # Small files first (Python, docs, locales, icons), then shared libraries up to the budget.
    TREE_ROOTS=(/usr/sbin /usr/lib/python3 /usr/lib/python3.11 /usr/share
        /usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/bin /usr/lib)
    run_read "TREE_FILES TREE_BYTES TREE_ENTRIES" "${HELPERS[@]}" select-tree \
        "$INPUTS/tree.list" "$TREE_BUDGET" "${TREE_ROOTS[@]}"
    log "tree: $TREE_FILES files, $TREE_BYTES bytes, $TREE_ENTRIES entries"
    tar -C / --null --no-recursion -T "$INPUTS/tree.list" -cf - |
        tar -C "$INPUTS/tree" --numeric-owner -xpf -
    # What the converter reads: file data, each hard-linked inode once.
    TREE_BYTES=$(find "$INPUTS/tree" -type f -printf '%i %s\n' | sort -u | awk '{s += $2} END {print s}')
    # The same tree as one image layer, uncompressed and gzip'd (level 6, as docker does).
    (cd "$INPUTS/tree" && tar --sort=name --numeric-owner --format=gnu -cf ../layer.tar -- *)
    log "gzip -6 the layer (single-threaded, ~30-60 s)"
    gzip -6 -n -c "$INPUTS/layer.tar" >"$INPUTS/layer.tar.gz"
    TAR_BYTES=$(stat -c %s "$INPUTS/layer.tar")
    GZ_BYTES=$(stat -c %s "$INPUTS/layer.tar.gz")
    "${HELPERS[@]}" oci-layout "$INPUTS/oci" "$INPUTS/layer.tar" "$INPUTS/layer.tar.gz"

    # 2. 100,000 small text files in ~1,000 directories.
    run_read "SMALL_COUNT SMALL_DIRCOUNT SMALL_BYTES" "${HELPERS[@]}" small-files \
        "$INPUTS/small" "$SMALL_FILES" "$SMALL_DIRS" 42

    # 3. 1 GiB of concatenated shared libraries and binaries.
    BIG_ROOTS=(/usr/lib/x86_64-linux-gnu /usr/lib/aarch64-linux-gnu /usr/lib/llvm-14 /usr/lib/gcc
        /usr/bin /usr/lib)
    "${HELPERS[@]}" concat "$INPUTS/big/data.bin" "$BIG_SIZE" "${BIG_ROOTS[@]}"
    BIG_GZ_RATIO=$(head -c $((64 << 20)) "$INPUTS/big/data.bin" | gzip -1 | wc -c)

    cat >"$INPUTS/facts" <<EOF
TREE_FILES=$TREE_FILES
TREE_BYTES=$TREE_BYTES
TREE_ENTRIES=$TREE_ENTRIES
TAR_BYTES=$TAR_BYTES
GZ_BYTES=$GZ_BYTES
SMALL_COUNT=$SMALL_COUNT
SMALL_DIRCOUNT=$SMALL_DIRCOUNT
SMALL_BYTES=$SMALL_BYTES
BIG_GZ_RATIO=$BIG_GZ_RATIO
EOF
    sync
    touch "$INPUTS/.complete-v$INPUTS_VERSION"
    INPUTS_REUSED=no
else
    log "reusing inputs in $INPUTS"
    INPUTS_REUSED=yes
fi
# shellcheck source=/dev/null
source "$INPUTS/facts"

# ---------------------------------------------------------------------------------------------
# 1. Conversion throughput. Inputs are read once first so every run starts with them in the page
# cache: this measures the converter, not the disk.
phase "convert"
find "$INPUTS/tree" -type f -print0 | xargs -0 cat >/dev/null
cat "$INPUTS/oci/blobs/sha256/"* >/dev/null

declare -A CONV_WALL CONV_CPU CONV_STORED CONV_MBPS CONV_PERCPU
for variant in path oci-tar oci-gzip; do
    case $variant in
    path) src=path:$INPUTS/tree ;;
    oci-tar) src=oci:$INPUTS/oci:tar ;;
    oci-gzip) src=oci:$INPUTS/oci:gzip ;;
    esac
    walls=() cpus=()
    for ((run = 1; run <= RUNS; run++)); do
        rm -rf "$STORES/conv"
        run_read "wall user sys" timeit "$LOGS/convert-$variant.log" \
            "$LAZYCTL" convert --no-progress "$src" "dir:$STORES/conv:bench"
        walls+=("$wall")
        cpus+=("$(calc "%.2f" "$user + $sys")")
        log "convert $variant run $run: ${wall} s wall, $(mbps "$TREE_BYTES" "$wall") MB/s"
    done
    CONV_WALL[$variant]=$(calc "%.2f" "$(median "${walls[@]}")")
    CONV_CPU[$variant]=$(median "${cpus[@]}")
    CONV_MBPS[$variant]=$(mbps "$TREE_BYTES" "$(median "${walls[@]}")")
    CONV_PERCPU[$variant]=$(mbps "$TREE_BYTES" "${CONV_CPU[$variant]}")
    CONV_STORED[$variant]=$(du -sb "$STORES/conv" | cut -f1)
done
rm -rf "$STORES/conv"
CONV_SUMMARY=$(grep -m1 '^converted' "$LOGS/convert-path.log" || true)

# ---------------------------------------------------------------------------------------------
# 2. Mount time of a 100k-file image.
phase "mount-time"
rm -rf "$STORES/small"
find "$INPUTS/small" -type f -print0 | xargs -0 cat >/dev/null # measure lazyctl, not the disk
run_read "SMALL_CONV_WALL SMALL_CONV_USER SMALL_CONV_SYS" timeit "$LOGS/convert-small.log" \
    "$LAZYCTL" convert --no-progress "path:$INPUTS/small" "dir:$STORES/small:bench"
SMALL_INODES=$(grep -o '[0-9]* entries' "$LOGS/convert-small.log" | head -1 | cut -d' ' -f1)
SMALL_INDEX_KIB=$(grep -o '[0-9.]* KiB index' "$LOGS/convert-small.log" | head -1 | cut -d' ' -f1)
mkdir -p "$MNTS/small"
walls=() loggeds=() polls=()
for ((run = 1; run <= MOUNT_RUNS; run++)); do
    run_read "wall_ms logged_ms poll_us npolls" "${HELPERS[@]}" mount-time "$LAZYCTL" \
        "dir:$STORES/small:bench" "$MNTS/small" "$LOGS/mount-small-$run.log"
    walls+=("$wall_ms") loggeds+=("$logged_ms") polls+=("$poll_us")
    log "mount run $run: logged ${logged_ms} ms, visible after ${wall_ms} ms (${npolls} polls)"
done
MOUNT_WALL_MED=$(median "${walls[@]}")
MOUNT_WALL_MAX=$(maxof "${walls[@]}")
MOUNT_LOG_MED=$(median "${loggeds[@]}")
MOUNT_LOG_MAX=$(maxof "${loggeds[@]}")
MOUNT_POLL_US=$(median "${polls[@]}")
# One more with a cold page cache (store index and the lazyctl binary read from disk).
drop_cache "$STORES/small" "$LAZYCTL"
run_read "MOUNT_COLD_WALL MOUNT_COLD_LOG _ _" "${HELPERS[@]}" mount-time "$LAZYCTL" \
    "dir:$STORES/small:bench" "$MNTS/small" "$LOGS/mount-small-cold.log"
log "cold mount: logged ${MOUNT_COLD_LOG} ms, visible after ${MOUNT_COLD_WALL} ms"

# ---------------------------------------------------------------------------------------------
# 3. Sequential read, 1 GiB file: native vs through the mount, same disk.
phase "read"
BIG=$INPUTS/big/data.bin
rm -rf "$STORES/big"
cat "$BIG" >/dev/null
run_read "BIG_CONV_WALL _ _" timeit "$LOGS/convert-big.log" \
    "$LAZYCTL" convert --no-progress "path:$INPUTS/big" "dir:$STORES/big:bench"
BIG_STORED=$(du -sb "$STORES/big" | cut -f1)
MNT=$MNTS/big
mkdir -p "$MNT"
ddread() { timeit "$LOGS/dd.log" dd if="$1" of=/dev/null bs=1M status=none; }

native_cold=() native_warm=() mount_cold=() mount_warm=() mount_store=() mount_ra=()
# Each run: drop the page cache once, then read the store through a fresh mount (cold) and the
# native file (cold; the mount did not touch it); then alternate warm re-reads of both, so the
# two warm numbers see the same background load.
for ((run = 1; run <= RUNS; run++)); do
    drop_cache "$STORES/big" "$BIG"
    mount_bg "dir:$STORES/big:bench" "$MNT" "$LOGS/mount-big.log"
    run_read "w _ _" ddread "$MNT/data.bin"
    mount_cold+=("$w")
    run_read "w _ _" ddread "$BIG"
    native_cold+=("$w")
    for ((k = 1; k <= WARM_READS; k++)); do
        run_read "w _ _" ddread "$BIG"
        native_warm+=("$w")
        run_read "w _ _" ddread "$MNT/data.bin"
        mount_warm+=("$w")
    done
    if ((run == RUNS)); then
        cmp "$BIG" "$MNT/data.bin" || die "the mount returned different bytes than $BIG"
    fi
    umount_wait "$MNT"
    log "run $run: cold native $(mbps "$BIG_SIZE" "${native_cold[-1]}"), mount $(mbps "$BIG_SIZE" "${mount_cold[-1]}");" \
        "warm native $(mbps "$BIG_SIZE" "${native_warm[-1]}"), mount $(mbps "$BIG_SIZE" "${mount_warm[-1]}") MB/s"
done
# A fresh mount while the store's blob is in the page cache: every byte goes through FUSE and
# a zstd decode, nothing waits for the disk (the "local cache hit" path).
for ((run = 1; run <= RUNS; run++)); do
    mount_bg "dir:$STORES/big:bench" "$MNT" "$LOGS/mount-big.log"
    run_read "w _ _" ddread "$MNT/data.bin"
    mount_store+=("$w")
    umount_wait "$MNT"
    log "run $run, store in page cache: $(mbps "$BIG_SIZE" "$w") MB/s"
done
MOUNT_COLD_STATS=$(grep 'unmounted;' "$LOGS/mount-big.log" | head -1 | sed 's/^lazyctl: unmounted; //')
MOUNT_STATS=$(grep 'unmounted;' "$LOGS/mount-big.log" | tail -1 | sed 's/^lazyctl: unmounted; //')
# Diagnostic: the same with the mount's read-ahead changed. The kernel gives a FUSE mount 128 KiB
# (so FUSE reads of 128 KiB); lazyctl may raise it itself. Whatever the mount set, this row uses
# the other one of {128 KiB, one default chunk}, to show what read-ahead is worth.
RA_DEFAULT="" RA_ALT=""
for ((run = 1; run <= RUNS; run++)); do
    mount_bg "dir:$STORES/big:bench" "$MNT" "$LOGS/mount-big-ra.log"
    bdi=$(awk -v m="$MNT" '$5 == m {print $3}' /proc/self/mountinfo)
    if [[ -z $RA_DEFAULT ]]; then
        RA_DEFAULT=$(cat "/sys/class/bdi/$bdi/read_ahead_kb")
        RA_ALT=$([[ $RA_DEFAULT == 128 ]] && echo 1024 || echo 128)
    fi
    echo "$RA_ALT" >"/sys/class/bdi/$bdi/read_ahead_kb"
    run_read "w _ _" ddread "$MNT/data.bin"
    mount_ra+=("$w")
    umount_wait "$MNT"
    log "run $run, store in page cache, read_ahead_kb $RA_DEFAULT -> $RA_ALT: $(mbps "$BIG_SIZE" "$w") MB/s"
done
MOUNT_RA_STATS=$(grep 'unmounted;' "$LOGS/mount-big-ra.log" | tail -1 | sed 's/^lazyctl: unmounted; //')
NC=$(mbps "$BIG_SIZE" "$(median "${native_cold[@]}")")
NW=$(mbps "$BIG_SIZE" "$(median "${native_warm[@]}")")
MC=$(mbps "$BIG_SIZE" "$(median "${mount_cold[@]}")")
MW=$(mbps "$BIG_SIZE" "$(median "${mount_warm[@]}")")
MS=$(mbps "$BIG_SIZE" "$(median "${mount_store[@]}")")
MR=$(mbps "$BIG_SIZE" "$(median "${mount_ra[@]}")")
pct() { calc "%.0f %%" "100 * $1 / $2"; }

phase ""
UPTIME_END=$(uptime)
TOTAL_S=$(awk -v a="$SCRIPT_START" -v b="$(date +%s.%N)" 'BEGIN{printf "%.0f", b-a}')

# ---------------------------------------------------------------------------------------------
# Report
MiB() { calc "%.0f MiB" "$1 / 1048576"; }
DROP_TEXT=$([[ $DROP_METHOD == drop_caches ]] &&
    echo '`sync; echo 3 > /proc/sys/vm/drop_caches` before each cold run' ||
    echo 'drop_caches was not permitted: `dd iflag=nocache count=0` (posix_fadvise DONTNEED) on the files read, before each cold run')
DISTURBED_LINE=""
if ((${#DISTURBED[@]} > 0)); then
    DISTURBED_LINE=$'\n'"- **Disturbed**: other processes took more than 10 % of the CPU during: $(printf '%s, ' "${DISTURBED[@]}" | sed 's/, $//'); rerun on a quieter machine before trusting those numbers."
    log "WARNING: disturbed run: ${DISTURBED[*]}"
fi
RESULTS=$(
    cat <<EOF
### Results $(date -u +%Y-%m-%d), commit $COMMIT$( ((DIRTY > 0)) && echo " + $DIRTY uncommitted changes" || true)

- Command: \`sudo bench/run.sh\` (BENCH_DIR=$BENCH_DIR; inputs reused from an earlier run: $INPUTS_REUSED)
- Machine: $NPROC x $CPU_MODEL, Linux $KERNEL, $MEM_TOTAL GiB RAM ($MEM_AVAIL GiB available at start);
  BENCH_DIR on $FS_INFO (rotational=$ROTA)
- Load at start: \`$(echo "$UPTIME_START" | sed 's/^ *//')\`
- Load at end: \`$(echo "$UPTIME_END" | sed 's/^ *//')\`
- Page cache eviction: $DROP_TEXT
- Script time: ${TOTAL_S} s; per phase, with the CPU other processes took meanwhile (of wall x $NPROC cores):
$(printf '  - %s\n' "${PHASES[@]}")$DISTURBED_LINE

**1. Conversion throughput** (median of $RUNS runs; input in the page cache; \`--jobs\` default = $NPROC;
MB/s = $(MiB "$TREE_BYTES") of file data / wall time, 1 MB = 10^6 bytes). Input: $TREE_FILES files
($TREE_ENTRIES entries) copied from this host's /usr (sbin, lib/python3*, share, then
lib/x86_64-linux-gnu; sorted; the first $(MiB "$TREE_BUDGET") of file data); layer tar $(MiB "$TAR_BYTES"),
gzip -6 $(MiB "$GZ_BYTES").

| source | wall | MB/s | CPU (user+sys) | MB per CPU-second | store size | target | |
|---|---:|---:|---:|---:|---:|---|---|
| \`path:DIR\` | ${CONV_WALL[path]} s | ${CONV_MBPS[path]} | ${CONV_CPU[path]} s | ${CONV_PERCPU[path]} | $(MiB "${CONV_STORED[path]}") | >= 150 MB/s | $(met "${CONV_MBPS[path]} >= 150") |
| \`oci:\` uncompressed tar layer | ${CONV_WALL[oci-tar]} s | ${CONV_MBPS[oci-tar]} | ${CONV_CPU[oci-tar]} s | ${CONV_PERCPU[oci-tar]} | $(MiB "${CONV_STORED[oci-tar]}") | >= 150 MB/s | $(met "${CONV_MBPS[oci-tar]} >= 150") |
| \`oci:\` gzip layer | ${CONV_WALL[oci-gzip]} s | ${CONV_MBPS[oci-gzip]} | ${CONV_CPU[oci-gzip]} s | ${CONV_PERCPU[oci-gzip]} | $(MiB "${CONV_STORED[oci-gzip]}") | (none; gzip decode is serial) | |

lazyctl's own summary (first \`path:\` run): \`$CONV_SUMMARY\`

**2. Mount time, $SMALL_COUNT-file image** ($SMALL_DIRCOUNT directories, $(MiB "$SMALL_BYTES") of text-like
files 64 B..16 KiB; $SMALL_INODES entries, ${SMALL_INDEX_KIB} KiB index; converted in $(calc "%.1f" "$SMALL_CONV_WALL") s).
$MOUNT_RUNS mounts with the store in the page cache, then one after dropping it.

| measure | median | max | cold cache | target | |
|---|---:|---:|---:|---|---|
| \`mounted in X ms\` (open store, verify index digest, validate, mount(2)) | ${MOUNT_LOG_MED} ms | ${MOUNT_LOG_MAX} ms | ${MOUNT_COLD_LOG} ms | < 50 ms | $(met "$MOUNT_LOG_MAX < 50") |
| exec \`lazyctl mount\` -> visible in /proc/self/mountinfo | ${MOUNT_WALL_MED} ms | ${MOUNT_WALL_MAX} ms | ${MOUNT_COLD_WALL} ms | < 50 ms | $(met "$MOUNT_WALL_MAX < 50") |

Poll granularity: one read of /proc/self/mountinfo every ${MOUNT_POLL_US} µs (Python busy loop).

**3. Sequential read of a 1 GiB file** (\`dd bs=1M\` to /dev/null; cold and fresh-mount rows: median of
$RUNS runs, warm rows: median of $((RUNS * WARM_READS)) re-reads, native and mount alternating. Data: this host's
/usr/lib/x86_64-linux-gnu, llvm, gcc files concatenated; gzip -1 keeps $(calc "%.0f" "100 * $BIG_GZ_RATIO / 67108864") % of it;
store $(MiB "$BIG_STORED") on the same filesystem; converted in $(calc "%.1f" "$BIG_CONV_WALL") s.)

| read | MB/s | mount / native | target | |
|---|---:|---:|---|---|
| native, cold page cache | $NC | | | |
| mount, cold page cache (fresh mount; blob read from disk, decoded) | $MC | $(pct "$MC" "$NC") of native cold | | |
| mount, fresh, store blob in page cache (FUSE + zstd decode) | $MS | $(pct "$MS" "$NC") of native cold | | |
| same, mount's read_ahead_kb $RA_DEFAULT -> $RA_ALT (diagnostic) | $MR | $(pct "$MR" "$NC") of native cold | | |
| native, warm page cache | $NW | | | |
| mount, warm page cache (re-read, FOPEN_KEEP_CACHE) | $MW | $(pct "$MW" "$NW") of native warm | >= 50 % | $(met "$MW >= 0.5 * $NW") |

Mount counters (chunk reads are FUSE read requests): cold run \`$MOUNT_COLD_STATS\`;
store in page cache \`$MOUNT_STATS\`; with read_ahead_kb=$RA_ALT \`$MOUNT_RA_STATS\`.
EOF
)
echo
echo "$RESULTS"
echo "$RESULTS" >"$BENCH_DIR/results.md"
log "written to $BENCH_DIR/results.md"

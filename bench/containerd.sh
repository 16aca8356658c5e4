#!/usr/bin/env bash
# Cold start of a container under containerd, with its overlayfs snapshotter and with
# lazy-snapshotter, against `lazyctl run` (results are printed and written to
# $BENCH_DIR/containerd/results.md):
#
#   the link, the image and the workload of bench/containers.sh: docker-registry on a free
#   127.0.0.1 port, its replies rate-limited to $RATE by tc htb on lo, a delaying TCP proxy adding
#   $DELAY_MS ms to every request; Debian bookworm + python3 + numpy, scipy, pandas, matplotlib
#   and scikit-learn (bench_tools python-packages-layout), pushed, and converted with
#   `lazyctl convert` to a lazy version found from the original's name (referrers API);
#   python3 -c "$PY_SCRIPT" with PYTHONDONTWRITEBYTECODE=1 and MPLCONFIGDIR=/tmp/mpl.
#   WORKLOAD=heavy (the default) imports pandas, sklearn, scipy.stats and matplotlib.pyplot;
#   WORKLOAD=light imports numpy.
#
#   Cases (CASES picks them), each RUNS times (median), each run from empty caches (a new
#   containerd root, a new lazyd cache) with the page cache dropped; each time is from the
#   pull's start to the container's first line of output:
#   o. containerd with its overlayfs snapshotter: `ctr image pull` + `ctr run --rm`
#   z. containerd with lazy-snapshotter (proxy plugin `lazyimg`) over a fresh lazyd:
#      `ctr-remote image rpull --snapshotter lazyimg` + `ctr run --rm --snapshotter lazyimg`
#   r. `lazyctl run IMAGE -- python3 ...` through a fresh lazyd (bench/containers.sh's case b)
#   p. z with the image's hot-chunk profile (recorded once beforehand by a lazyd with
#      profile.push = true, stored beside the image, as profiles are by default): lazyd
#      prefetches it from the mount on, which lazy-snapshotter makes as the pull ends
#   q. r with the same profile (bench/containers.sh's case c)
#   Each containerd is private (its own root, state and sockets under $BENCH_DIR) and runs
#   containers with runc through containerd-shim-runc-v2; `lazyctl run` uses $RUNTIME (runc by
#   default, the same runtime). lazyd runs without profiles in z and r, with the pushed one
#   in p and q.
#
# Usage (as root, from the repository root):  sudo bench/containerd.sh
# Runtime: about 4 minutes for 3 runs of each case, after the release build and the first build
# of the image (cached in the test fixtures).
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, RUNS=3, CASES=ozrpq,
#   WORKLOAD=heavy|light, PY_SCRIPT (must print a first line starting with "ok"), RUNTIME=runc,
#   LAZYD_EXTRA (lines added to every lazyd's config)
set -euo pipefail

BENCH_NAME=containerd.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
RUNTIME=${RUNTIME:-runc}
WORKLOAD=${WORKLOAD:-heavy}
case $WORKLOAD in
    heavy) DEFAULT_SCRIPT='import pandas, sklearn, scipy.stats, matplotlib.pyplot; print("ok")' ;;
    light) DEFAULT_SCRIPT='import numpy; print("ok")' ;;
    *) die "WORKLOAD must be heavy or light" ;;
esac
PY_SCRIPT=${PY_SCRIPT:-$DEFAULT_SCRIPT}
CASES=${CASES:-ozrpq}
LAZYD_EXTRA=${LAZYD_EXTRA:-}
want() { [[ $CASES == *$1* ]]; }
require_tools cargo skopeo docker-registry tc curl python3 containerd ctr \
    containerd-shim-runc-v2 runc "$RUNTIME"
{ want z || want p; } && require_tools ctr-remote
# The environment of every run, in every case.
RUN_ENV=(PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/mpl)
# lazyd's config in z and r: no profile recorded or prefetched, so both read on demand only.
AGENT_CONFIG="[profile]\nrecord = false\nprefetch = false\n$LAZYD_EXTRA"
# ... in p and q: the profile pushed beside the image is prefetched from the mount on.
PROFILE_CONFIG="[profile]\nrecord = false\nprefetch = true\n$LAZYD_EXTRA"

W=$BENCH_DIR/containerd
RUN=$W/run
build_and_trap
# Every binary of the workspace, lazy-snapshotter among them once it exists.
cargo build --release -q --workspace --bins
SNAPSHOTTER_BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}/release/lazy-snapshotter")
if want z && [[ ! -x $SNAPSHOTTER_BIN ]]; then
    die "case z needs lazy-snapshotter, not built at $SNAPSHOTTER_BIN (CASES=or runs the others)"
fi
CTRD_PID= CTRD_ROOT= SNAP_PID=

# start_containerd NAME [SNAPSHOTTER_SOCKET]: a private containerd under $RUN/NAME (root,
# state, sockets; the CRI plugin off), with lazy-snapshotter's socket as proxy plugin lazyimg
# when given; returns once `ctr version` answers.
start_containerd() {
    local root=$RUN/$1
    rm -rf "$root"
    mkdir -p "$root"
    {
        printf 'version = 2\nroot = "%s/root"\nstate = "%s/state"\n' "$root" "$root"
        printf 'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        printf '[grpc]\n  address = "%s/containerd.sock"\n' "$root"
        printf '[ttrpc]\n  address = "%s/containerd.sock.ttrpc"\n' "$root"
        if [[ -n ${2:-} ]]; then
            printf '[proxy_plugins.lazyimg]\n  type = "snapshot"\n  address = "%s"\n' "$2"
        fi
    } >"$root/config.toml"
    containerd --config "$root/config.toml" >"$root/log" 2>&1 &
    CTRD_PID=$!
    CTRD_ROOT=$root
    for _ in $(seq 300); do
        ctrd version >/dev/null 2>&1 && return 0
        kill -0 "$CTRD_PID" 2>/dev/null || die "containerd did not start: $(tail -5 "$root/log")"
        sleep 0.05
    done
    die "containerd did not answer: $(tail -5 "$root/log")"
}
ctrd() { ctr --address "$CTRD_ROOT/containerd.sock" --namespace bench "$@"; }
ctrd_remote() { ctr-remote --address "$CTRD_ROOT/containerd.sock" --namespace bench "$@"; }

# kill_shims ROOT: kills the runc shims of the containerd whose files are under ROOT (their
# command line names its socket), one pid at a time.
kill_shims() {
    local address=$1/containerd.sock
    for cmdline in /proc/[0-9]*/cmdline; do
        if tr '\0' ' ' 2>/dev/null <"$cmdline" | grep -q -- "^[^ ]*containerd-shim-runc-v2 .*-address $address "; then
            local pid=${cmdline#/proc/}
            kill -9 "${pid%/cmdline}" 2>/dev/null || true
        fi
    done
}

# stop_containerd: SIGTERM (SIGKILL after 10 s), its shims, its mounts; its root is removed.
stop_containerd() {
    [[ -n $CTRD_PID ]] || return 0
    kill -TERM "$CTRD_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$CTRD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$CTRD_PID" 2>/dev/null || true
    wait "$CTRD_PID" 2>/dev/null || true
    kill_shims "$CTRD_ROOT"
    unmount_under "$CTRD_ROOT"
    rm -rf "$CTRD_ROOT"
    CTRD_PID=
}

# start_snapshotter NAME: lazy-snapshotter over the current lazyd, root and socket under
# $RUN/NAME; sets SNAP_SOCK once it listens.
start_snapshotter() {
    local root=$RUN/$1
    rm -rf "$root"
    mkdir -p "$root"
    SNAP_SOCK=$root/snapshotter.sock
    RUST_LOG=info "$SNAPSHOTTER_BIN" --root "$root/root" --address "$SNAP_SOCK" \
        --lazyd-socket "$AGENT_ROOT/sock" >"$root/log" 2>&1 &
    SNAP_PID=$!
    SNAP_ROOT=$root
    for _ in $(seq 300); do
        [[ -S $SNAP_SOCK ]] && return 0
        kill -0 "$SNAP_PID" 2>/dev/null || die "lazy-snapshotter did not start: $(tail -5 "$root/log")"
        sleep 0.05
    done
    die "lazy-snapshotter did not listen on $SNAP_SOCK: $(tail -5 "$root/log")"
}
stop_snapshotter() {
    [[ -n $SNAP_PID ]] || return 0
    kill -TERM "$SNAP_PID" 2>/dev/null || true
    wait "$SNAP_PID" || log "lazy-snapshotter exited with $?: $(tail -3 "$SNAP_ROOT/log")"
    SNAP_PID=
}

# unmount_under DIR: detaches every mount at or below DIR, deepest first.
unmount_under() {
    awk -v dir="$1" 'index($5, dir) == 1 {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m"; done
}
cleanup() {
    set +e
    [[ -n $CTRD_PID ]] && kill -9 "$CTRD_PID" 2>/dev/null
    [[ -n $SNAP_PID ]] && kill -9 "$SNAP_PID" 2>/dev/null
    for root in "$RUN"/*; do [[ -f $root/config.toml && -d $root/state ]] && kill_shims "$root"; done
    bench_cleanup
    unmount_under "$RUN"
}
trap cleanup EXIT
unmount_under "$RUN"
rm -rf "$RUN"
mkdir -p "$RUN"

# --- the image, the registry, the lazy version (unshaped) --------------------------------------
log "building (or reusing) the Debian + python3 + scientific packages image"
read -r LAYOUT TAG < <("$TOOLS" python-packages-layout)
start_registry "$RUN/registry"
log "pushing the image to $REG and converting it"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$LAYOUT:$TAG" "docker://$REG/bench/py:v1"
t0=$(now)
"$LAZYCTL" convert --no-progress "docker://$REG/bench/py:v1" "docker://$REG/bench/py:v1-lazy" >"$RUN/convert.log" 2>&1
log "converted in $(elapsed "$t0") s"
LAYER_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m["layers"]), sum(l["size"] for l in m["layers"]))')
LAZY_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1-lazy" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))')

shape_link "$TOOLS"
IMAGE=$LINK/bench/py:v1

# --- helpers (first_output, lazy_run and record_profile are link.sh's) ------------------------

# ctr_run T0 SNAPSHOTTER NAME: `ctr run --rm` of the image with SNAPSHOTTER; prints the seconds
# from T0 to the container's first output.
ctr_run() {
    local env=()
    for e in "${RUN_ENV[@]}"; do env+=(--env "$e"); done
    first_output "$1" ctr --address "$CTRD_ROOT/containerd.sock" --namespace bench run --rm \
        --snapshotter "$2" "${env[@]}" "$IMAGE" "bench-$3" python3 -c "$PY_SCRIPT"
}

# --- the profile for p and q: one recorded start, pushed beside the image ---------------------
HOT="- -"
if want p || want q; then
    record_profile
fi

# lazy_pull_run NAME CONFIG CASE: a fresh lazyd (CONFIG), lazy-snapshotter and containerd,
# `ctr-remote image rpull` + `ctr run --rm`; appends the pull's seconds to the array CASE_PULL,
# the time to the first output to CASE and lazyd's fetched bytes to CASE_F.
lazy_pull_run() {
    local -n pulls=${3}_PULL times=$3 fetched=${3}_F
    start_agent "$1" "$2"
    start_snapshotter "$1-snapshotter"
    start_containerd "$1-containerd" "$SNAP_SOCK"
    drop_caches
    t0=$(now)
    ctrd_remote image rpull --plain-http --snapshotter lazyimg "$IMAGE" >/dev/null
    pulls+=("$(elapsed "$t0")")
    times+=("$(ctr_run "$t0" lazyimg "$1")")
    fetched+=("$(fetched_bytes)")
    stop_containerd
    stop_snapshotter
    stop_agent
    unmount_under "$RUN/$1"
}

# lazyctl_run NAME CONFIG CASE: `lazyctl run` through a fresh lazyd (CONFIG); appends the time
# to the first output to the array CASE and lazyd's fetched bytes to CASE_F.
lazyctl_run() {
    local -n times=$3 fetched=${3}_F
    start_agent "$1" "$2"
    drop_caches
    times+=("$(lazy_run "$(now)" "$1")")
    fetched+=("$(fetched_bytes)")
    stop_agent
}

O=() Z=() R=() P=() Q=() O_F=() Z_F=() R_F=() P_F=() Q_F=() O_PULL=() Z_PULL=() P_PULL=()
for run in $(seq "$RUNS"); do
    if want o; then
        log "run $run/$RUNS: o. containerd + overlayfs: ctr image pull + ctr run --rm"
        start_containerd "o$run"
        drop_caches
        t0=$(now)
        ctrd image pull --plain-http "$IMAGE" >/dev/null
        O_PULL+=("$(elapsed "$t0")")
        O+=("$(ctr_run "$t0" overlayfs "o$run")")
        O_F+=("$(du -sb "$CTRD_ROOT/root/io.containerd.content.v1.content/blobs" | cut -f1)")
        stop_containerd
    fi

    if want z; then
        log "run $run/$RUNS: z. containerd + lazy-snapshotter: ctr-remote image rpull + ctr run --rm"
        lazy_pull_run "z$run" "$AGENT_CONFIG" Z
    fi

    if want r; then
        log "run $run/$RUNS: r. lazyctl run"
        lazyctl_run "r$run" "$AGENT_CONFIG" R
    fi

    if want p; then
        log "run $run/$RUNS: p. containerd + lazy-snapshotter, the image's profile"
        lazy_pull_run "p$run" "$PROFILE_CONFIG" P
    fi

    if want q; then
        log "run $run/$RUNS: q. lazyctl run, the image's profile"
        lazyctl_run "q$run" "$PROFILE_CONFIG" Q
    fi
done

# med ARRAY...: the median, or "-" for a case not run.
med() { if (($#)); then median "$@"; else echo -; fi; }
# ratio X Y: X / Y to 2 places, or "-" where either was not run.
ratio() { if [[ $1 == - || $2 == - ]]; then echo -; else calc "$1 / $2:.2f"; fi; }
mO=$(med "${O[@]}")
mZ=$(med "${Z[@]}")
mR=$(med "${R[@]}")
mP=$(med "${P[@]}")
mQ=$(med "${Q[@]}")

cat <<EOF | tee "$W/results.md"
containerd cold-start benchmark (bench/containerd.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')
link: registry replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs; every containerd and lazyd starts empty, page cache dropped
image: Debian bookworm + python3 + numpy, scipy, pandas, matplotlib, scikit-learn: ${LAYER_BYTES#* } bytes in ${LAYER_BYTES%% *} gzip layers; lazy image: $LAZY_BYTES bytes of blobs
command ($WORKLOAD): python3 -c '$PY_SCRIPT' with ${RUN_ENV[*]}; $(containerd --version | cut -d' ' -f3); containerd runs runc, \`lazyctl run\` $RUNTIME${LAZYD_EXTRA:+; lazyd config added: $LAZYD_EXTRA}

| case | pull (s) | time to first output (s) | bytes fetched |
|---|---|---|---|
| o. containerd, overlayfs: \`ctr image pull\` + \`ctr run --rm\` | $(med "${O_PULL[@]}") | $mO | $(med "${O_F[@]}") |
| z. containerd, lazy-snapshotter: \`ctr-remote image rpull\` + \`ctr run --rm\` | $(med "${Z_PULL[@]}") | $mZ | $(med "${Z_F[@]}") |
| r. \`lazyctl run\` | | $mR | $(med "${R_F[@]}") |
| p. z with the image's profile | $(med "${P_PULL[@]}") | $mP | $(med "${P_F[@]}") |
| q. r with the image's profile | | $mQ | $(med "${Q_F[@]}") |

- o/z: $(ratio "$mO" "$mZ") (how many times sooner the lazy snapshotter's container prints than overlayfs's)
- z/r: $(ratio "$mZ" "$mR") (containerd's path over \`lazyctl run\`'s, both lazy)
- o/p: $(ratio "$mO" "$mP"), p/q: $(ratio "$mP" "$mQ") (the same with the image's profile: ${HOT% *} bytes in ${HOT#* } chunks, recorded from one start)
- runs: o ${O[*]} | z ${Z[*]} | r ${R[*]} | p ${P[*]} | q ${Q[*]}
EOF

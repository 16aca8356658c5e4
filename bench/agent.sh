#!/usr/bin/env bash
# Shaped-link benchmark of the host agent (see docs/BENCHMARKS.md):
#
#   docker-registry on 127.0.0.1:$REG_PORT; its replies are rate-limited to $RATE by tc htb on
#   lo, and a delaying TCP proxy (tests/examples/bench_tools.rs) adds $DELAY_MS ms to every
#   request. Every lazyd below talks to the proxy, starting with an empty cache and state.
#
#   W. warm throughput: `lazyctl warm` of an image of $BIG_FILES x $BIG_FILE_MIB MiB
#      incompressible files, against the nominal link rate and one curl download of one of its
#      blobs over the same link in the same run.
#   L. demand read latency: a cold 1 MiB file (one chunk, one request) read through a mount on
#      an idle link, and while a warm of the big image fills the link (guesses and the
#      whole-image prefetch off, so that each read is a demand fetch).
#   P. cold start of a Debian + python3 image: time from `lazyctl mount` to the first output of
#      `chroot MNT $PY_CMD`, bytes fetched and chunks the start waited for (demand fetches):
#        P0 without a profile (profile.prefetch = false; the defaults otherwise: guesses and
#           the whole image fetched in the background);
#        P1 with the profile recorded once beforehand and pushed beside the image (the agent
#           prefetches it in the background right after mounting).
#
# Usage (as root, from the repository root):  sudo bench/agent.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, RUNS=3
set -euo pipefail

BENCH_NAME=agent.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
BIG_FILES=8
BIG_FILE_MIB=64
PY_CMD="python3 -c 'import json, email, http.client, decimal, asyncio; print(\"ok\")'"
require_tools cargo skopeo docker-registry tc curl python3 chroot

W=$BENCH_DIR/agent
rm -rf "$W/run"
mkdir -p "$W/run" "$W/inputs"
RUN=$W/run

build_and_trap

# --- inputs -----------------------------------------------------------------------------------
if [[ ! -f $W/inputs/COMPLETE ]]; then
    log "writing the warm benchmark's files"
    rm -rf "$W/inputs/big"
    mkdir -p "$W/inputs/big"
    for i in $(seq 1 $BIG_FILES); do
        head -c $((BIG_FILE_MIB << 20)) /dev/urandom >"$W/inputs/big/data$i.bin"
    done
    touch "$W/inputs/COMPLETE"
fi
if [[ ! -f $W/inputs/SMALL_COMPLETE ]]; then
    rm -rf "$W/inputs/small"
    mkdir -p "$W/inputs/small"
    for i in $(seq 1 8); do head -c $((1 << 20)) /dev/urandom >"$W/inputs/small/f$i"; done
    touch "$W/inputs/SMALL_COMPLETE"
fi
read -r PY_LAYOUT PY_TAG < <("$TOOLS" python-layout)

# --- registry, images (unshaped) --------------------------------------------------------------
start_registry "$RUN/registry"
log "converting the images into $REG"
"$LAZYCTL" convert --no-progress "path:$W/inputs/big" "docker://$REG/bench/big:v1-lazy" >"$RUN/convert.log"
"$LAZYCTL" convert --no-progress "path:$W/inputs/small" "docker://$REG/bench/small:v1-lazy" >>"$RUN/convert.log"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$PY_LAYOUT:$PY_TAG" "docker://$REG/bench/python:v1"
"$LAZYCTL" convert --no-progress "docker://$REG/bench/python:v1" "docker://$REG/bench/python:v1-lazy" >>"$RUN/convert.log"

# --- the shaped link --------------------------------------------------------------------------
shape_link "$TOOLS"

# --- helpers ----------------------------------------------------------------------------------

read_ms() { # read_ms FILE: milliseconds to read FILE
    python3 -c "import sys,time; t=time.perf_counter(); open(sys.argv[1],'rb').read(); print(f'{(time.perf_counter()-t)*1e3:.1f}')" "$1"
}

# W's reference: the link's own rate for one big blob (curl through the proxy).
BIG_BLOB=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/big:v1-lazy" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(max(m["layers"][1:], key=lambda d: d["size"])["digest"])')

# The profile for P1: one recorded start, pushed beside the image (the registry keeps it).
log "recording the python image's profile"
start_agent rec '[profile]\nrecord = true\nwindow = "15s"\npush = true'
mkdir -p "$RUN/mnt-rec"
ctl mount "$LINK/bench/python:v1" "$RUN/mnt-rec" >/dev/null
[[ $(chroot "$RUN/mnt-rec" /bin/sh -c "$PY_CMD") == ok ]] || die "start failed"
for _ in $(seq 300); do grep -q "pushed the profile" "$AGENT_ROOT/log" && break; sleep 0.1; done
grep -q "pushed the profile" "$AGENT_ROOT/log" || die "the profile was not pushed: $(tail -5 "$AGENT_ROOT/log")"
ctl umount "$RUN/mnt-rec"
HOT=$(ctl profile show --json "$LINK/bench/python:v1" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["hot_bytes"], r["image_bytes"], len(r["remote"]["entries"]))')
stop_agent

WARM=() WARM_BYTES=() CURL=() P0=() P1=() P0_F=() P1_F=() P0_D=() P1_D=() P1_B=() L_IDLE=() L_BUSY=()
for run in $(seq "$RUNS"); do
    log "run $run/$RUNS: curl of one blob"
    t0=$(now)
    BLOB_BYTES=$(curl -s -o /dev/null -w '%{size_download}' "http://$LINK/v2/bench/big/blobs/$BIG_BLOB")
    CURL+=("$(calc "$BLOB_BYTES / $(elapsed "$t0") / 1e6:.1f")")

    log "run $run/$RUNS: W. warm"
    start_agent warm '[profile]\nrecord = false'
    t0=$(now)
    ctl warm --no-progress "$LINK/bench/big:v1-lazy" >"$RUN/warm.out"
    secs=$(elapsed "$t0")
    bytes=$(fetched_bytes)
    WARM+=("$(calc "$bytes / $secs / 1e6:.1f")")
    WARM_BYTES+=("$bytes")
    stop_agent

    log "run $run/$RUNS: L. demand reads, idle and during a warm"
    # Nothing fetched ahead of the reads (no guesses, no whole-image prefetch): each read is
    # one demand request.
    start_agent lat '[profile]\nrecord = false\n[fetch]\nspeculate = false\n[background]\nwhole_image = "never"'
    mkdir -p "$RUN/mnt-l"
    ctl mount "$LINK/bench/small:v1-lazy" "$RUN/mnt-l" >/dev/null
    for i in 1 2 3; do L_IDLE+=("$(read_ms "$RUN/mnt-l/f$i")"); done
    ctl warm --no-progress "$LINK/bench/big:v1-lazy" >/dev/null &
    WARM_PID=$!
    sleep 1
    for i in 4 5 6 7 8; do
        L_BUSY+=("$(read_ms "$RUN/mnt-l/f$i")")
        sleep 0.2
    done
    kill -0 "$WARM_PID" 2>/dev/null || die "the warm ended before the reads during it"
    wait "$WARM_PID"
    ctl umount "$RUN/mnt-l"
    stop_agent

    for mode in 0 1; do
        log "run $run/$RUNS: P$mode. cold start $([[ $mode == 1 ]] && echo with || echo without) a profile"
        if [[ $mode == 1 ]]; then
            start_agent p1 '[profile]\nrecord = false\nprefetch = true'
        else
            start_agent p0 '[profile]\nrecord = false\nprefetch = false'
        fi
        mkdir -p "$RUN/mnt-p"
        drop_caches
        t0=$(now)
        ctl mount "$LINK/bench/python:v1" "$RUN/mnt-p" >/dev/null
        [[ $(chroot "$RUN/mnt-p" /bin/sh -c "$PY_CMD") == ok ]] || die "start failed"
        secs=$(elapsed "$t0")
        demand=$(status_field "s['metrics']['chunks']['demand_fetches']")
        prefetched=$(status_field "s['metrics']['chunks']['prefetch_fetches']")
        bytes=$(fetched_bytes)
        ctl umount "$RUN/mnt-p"
        stop_agent
        if [[ $mode == 1 ]]; then
            P1+=("$secs") P1_F+=("$bytes") P1_D+=("$demand") P1_B+=("$prefetched")
        else
            P0+=("$secs") P0_F+=("$bytes") P0_D+=("$demand")
        fi
    done
done

mW=$(median "${WARM[@]}")
mC=$(median "${CURL[@]}")
mP0=$(median "${P0[@]}")
mP1=$(median "${P1[@]}")
read -r HOT_BYTES PY_BYTES HOT_CHUNKS <<<"$HOT"

cat <<EOF | tee "$W/results.md"
Agent benchmark (bench/agent.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')
link: registry replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs; every lazyd starts empty

| measure | result |
|---|---|
| W. \`lazyctl warm\` of $((BIG_FILES * BIG_FILE_MIB)) MiB ($(median "${WARM_BYTES[@]}") bytes over the link) | $mW MB/s = $(calc "100 * $mW * 1e6 / $RATE_BYTES:.0f") % of the nominal $RATE; $(calc "100 * $mW / $mC:.0f") % of one curl download over the same link ($mC MB/s) |
| L. cold 1 MiB read through a mount (one request) | $(median "${L_IDLE[@]}") ms on an idle link; $(median "${L_BUSY[@]}") ms while a warm fills the link |
| P0. cold start, no profile: mount + \`$PY_CMD\` | $mP0 s; $(median "${P0_F[@]}") bytes fetched; $(median "${P0_D[@]}") chunks waited for |
| P1. cold start, profile prefetched after the mount | $mP1 s; $(median "${P1_F[@]}") bytes fetched; $(median "${P1_D[@]}") chunks waited for, $(median "${P1_B[@]}") prefetched |

- profile: $HOT_CHUNKS chunks, $HOT_BYTES of the image's $PY_BYTES stored bytes ($(calc "100 * $HOT_BYTES / $PY_BYTES:.1f") %), recorded from one start
- cold start with the profile: $(calc "$mP0 / $mP1:.2f")x sooner than without
- runs: W ${WARM[*]} MB/s | curl ${CURL[*]} MB/s | P0 ${P0[*]} s | P1 ${P1[*]} s | L idle ${L_IDLE[*]} ms, during a warm ${L_BUSY[*]} ms
EOF

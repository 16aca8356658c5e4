#!/usr/bin/env bash
# Restart benchmark of lazyd (see docs/BENCHMARKS.md): the longest stall a reader of a mounted
# image sees while lazyd's serving process is replaced, for each of
#
#   (a) a planned restart: SIGHUP to the supervisor (the server hands over; a new one adopts the
#       mounts),
#   (b) a crash: kill -9 of the server (the supervisor starts a new one; the kernel resends the
#       requests the dead one had not answered),
#   (c) an upgrade: `lazyctl upgrade --binary COPY` (two copies of lazyd, alternately),
#
# and a baseline window with no event, $REPS times each, interleaved, in one run of one lazyd.
#
# The reader (bench/stall_probe.py probe) loops over 300 files of the Debian + python3 image,
# mounted through lazyd and warmed first (every chunk in the disk cache): open, drop the file's
# page cache, pread 4 KiB, close. A window opens $WINDOW_PRE_S s before the event and closes
# $WINDOW_POST_S s after the new server answers (the baseline window lasts about as long); its
# stall is the longest time between two completed reads in it. No shaped link: the reads are
# of cached chunks.
#
# Usage (as root, from the repository root):  sudo bench/restart.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, REPS=10
set -euo pipefail

BENCH_NAME=restart.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
REPS=${REPS:-10}
WINDOW_PRE_S=0.3
WINDOW_POST_S=1.0
# The baseline window: as long as an event's (before, about 0.1 s to answer, after).
BASELINE_S=1.1
# Between windows: the reader back to its pace, the old server gone.
SETTLE_S=0.5
PROBE_PY=$(realpath bench/stall_probe.py)
require_tools cargo skopeo docker-registry python3 curl

W=$BENCH_DIR/restart
rm -rf "$W/run"
mkdir -p "$W/run"
RUN=$W/run

build_and_trap
read -r PY_LAYOUT PY_TAG < <("$TOOLS" python-layout)

# --- registry, image --------------------------------------------------------------------------
start_registry "$RUN/registry"
log "converting the python image into $REG"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$PY_LAYOUT:$PY_TAG" "docker://$REG/bench/python:v1"
"$LAZYCTL" convert --no-progress "docker://$REG/bench/python:v1" "docker://$REG/bench/python:v1-lazy" >"$RUN/convert.log" 2>&1
IMAGE=docker://$REG/bench/python:v1-lazy

# Two copies of the binary to upgrade to, alternately: each upgrade runs another file.
cp "$LAZYD" "$RUN/lazyd-v2"
cp "$LAZYD" "$RUN/lazyd-v3"
COPIES=("$RUN/lazyd-v2" "$RUN/lazyd-v3")

# --- lazyd, the mount, the reader -------------------------------------------------------------
start_agent agent '[profile]\nrecord = false'
SOCK=$AGENT_ROOT/sock
probe_status() { python3 "$PROBE_PY" status "$SOCK" "$1"; }
[[ $(probe_status 's.get("holder")') == supervisor ]] ||
    die "lazyd is not running under its supervisor: $(probe_status 's.get("holder")')"
[[ $(probe_status 's["supervisor_pid"]') == "$AGENT_PID" ]] || die "the supervisor is not $AGENT_PID"
mkdir -p "$RUN/mnt"
ctl mount "$IMAGE" "$RUN/mnt" >/dev/null
log "warming the image (every chunk into the disk cache)"
ctl warm --no-progress "$IMAGE" >"$RUN/warm.out"

coproc PROBE { exec python3 "$PROBE_PY" probe "$RUN/mnt" 2>"$RUN/probe.err"; }
PIDS+=("$PROBE_PID")
read -r ready files <&"${PROBE[0]}" || die "the reader did not start: $(cat "$RUN/probe.err")"
[[ $ready == ready ]] || die "the reader said $ready $files"
log "reader on $files files of $RUN/mnt"

# --- the events -------------------------------------------------------------------------------
KINDS=(none restart crash upgrade)
declare -A GAPS=() ANSWERED=() READS=() ERRORS=()
upgrades=0
ms=
for rep in $(seq "$REPS"); do
    log "repetition $rep/$REPS"
    for kind in "${KINDS[@]}"; do
        sleep "$SETTLE_S"
        echo begin >&"${PROBE[1]}"
        sleep "$WINDOW_PRE_S"
        if [[ $kind == none ]]; then
            sleep "$BASELINE_S"
        else
            binary=
            if [[ $kind == upgrade ]]; then
                binary=${COPIES[$((upgrades % 2))]}
                upgrades=$((upgrades + 1))
            fi
            # shellcheck disable=SC2086 # no binary: no argument
            read -r old new ms < <(python3 "$PROBE_PY" replace "$SOCK" "$kind" "$AGENT_PID" "$LAZYCTL" $binary) ||
                die "$kind: no new server; lazyd's log: $(tail -20 "$AGENT_ROOT/log")"
            if [[ -n $binary && $(readlink "/proc/$new/exe") != "$binary" ]]; then
                die "upgrade: the new server $new runs $(readlink "/proc/$new/exe"), not $binary"
            fi
            ANSWERED[$kind]+="$ms "
            sleep "$WINDOW_POST_S"
        fi
        echo end >&"${PROBE[1]}"
        read -r gap reads errors <&"${PROBE[0]}" || die "the reader ended: $(cat "$RUN/probe.err")"
        GAPS[$kind]+="$gap "
        READS[$kind]=$((${READS[$kind]:-0} + reads))
        ERRORS[$kind]=$((${ERRORS[$kind]:-0} + errors))
        log "  $kind: longest gap $gap ms, $reads reads, $errors failed${ms:+; new server answered after $ms ms}"
        ms=
    done
done
# The reads reached lazyd (not the page cache): the last server answered the reader's.
served=$(probe_status 'next((o["count"] for o in s["metrics"]["fuse"]["ops"] if o["op"] == "read"), 0)')
[[ $served -ge 1000 ]] || die "the last server answered $served reads: the reader's reads did not reach lazyd"
echo quit >&"${PROBE[1]}"
wait "$PROBE_PID" || true

# The mount survived every replacement, and lazyd counted them.
events=$((3 * REPS))
restarts=$(probe_status 's["restarts"]')
survived=$(probe_status '[m["restarts_survived"] for m in s["mounts"]]')
[[ $restarts -ge $events ]] || die "lazyd counts $restarts restarts after $events events"
[[ $survived == "[$events]" ]] || die "the mount survived $survived restarts, expected [$events]"
ctl umount "$RUN/mnt"
stop_agent

# --- results ----------------------------------------------------------------------------------
max() { printf '%s\n' "$@" | sort -g | tail -1; }
row() { # row KIND LABEL TARGET
    # shellcheck disable=SC2086 # word lists
    local gaps=${GAPS[$1]} answered=${ANSWERED[$1]:-}
    printf '| %s | %s | %s ms | %s ms | %s | %s of %s | %s |\n' "$2" "$REPS" \
        "$(max $gaps)" "$(calc "$(median $gaps):.1f")" \
        "$([[ -n $answered ]] && echo "$(calc "$(median $answered):.0f") ms" || echo -)" \
        "${ERRORS[$1]}" "${READS[$1]}" "$3"
}
cat <<EOF | tee "$W/results.md"
Restart benchmark (bench/restart.sh), $(date -u +%F), $(nproc) cores, kernel $(uname -r), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')
reader: open + 4 KiB pread + close in a loop over $files files of the Debian + python3 image mounted through lazyd and warmed (chunks in the disk cache), page cache dropped before each read; stall = the longest time between two completed reads, from $WINDOW_PRE_S s before the event to $WINDOW_POST_S s after the new server answered; $REPS repetitions of each, interleaved

| event | repetitions | longest stall (max) | longest stall (median of the per-event max) | new server answers after (median) | failed reads | target |
|---|---|---|---|---|---|---|
$(row none "none (baseline window, same run)" -)
$(row restart "(a) planned restart: SIGHUP to the supervisor" "< 200 ms")
$(row crash "(b) crash: kill -9 of the server" "< 2 s")
$(row upgrade "(c) upgrade: \`lazyctl upgrade --binary\` to a copy" "< 200 ms")

- command: \`sudo REPS=$REPS bench/restart.sh\`; lazyd counted $restarts restarts, the mount survived $events
- per event (ms): baseline ${GAPS[none]}| restart ${GAPS[restart]}| crash ${GAPS[crash]}| upgrade ${GAPS[upgrade]}
EOF

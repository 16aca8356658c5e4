#!/usr/bin/env bash
# Cold-start benchmark of a container on a lazy root filesystem (results are printed and written
# to $BENCH_DIR/containers/results.md; docs/BENCHMARKS.md explains them):
#
#   docker-registry on a free 127.0.0.1 port; its replies are rate-limited to $RATE by tc htb on
#   lo, and a delaying TCP proxy (tests/examples/bench_tools.rs) adds $DELAY_MS ms to every
#   request. Every client below talks to the proxy, starting with an empty cache.
#
#   image: Debian bookworm minbase + python3 + Debian's numpy, scipy, pandas, matplotlib and
#          scikit-learn, three layers (bench_tools python-packages-layout: 1.26 GB unpacked,
#          406 MB of gzip layers). Command: python3 -c "$PY_SCRIPT".
#   a. full pull: skopeo copy + umoci unpack, then `$RUNTIME run` of the unpacked bundle
#   b. `lazyctl run IMAGE -- python3 ...` through a fresh lazyd, empty cache, no profile
#   c. the same with the image's hot-chunk profile (recorded once beforehand by a lazyd with
#      profile.push = true, and stored beside the image): lazyd prefetches it after the mount
#   d. `lazyctl warm IMAGE`, then `lazyctl run` (the time includes the warm)
#   For each: time from the start to the container's first line of output, and bytes fetched
#   over the link (a: the pulled blobs; b-d: lazyd's backend byte counter).
#
# Usage (as root, from the repository root):  sudo bench/containers.sh
# Runtime: about 2 minutes for 3 runs, after the release build and the first build of the image
# (about 75 s and 180 MB of Debian packages; cached in the test fixtures afterwards).
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, RUNS=3,
#   RUNTIME=crun (or runc; crun falls back to runc where it cannot run, see below),
#   PY_SCRIPT='import numpy; print("ok")' (must print a first line starting with "ok"),
#   CASES=abcd (the cases to run; the others are reported as not run)
set -euo pipefail

BENCH_NAME=containers.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
RUNTIME=${RUNTIME:-crun}
PY_SCRIPT=${PY_SCRIPT:-'import numpy; print("ok")'}
CASES=${CASES:-abcd}
want() { [[ $CASES == *$1* ]]; }
require_tools cargo skopeo umoci docker-registry tc curl python3 "$RUNTIME"

W=$BENCH_DIR/containers
rm -rf "$W/run"
mkdir -p "$W/run"
RUN=$W/run

LAZY=false # whether any lazy case (b, c, d) runs
if want b || want c || want d; then LAZY=true; fi
log "building lazyctl, lazyd and the bench tools (release)"
if $LAZY; then
    cargo build --release -q -p tools --bin lazyctl
    cargo build --release -q -p agent --bin lazyd
fi
cargo build --release -q -p lazy-tests --example bench_tools
TARGET=${CARGO_TARGET_DIR:-target}
LAZYCTL=$(realpath -m "$TARGET/release/lazyctl")
LAZYD=$(realpath -m "$TARGET/release/lazyd")
TOOLS=$(realpath "$TARGET/release/examples/bench_tools")

PIDS=()
AGENT_PID=
cleanup() {
    set +e
    for c in $("$RUNTIME" list -q 2>/dev/null); do
        [[ $c == bench-* ]] && "$RUNTIME" delete -f "$c" >/dev/null 2>&1
    done
    [[ -n $AGENT_PID ]] && kill -9 "$AGENT_PID" 2>/dev/null
    # Whatever lazyd or the runs left mounted under $RUN (overlays, lazy lowers), deepest first.
    awk -v run="$RUN" '$5 ~ "^"run {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m"; done
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    tc qdisc del dev lo root 2>/dev/null
    wait 2>/dev/null
}
trap cleanup EXIT

# --- the runtime ------------------------------------------------------------------------------
# crun 1.8 (Debian 12) refuses every container on a host with hybrid cgroups (v1 controllers
# plus a v2 hierarchy that holds a controller, such as this benchmark's VM); runc runs there.
# Both run the same bundles, so fall back rather than fail, and say so in the results.
RUNTIME_NOTE=
if [[ $RUNTIME == crun ]]; then
    probe=$RUN/probe
    mkdir -p "$probe/rootfs"
    (cd "$probe" && crun spec)
    if crun run --bundle "$probe" bench-probe 2>&1 | grep -q 'hybrid mode not supported'; then
        command -v runc >/dev/null || die "crun cannot run containers here (hybrid cgroups) and runc is missing"
        RUNTIME=runc
        RUNTIME_NOTE="crun 1.8 refuses to run on this host's hybrid cgroup setup; runc used instead"
        log "$RUNTIME_NOTE"
    fi
    crun delete -f bench-probe >/dev/null 2>&1 || true
    rm -rf "$probe"
fi

# --- the image --------------------------------------------------------------------------------
log "building (or reusing) the Debian + python3 + scientific packages image"
read -r LAYOUT TAG < <("$TOOLS" python-packages-layout)

# --- registry, image push, conversion (unshaped) ----------------------------------------------
start_registry "$RUN/registry"
log "pushing the image to $REG and converting it"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$LAYOUT:$TAG" "docker://$REG/bench/py:v1"
LAZY_BYTES=-
if $LAZY; then
    t0=$(now)
    "$LAZYCTL" convert --no-progress "docker://$REG/bench/py:v1" "docker://$REG/bench/py:v1-lazy" >"$RUN/convert.log" 2>&1
    log "converted in $(elapsed "$t0") s"
    LAZY_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1-lazy" |
        python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))')
fi

# --- the shaped link --------------------------------------------------------------------------
shape_link "$TOOLS"
IMAGE=$LINK/bench/py:v1

# --- helpers ----------------------------------------------------------------------------------

# first_output T0 CMD...: runs CMD, prints the seconds from T0 (a `now` timestamp) to CMD's
# first line of stdout; fails unless that line starts with "ok" and CMD exits 0. The rest of
# CMD's output is drained, so it can run to its end.
first_output() {
    python3 - "$@" <<'PY'
import subprocess, sys, time
t0 = float(sys.argv[1])
p = subprocess.Popen(sys.argv[2:], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
line = p.stdout.readline()
t = time.time() - t0
rest = p.stdout.read()
rc = p.wait()
if rc != 0 or not line.startswith(b"ok"):
    sys.exit(f"{sys.argv[2:]}: exit {rc}, first line {line!r}, then {rest[:200]!r}")
print(f"{t:.3f}")
PY
}

# bundle_for_command BUNDLE: makes umoci's generated config.json run python3 -c "$PY_SCRIPT"
# without a terminal (umoci writes the image's Cmd with terminal = true).
bundle_for_command() {
    python3 - "$1/config.json" "$PY_SCRIPT" <<'PY'
import json, sys
path, script = sys.argv[1], sys.argv[2]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = ["python3", "-c", script]
json.dump(c, open(path, "w"))
PY
}

# --- the profile for c: one recorded start, pushed beside the image (the registry keeps it) ---
HOT="- -"
if want c; then
    log "recording the image's profile"
    start_agent rec '[profile]\nrecord = true\nwindow = "15s"\npush = true'
    # The recording ends when the container exits (its lower mount goes) and is pushed then.
    [[ $(ctl run --name bench-rec --runtime "$RUNTIME" "$IMAGE" -- python3 -c "$PY_SCRIPT") == ok* ]] ||
        die "the recording start failed"
    for _ in $(seq 300); do grep -q "pushed the profile" "$AGENT_ROOT/log" && break; sleep 0.1; done
    grep -q "pushed the profile" "$AGENT_ROOT/log" || die "the profile was not pushed: $(tail -5 "$AGENT_ROOT/log")"
    HOT=$(ctl profile show --json "$IMAGE" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["hot_bytes"], len(r["remote"]["entries"]))')
    stop_agent
fi

# lazy_run T0 CASE RUN: `lazyctl run` of the image through the current agent; prints the
# seconds from T0 to the container's first output.
lazy_run() {
    first_output "$1" "$LAZYCTL" --socket "$AGENT_ROOT/sock" run --name "bench-$2$3" \
        --runtime "$RUNTIME" "$IMAGE" -- python3 -c "$PY_SCRIPT"
}

A=() B=() C=() D=() A_F=() B_F=() C_F=() D_F=() D_WARM=()
for run in $(seq "$RUNS"); do
    if want a; then
        log "run $run/$RUNS: a. skopeo copy + umoci unpack + $RUNTIME run"
        rm -rf "$RUN/pull" "$RUN/bundle"
        drop_caches
        t0=$(now)
        skopeo copy -q --insecure-policy --src-tls-verify=false "docker://$IMAGE" "oci:$RUN/pull:py"
        umoci unpack --image "$RUN/pull:py" "$RUN/bundle" >/dev/null
        bundle_for_command "$RUN/bundle"
        A+=("$(first_output "$t0" "$RUNTIME" run --bundle "$RUN/bundle" "bench-a$run")")
        A_F+=("$(du -sb "$RUN/pull/blobs" | cut -f1)")
        "$RUNTIME" delete -f "bench-a$run" >/dev/null 2>&1 || true
        rm -rf "$RUN/pull" "$RUN/bundle"
    fi

    if want b; then
        log "run $run/$RUNS: b. lazyctl run, lazily, no profile"
        start_agent b '[profile]\nrecord = false\nprefetch = false'
        drop_caches
        B+=("$(lazy_run "$(now)" b "$run")")
        B_F+=("$(fetched_bytes)")
        stop_agent
    fi

    if want c; then
        log "run $run/$RUNS: c. lazyctl run with the recorded profile"
        start_agent c '[profile]\nrecord = false\nprefetch = true'
        drop_caches
        C+=("$(lazy_run "$(now)" c "$run")")
        C_F+=("$(fetched_bytes)")
        stop_agent
    fi

    if want d; then
        log "run $run/$RUNS: d. lazyctl warm, then lazyctl run"
        start_agent d '[profile]\nrecord = false\nprefetch = false'
        drop_caches
        t0=$(now)
        ctl warm --no-progress "$IMAGE" >/dev/null
        D_WARM+=("$(elapsed "$t0")")
        D+=("$(lazy_run "$t0" d "$run")")
        D_F+=("$(fetched_bytes)")
        stop_agent
    fi
done

# med ARRAY...: the median, or "-" for a case not run.
med() { if (($#)); then median "$@"; else echo -; fi; }
mA=$(med "${A[@]}")
mB=$(med "${B[@]}")
mC=$(med "${C[@]}")
mD=$(med "${D[@]}")
read -r HOT_BYTES HOT_CHUNKS <<<"$HOT"
LAYER_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m["layers"]), sum(l["size"] for l in m["layers"]))')
# ratio X Y: X / Y to 2 places, or "-" where either was not run.
ratio() { if [[ $1 == - || $2 == - ]]; then echo -; else calc "$1 / $2:.2f"; fi; }
# verdict X Y MIN: whether X / Y >= MIN ("met", "MISSED", or "not run").
verdict() {
    if [[ $1 == - || $2 == - ]]; then echo "not run"; else python3 -c "print('met' if $1 / $2 >= $3 else 'MISSED')"; fi
}

cat <<EOF | tee "$W/results.md"
Container cold-start benchmark (bench/containers.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')
link: registry replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs; every lazyd starts empty
image: Debian bookworm + python3 + numpy, scipy, pandas, matplotlib, scikit-learn: ${LAYER_BYTES#* } bytes in ${LAYER_BYTES%% *} gzip layers; lazy image: $LAZY_BYTES bytes of blobs
command: python3 -c '$PY_SCRIPT'; runtime: $RUNTIME${RUNTIME_NOTE:+ ($RUNTIME_NOTE)}

| case | time to first output (s) | bytes fetched |
|---|---|---|
| a. skopeo copy + umoci unpack + \`$RUNTIME run\` | $mA | $(med "${A_F[@]}") |
| b. \`lazyctl run\`, lazy, no profile | $mB | $(med "${B_F[@]}") |
| c. \`lazyctl run\` with the recorded profile | $mC | $(med "${C_F[@]}") |
| d. \`lazyctl warm\` (median $(med "${D_WARM[@]}") s) then \`lazyctl run\` | $mD | $(med "${D_F[@]}") |

- b vs a: $(ratio "$mA" "$mB")x sooner (target >= 5x: $(verdict "$mA" "$mB" 5)); c vs b: $(ratio "$mB" "$mC")x sooner (target: c faster than b: $(verdict "$mB" "$mC" 1.0001)); d vs a: $(ratio "$mA" "$mD")x
- profile: $HOT_CHUNKS chunks, $HOT_BYTES bytes, recorded from one start
- runs: a ${A[*]} | b ${B[*]} | c ${C[*]} | d ${D[*]} (warm ${D_WARM[*]})
EOF

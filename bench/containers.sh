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
#          406 MB of gzip layers). Command: python3 -c "$PY_SCRIPT", with
#          PYTHONDONTWRITEBYTECODE=1 and MPLCONFIGDIR=/tmp/mpl (a fresh one each run, in every
#          case), so no run leaves anything behind that makes the next one faster.
#   Workloads: WORKLOAD=heavy (the default) imports pandas, sklearn, scipy.stats and
#   matplotlib.pyplot (~1,300 modules); WORKLOAD=light imports numpy.
#
#   Cases (CASES picks them; each time is from the case's start to the container's first line
#   of output, page cache dropped first unless it says "hot"):
#   l. the image unpacked on local disk (umoci unpack, once, untimed), `$RUNTIME run` of that
#      bundle: the floor every lazy case is compared with
#   a. full pull: skopeo copy + umoci unpack, then `$RUNTIME run` of the unpacked bundle
#   b. `lazyctl run IMAGE -- python3 ...` through a fresh lazyd, empty cache, no profile
#   c. the same with the image's hot-chunk profile (recorded once beforehand by a lazyd with
#      profile.push = true, and stored beside the image): lazyd prefetches it after the mount
#   w. every chunk in lazyd's cache (`lazyctl warm` first, untimed), cold page cache
#   h. page cache hot, after w in the same lazyd: `lazyctl run` and the local `$RUNTIME run`,
#      alternating, HOT_RUNS times each (median); the same for `chroot` into the local rootfs
#      and into a `lazyctl mount` of the image (the container path's cost on a warm mount)
#   d. `lazyctl warm IMAGE`, then `lazyctl run` (the time includes the warm); the warm's rate
#      against the link's
#   For each: bytes fetched over the link (a: the pulled blobs; lazy cases: lazyd's backend
#   byte counter) and lazyd's counters (requests, demand fetches and their wait, speculative
#   bytes and how many of them were read, FUSE operations).
#
# Usage (as root, from the repository root):  sudo bench/containers.sh
# Runtime: about 6 minutes for 3 runs of every case, after the release build and the first
# build of the image (about 90 s and 180 MB of Debian packages; cached in the test fixtures).
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, RUNS=3, HOT_RUNS=7,
#   RUNTIME=crun (or runc; crun falls back to runc where it cannot run, see below),
#   WORKLOAD=heavy|light, PY_SCRIPT (overrides the workload's; must print a first line
#   starting with "ok"), CASES=lhabcwd (the cases to run; the others are reported as not run),
#   LAZYD_EXTRA (lines added to every lazyd's config)
set -euo pipefail

BENCH_NAME=containers.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
RUNTIME=${RUNTIME:-crun}
WORKLOAD=${WORKLOAD:-heavy}
case $WORKLOAD in
    heavy) DEFAULT_SCRIPT='import pandas, sklearn, scipy.stats, matplotlib.pyplot; print("ok")' ;;
    light) DEFAULT_SCRIPT='import numpy; print("ok")' ;;
    *) die "WORKLOAD must be heavy or light" ;;
esac
PY_SCRIPT=${PY_SCRIPT:-$DEFAULT_SCRIPT}
CASES=${CASES:-lhabcwd}
HOT_RUNS=${HOT_RUNS:-7}
LAZYD_EXTRA=${LAZYD_EXTRA:-}
want() { [[ $CASES == *$1* ]]; }
require_tools cargo skopeo umoci docker-registry tc curl python3 unshare "$RUNTIME"
# The environment of every run, in every case.
RUN_ENV=(PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/mpl)

W=$BENCH_DIR/containers
RUN=$W/run
build_and_trap
# Containers of an earlier, interrupted run, then whatever lazyd or the runs left mounted
# under $RUN (overlays, lazy lowers), deepest first.
unmount_run() {
    for c in $("$RUNTIME" list -q 2>/dev/null); do
        [[ $c == bench-* ]] && "$RUNTIME" delete -f "$c" >/dev/null 2>&1
    done
    awk -v run="$RUN" '$5 ~ "^"run {print $5}' /proc/self/mountinfo | sort -r |
        while read -r m; do umount -l "$m"; done
}
cleanup() {
    set +e
    unmount_run
    bench_cleanup
}
trap cleanup EXIT
unmount_run
rm -rf "$RUN"
mkdir -p "$RUN"

# --- the runtime ------------------------------------------------------------------------------
# crun 1.8 (Debian 12) refuses every container on a host with hybrid cgroups (v1 controllers
# plus a v2 hierarchy that holds a controller); scripts/setup.sh binds such controllers to v1,
# and where that was not done, runc runs the same bundles: fall back rather than fail.
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
t0=$(now)
"$LAZYCTL" convert --no-progress "docker://$REG/bench/py:v1" "docker://$REG/bench/py:v1-lazy" >"$RUN/convert.log" 2>&1
log "converted in $(elapsed "$t0") s"
LAZY_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1-lazy" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))')

# --- the local floor: the same image unpacked on this disk ------------------------------------
# bundle_for_command BUNDLE: makes umoci's generated config.json run python3 -c "$PY_SCRIPT"
# with RUN_ENV and without a terminal (umoci writes the image's Cmd with terminal = true).
bundle_for_command() {
    python3 - "$1/config.json" "$PY_SCRIPT" "${RUN_ENV[@]}" <<'PY'
import json, sys
path, script, env = sys.argv[1], sys.argv[2], sys.argv[3:]
c = json.load(open(path))
c["process"]["terminal"] = False
c["process"]["args"] = ["python3", "-c", script]
c["process"]["env"] += env
json.dump(c, open(path, "w"))
PY
}
LOCAL=$RUN/local
if want l || want h; then
    log "unpacking the image on local disk (the floor)"
    umoci unpack --image "$LAYOUT:$TAG" "$LOCAL" >/dev/null
    bundle_for_command "$LOCAL"
fi

# --- the shaped link --------------------------------------------------------------------------
shape_link "$TOOLS"
IMAGE=$LINK/bench/py:v1

# --- helpers (first_output, lazy_run and record_profile are link.sh's) ------------------------

# local_run NAME: `$RUNTIME run` of the local bundle (its /tmp/mpl removed first); prints the
# seconds to its first output.
local_run() {
    rm -rf "$LOCAL/rootfs/tmp/mpl"
    local t
    t=$(first_output "$(now)" "$RUNTIME" run --bundle "$LOCAL" "bench-$1")
    "$RUNTIME" delete -f "bench-$1" >/dev/null 2>&1 || true
    echo "$t"
}


# chroot_run ROOT: the command in a chroot of ROOT with a fresh tmpfs on its /tmp (in a private
# mount namespace); prints the seconds to its first output.
chroot_run() {
    first_output "$(now)" unshare -m sh -c 'mount -t tmpfs tmpfs "$1/tmp" && exec chroot "$@"' \
        sh "$1" env "${RUN_ENV[@]}" python3 -c "$PY_SCRIPT"
}

# warm_timed: warms the image through the agent's API (what `lazyctl warm` does); prints the
# seconds until the image was opened (its reference resolved, its index fetched: the `started`
# event) and until the warm was done.
warm_timed() {
    python3 - "$AGENT_ROOT/sock" "$IMAGE" <<'PY'
import json, socket, sys, time
sock, image = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX)
s.connect(sock)
body = json.dumps({"image": image}).encode()
t0 = time.time()
s.sendall(b"POST /v1/warm HTTP/1.1\r\nHost: lazyd\r\nContent-Type: application/json\r\n"
          b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
buf, opened = b"", None
while True:
    data = s.recv(1 << 16)
    if not data:
        break
    buf += data
    if opened is None and b'"event":"started"' in buf:
        opened = time.time() - t0
    if b'"event":"failed"' in buf:
        sys.exit(f"warm failed: {buf[-500:]!r}")
    if b'"event":"done"' in buf:
        break
if opened is None:
    sys.exit(f"no warm events: {buf[-500:]!r}")
print(f"{opened:.3f} {time.time() - t0:.3f}")
PY
}

# counters: one line of lazyd's counters for the results (fields that this lazyd does not
# report are left out).
counters() {
    status_field "' '.join(f'{k}={v}' for k, v in [
        ('requests', sum(b['requests'] for b in s['metrics']['backends'])),
        ('demand_fetches', s['metrics']['chunks'].get('demand_fetches')),
        ('demand_wait_s', s['metrics']['chunks'].get('demand_wait_seconds')),
        ('speculative_bytes', s['metrics']['chunks'].get('speculative_bytes')),
        ('speculative_used_bytes', s['metrics']['chunks'].get('speculative_used_bytes')),
        ('fuse_ops', sum(o['count'] for o in s['metrics'].get('fuse', {}).get('ops', [])) or None),
    ] if v is not None)"
}

# --- the profile for c: one recorded start, pushed beside the image (the registry keeps it) ---
HOT="- -"
if want c; then
    record_profile
fi

L=() A=() B=() C=() WC=() D=() A_F=() B_F=() C_F=() WC_F=() D_F=() D_WARM=() D_RATE=()
D_OPEN=() D_XFER=()
B_N=() C_N=() WC_N=()
HL=() HZ=() HCL=() HCM=()
for run in $(seq "$RUNS"); do
    if want l; then
        log "run $run/$RUNS: l. $RUNTIME run of the image unpacked on local disk"
        drop_caches
        L+=("$(local_run "l$run")")
    fi

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
        start_agent b "[profile]\nrecord = false\nprefetch = false\n$LAZYD_EXTRA"
        drop_caches
        B+=("$(lazy_run "$(now)" "b$run")")
        B_F+=("$(fetched_bytes)")
        B_N+=("$(counters)")
        stop_agent
    fi

    if want c; then
        log "run $run/$RUNS: c. lazyctl run with the recorded profile"
        start_agent c "[profile]\nrecord = false\nprefetch = true\n$LAZYD_EXTRA"
        drop_caches
        C+=("$(lazy_run "$(now)" "c$run")")
        C_F+=("$(fetched_bytes)")
        C_N+=("$(counters)")
        stop_agent
    fi

    if want w || { want h && ((run == 1)); }; then
        log "run $run/$RUNS: w. every chunk cached, cold page cache"
        start_agent w "[profile]\nrecord = false\nprefetch = false\n$LAZYD_EXTRA"
        ctl warm --no-progress "$IMAGE" >/dev/null
        before=$(fetched_bytes)
        drop_caches
        WC+=("$(lazy_run "$(now)" "w$run")")
        WC_F+=("$(($(fetched_bytes) - before))")
        WC_N+=("$(counters)")
        if want h && ((run == 1)); then
            log "h. page cache hot: lazyctl run vs local $RUNTIME run, chroot on a mount vs local chroot ($HOT_RUNS each)"
            mkdir -p "$RUN/mnt"
            ctl mount "$IMAGE" "$RUN/mnt" >/dev/null
            # One unmeasured run of each first, so every page they read is in the page cache.
            lazy_run "$(now)" hwarm >/dev/null
            local_run hwarm >/dev/null
            chroot_run "$RUN/mnt" >/dev/null
            chroot_run "$LOCAL/rootfs" >/dev/null
            for i in $(seq "$HOT_RUNS"); do
                HZ+=("$(lazy_run "$(now)" "h$i")")
                HL+=("$(local_run "h$i")")
                HCM+=("$(chroot_run "$RUN/mnt")")
                HCL+=("$(chroot_run "$LOCAL/rootfs")")
            done
            ctl umount "$RUN/mnt"
        fi
        stop_agent
    fi

    if want d; then
        log "run $run/$RUNS: d. lazyctl warm, then lazyctl run"
        start_agent d "[profile]\nrecord = false\nprefetch = false\n$LAZYD_EXTRA"
        drop_caches
        t0=$(now)
        read -r opened_s warm_s < <(warm_timed)
        D_WARM+=("$warm_s")
        D+=("$(lazy_run "$t0" "d$run")")
        D_F+=("$(fetched_bytes)")
        D_RATE+=("$(calc "100 * $(fetched_bytes) / $warm_s / $RATE_BYTES:.1f")")
        D_OPEN+=("$opened_s")
        D_XFER+=("$(calc "100 * $(fetched_bytes) / ($warm_s - $opened_s) / $RATE_BYTES:.1f")")
        stop_agent
    fi
done

# med ARRAY...: the median, or "-" for a case not run.
med() { if (($#)); then median "$@"; else echo -; fi; }
mL=$(med "${L[@]}")
mA=$(med "${A[@]}")
mB=$(med "${B[@]}")
mC=$(med "${C[@]}")
mW=$(med "${WC[@]}")
mD=$(med "${D[@]}")
mHL=$(med "${HL[@]}")
mHZ=$(med "${HZ[@]}")
mHCL=$(med "${HCL[@]}")
mHCM=$(med "${HCM[@]}")
read -r HOT_BYTES HOT_CHUNKS <<<"$HOT"
LAYER_BYTES=$(skopeo inspect --raw --tls-verify=false "docker://$REG/bench/py:v1" |
    python3 -c 'import json,sys; m=json.load(sys.stdin); print(len(m["layers"]), sum(l["size"] for l in m["layers"]))')
# ratio X Y: X / Y to 2 places, or "-" where either was not run.
ratio() { if [[ $1 == - || $2 == - ]]; then echo -; else calc "$1 / $2:.2f"; fi; }
# verdict X Y MAX: whether X / Y <= MAX ("met", "MISSED", or "not run").
verdict() {
    if [[ $1 == - || $2 == - ]]; then echo "not run"; else python3 -c "print('met' if $1 / $2 <= $3 else 'MISSED')"; fi
}
# diff X Y: X - Y to 3 places, or "-".
diff_s() { if [[ $1 == - || $2 == - ]]; then echo -; else calc "$1 - $2:+.3f"; fi; }

cat <<EOF | tee "$W/results.md"
Container cold-start benchmark (bench/containers.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')
link: registry replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs; every lazyd starts empty
image: Debian bookworm + python3 + numpy, scipy, pandas, matplotlib, scikit-learn: ${LAYER_BYTES#* } bytes in ${LAYER_BYTES%% *} gzip layers; lazy image: $LAZY_BYTES bytes of blobs
command ($WORKLOAD): python3 -c '$PY_SCRIPT' with ${RUN_ENV[*]}; runtime: $RUNTIME${RUNTIME_NOTE:+ ($RUNTIME_NOTE)}${LAZYD_EXTRA:+; lazyd config added: $LAZYD_EXTRA}

| case | time to first output (s) | vs local | target | bytes fetched |
|---|---|---|---|---|
| l. image unpacked on local disk, \`$RUNTIME run\`, cold page cache | $mL | 1.00 | | |
| a. skopeo copy + umoci unpack + \`$RUNTIME run\` | $mA | $(ratio "$mA" "$mL") | | $(med "${A_F[@]}") |
| b. \`lazyctl run\`, empty cache, no profile | $mB | $(ratio "$mB" "$mL") | <= 2.0x: $(verdict "$mB" "$mL" 2.0) | $(med "${B_F[@]}") |
| c. \`lazyctl run\`, empty cache, profile pushed by an earlier run | $mC | $(ratio "$mC" "$mL") | <= 1.25x: $(verdict "$mC" "$mL" 1.25) | $(med "${C_F[@]}") |
| w. \`lazyctl run\`, every chunk cached, cold page cache | $mW | $(ratio "$mW" "$mL") | <= 1.15x: $(verdict "$mW" "$mL" 1.15) | $(med "${WC_F[@]}") |
| h. page cache hot: local \`$RUNTIME run\` / \`lazyctl run\` (median of $HOT_RUNS) | $mHL / $mHZ | $(ratio "$mHZ" "$mHL") | <= 1.05x: $(verdict "$mHZ" "$mHL" 1.05) | |
| h. page cache hot: chroot local / chroot on a \`lazyctl mount\` (median of $HOT_RUNS) | $mHCL / $mHCM | $(ratio "$mHCM" "$mHCL") | | |
| h. \`lazyctl run\` over a chroot on a mount of the same warm image | $(diff_s "$mHZ" "$mHCM") s | | <= +0.2 s | |
| d. warm (median $(med "${D_WARM[@]}") s, $(med "${D_RATE[@]}") % of the link; transfer $(med "${D_XFER[@]}") %) then \`lazyctl run\` | $mD | $(ratio "$mD" "$mL") | warm >= 95 % | $(med "${D_F[@]}") |

- warm: $(med "${D_RATE[@]}") % of the link over the whole command; $(med "${D_XFER[@]}") % over its transfer, after the image was opened (reference resolved, index fetched) in $(med "${D_OPEN[@]}") s
- b vs a: $(ratio "$mA" "$mB")x sooner; c vs a: $(ratio "$mA" "$mC")x sooner
- profile: $HOT_CHUNKS chunks, $HOT_BYTES bytes, recorded from one start; c fetched $(ratio "$(med "${C_F[@]}")" "$HOT_BYTES")x the hot set
- lazy image stored bytes: $LAZY_BYTES; b fetched $(ratio "$(med "${B_F[@]}")" "$LAZY_BYTES")x of them
- counters: b ${B_N[*]:-} | c ${C_N[*]:-} | w ${WC_N[*]:-}
- runs: l ${L[*]} | a ${A[*]} | b ${B[*]} | c ${C[*]} | w ${WC[*]} | d ${D[*]} (warm ${D_WARM[*]} s, ${D_RATE[*]} %)
- hot runs: local ${HL[*]} | lazy ${HZ[*]} | chroot local ${HCL[*]} | chroot mount ${HCM[*]}
EOF

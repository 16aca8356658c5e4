#!/usr/bin/env bash
# N hosts cold-starting the same image at the same moment, with and without the caching tier
# (results are printed and written to $BENCH_DIR/fleet/results.md, the raw lines to
# results.jsonl):
#
#   the fleet of tests/src/fleet.rs, run by tests/examples/fleet_bench.rs: each host a network
#   namespace with its own lazyd (empty cache) behind a veth shaped to $HOST_RATE toward it;
#   the origin (docker-registry) in its own namespace, its link shaped to $ORIGIN_RATE and every
#   request delayed $DELAY_MS ms (the harness's delaying proxy, which also counts what the
#   origin sends); the tier (nginx rendered from packaging/tier/: slice + proxy_cache_lock) in a
#   third, every host's lazyd naming it as the registry's mirror. All on one bridge.
#   The image: Debian bookworm + python3 + numpy, scipy, pandas, matplotlib and scikit-learn
#   (bench_tools python-packages-layout), converted, its profile recorded from one start of
#   python3 -c "$PY_SCRIPT", converted again with `lazyctl convert --profile` so the hot set is
#   laid out first and contiguous (slices the tier fetches are then full of hot data), and its
#   profile recorded again for that image (pushed beside it). Prepared once into
#   $BENCH_DIR/fleet/registry (delete $BENCH_DIR/fleet/prepared to redo it).
#   Workload: `lazyctl warm --hot IMAGE` on every host at once: the hot set a start with the
#   profile fetches first, without running N pythons on this machine's cores.
#
#   Per (N, mode): the origin's egress (its reply bytes to everyone), over what it sends one host
#   that fetches alone (the direct N = 1 run: manifests, index, profile and hot chunks), one
#   host's chunk bytes (lazy_backend_bytes_total of host 0), and the time from the common start
#   to the end of each host's warm (median, max).
#
# Usage (as root, from the repository root):  sudo bench/fleet.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, HOSTS=1,5,10,20, MODES=tier,direct,
#   ORIGIN_RATE=200mbit, HOST_RATE=1gbit, DELAY_MS=20, SLICE=128K (the tier's slice and the
#   hosts' mirror.slice), RUNTIME=runc (for the recordings),
#   LAZYD_EXTRA (lines added to the recording lazyd's config)
set -euo pipefail

BENCH_NAME=fleet.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
RUNTIME=${RUNTIME:-runc}
HOSTS=${HOSTS:-1,5,10,20}
MODES=${MODES:-tier,direct}
ORIGIN_RATE=${ORIGIN_RATE:-200mbit}
HOST_RATE=${HOST_RATE:-1gbit}
SLICE=${SLICE:-128K}
LAZYD_EXTRA=${LAZYD_EXTRA:-}
PY_SCRIPT='import pandas, sklearn, scipy.stats, matplotlib.pyplot; print("ok")'
RUN_ENV=(PYTHONDONTWRITEBYTECODE=1 MPLCONFIGDIR=/tmp/mpl)
require_tools cargo skopeo docker-registry tc ip nginx curl python3 "$RUNTIME"

W=$BENCH_DIR/fleet
RUN=$W/run
STORE=$W/registry
build_and_trap
cargo build --release -q -p lazy-tests --example fleet_bench
FLEET=$(realpath "${CARGO_TARGET_DIR:-target}/release/examples/fleet_bench")
mkdir -p "$W"

# --- the image, laid out for its profile, with its profile beside it (once) --------------------
if [[ ! -f $W/prepared ]]; then
    rm -rf "$STORE" "$STORE.yml" "$RUN"
    mkdir -p "$RUN"
    log "building (or reusing) the Debian + python3 + scientific packages image"
    read -r LAYOUT TAG < <("$TOOLS" python-packages-layout)
    start_registry "$STORE"
    skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$LAYOUT:$TAG" "docker://$REG/bench/py:v1"
    log "converting it, recording its profile"
    "$LAZYCTL" convert --no-progress "docker://$REG/bench/py:v1" "docker://$REG/bench/py:v1-lazy" >"$RUN/convert.log" 2>&1
    IMAGE=$REG/bench/py:v1-lazy
    record_profile
    start_agent show ""
    ctl profile show "$IMAGE" --output "$W/hot.json" >/dev/null
    stop_agent
    log "converting it again with the hot set laid out first, recording its profile"
    "$LAZYCTL" convert --no-progress --profile "$W/hot.json" "docker://$REG/bench/py:v1" \
        "docker://$REG/bench/py:v1-hot" >>"$RUN/convert.log" 2>&1
    IMAGE=$REG/bench/py:v1-hot
    record_profile
    for p in "${PIDS[@]}"; do kill "$p"; done
    wait
    PIDS=()
    echo "$HOT" >"$W/prepared"
fi
read -r HOT_BYTES HOT_CHUNKS <"$W/prepared"
log "image prepared: hot set of $HOT_BYTES bytes in $HOT_CHUNKS chunks"

log "running the fleets: hosts $HOSTS, modes $MODES"
# The harness finds lazyctl and lazyd beside a test binary; an example's directory has neither.
LAZYCTL=$LAZYCTL LAZYD=$LAZYD "$FLEET" --storage "$STORE" --image bench/py:v1-hot --hosts "$HOSTS" --modes "$MODES" \
    --origin-rate "$ORIGIN_RATE" --host-rate "$HOST_RATE" --origin-delay-ms "$DELAY_MS" --slice "$SLICE" \
    >"$W/results.jsonl"

{
    echo "fleet benchmark (bench/fleet.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
    echo "links: origin $ORIGIN_RATE (tc htb) + $DELAY_MS ms per request; each host $HOST_RATE toward it; tier slice $SLICE; workload: \`lazyctl warm --hot\` on every host at once; hot set $HOT_BYTES bytes in $HOT_CHUNKS chunks (image converted with --profile)"
    echo
    python3 - "$W/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
mb = lambda b: f"{b / 1e6:.1f}"
# What the origin sends one host that fetches alone (its manifests, index, profile and hot
# chunks): the direct N = 1 run, when there is one.
alone = next((r["origin_bytes"] for r in rows if r["mode"] == "direct" and r["hosts"] == 1), None)
ratio = lambda r: f"{r['origin_bytes'] / alone:.3f}" if alone else "-"
print("| hosts | tier | origin egress (MB) | egress / one host alone | one host's chunk bytes (MB) | egress / chunk bytes | time to hot set, median (s) | max (s) |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['hosts']} | {'yes' if r['mode'] == 'tier' else 'no'} | {mb(r['origin_bytes'])} | {ratio(r)} "
          f"| {mb(r['host_bytes'])} | {r['origin_bytes'] / r['host_bytes']:.2f} | {r['median_s']:.2f} | {r['max_s']:.2f} |")
tier = {r["hosts"]: r for r in rows if r["mode"] == "tier"}
if tier and alone:
    worst = max(r["origin_bytes"] / alone for r in tier.values())
    print(f"\n- one host alone: the origin sent it {mb(alone)} MB (direct, N = 1)")
    print(f"- with the tier, origin egress / one host alone: at most {worst:.3f} (target <= 1.10)")
if 1 in tier and max(tier) > 1:
    n = max(tier)
    print(f"- with the tier, max time at N = {n} / time at N = 1: {tier[n]['max_s'] / tier[1]['max_s']:.2f} (target <= 1.50)")
PY
} | tee "$W/results.md"

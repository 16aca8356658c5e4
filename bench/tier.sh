#!/usr/bin/env bash
# The cache tier (packaging/tier/, nginx) under a fleet's cold start (results are printed and
# written to $BENCH_DIR/tier/results.md; docs/BENCHMARKS.md explains them):
#
#   docker-registry on a free 127.0.0.1 port holding one blob of $BLOB_MIB MiB of random bytes;
#   its replies are rate-limited to $RATE by tc htb on lo, and a delaying TCP proxy
#   (bench/tier_tools.py) adds $DELAY_MS ms to every request and counts what the origin sent.
#   The tier (packaging/tier/*.conf, rendered into a scratch directory) proxies to that proxy.
#   N clients (N in $CLIENTS) then read the whole blob through the tier at the same time, each
#   in 1 MiB-aligned ranges of 1 MiB, $DEPTH at a time, the way lazyd's readers do.
#
#   Cases (CASES picks them; each N starts with an empty cache and a fresh nginx):
#     slice1m   the shipped configuration, slice 1m
#     slice4m   the same with slice 4m (each 1 MiB request is served from a 4 MiB slice)
#     noslice   slice 0: whole-object caching with the cache lock, what a cache without range
#               slices (squid, varnish) does on a range miss: the first request fetches the
#               whole blob, the others wait for it
#     nolock    slice 1m with proxy_cache_lock off: every concurrent miss goes to the origin
#   For each: the origin's requests and MiB (at the proxy), each client's time to read the
#   blob (median and max over the clients), per-request latency (p50, p99), and a check that
#   client 0's bytes hash to the blob's sha256.
#
# Usage (as root, from the repository root):  sudo bench/tier.sh
# Runtime: about 5 minutes with the defaults.
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, BLOB_MIB=256,
#   CLIENTS="1 5 10 20", DEPTH=4, CASES="slice1m slice4m noslice nolock"
set -euo pipefail

BENCH_NAME=tier.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
BLOB_MIB=${BLOB_MIB:-256}
CLIENTS=${CLIENTS:-"1 5 10 20"}
DEPTH=${DEPTH:-4}
CASES=${CASES:-"slice1m slice4m noslice nolock"}
REQUEST=$((1 << 20)) # the clients' range size, lazyd's 1 MiB reads
require_tools nginx docker-registry tc curl python3 sha256sum
TIER_TOOLS=$(pwd)/bench/tier_tools.py

W=$BENCH_DIR/tier
rm -rf "$W"
mkdir -p "$W"
PIDS=()
NGINX_RUN=
stop_nginx() {
    [[ -n $NGINX_RUN && -f $NGINX_RUN/nginx.pid ]] || return 0
    local pid
    pid=$(cat "$NGINX_RUN/nginx.pid")
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    NGINX_RUN=
}
cleanup() {
    set +e
    stop_nginx
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    tc qdisc del dev lo root 2>/dev/null
    wait 2>/dev/null
    rm -rf "$W/registry" "$W/blob" "$W"/case-*
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- the origin: a registry with one blob, behind the shaped link ----------------------------
start_registry "$W/registry"
log "pushing a $BLOB_MIB MiB blob to $REG"
head -c $((BLOB_MIB << 20)) /dev/urandom >"$W/blob"
DIGEST=$(sha256sum "$W/blob" | cut -d' ' -f1)
upload=$(curl -sf -D - -o /dev/null -X POST "http://$REG/v2/bench/tier/blobs/uploads/" |
    tr -d '\r' | awk 'tolower($1) == "location:" { print $2 }')
curl -sf -o /dev/null -X PUT -H 'Content-Type: application/octet-stream' \
    --data-binary "@$W/blob" "$upload&digest=sha256:$DIGEST" || die "the blob upload failed"
rm "$W/blob"
BLOB_PATH=/v2/bench/tier/blobs/sha256:$DIGEST

tc qdisc del dev lo root 2>/dev/null || true
tc qdisc add dev lo root handle 1: htb default 1
tc class add dev lo parent 1: classid 1:1 htb rate 100gbit
tc class add dev lo parent 1: classid 1:2 htb rate "$RATE" ceil "$RATE"
tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "${REG##*:}" 0xffff flowid 1:2
STATS=$W/origin.json
coproc PROXY { exec python3 "$TIER_TOOLS" proxy "$REG" "$DELAY_MS" "$STATS"; }
PIDS+=("$PROXY_PID")
read -r ORIGIN <&"${PROXY[0]}"
log "registry $REG shaped to $RATE, reached through $ORIGIN (+$DELAY_MS ms per request)"
origin_counts() { python3 -c "import json; s=json.load(open('$STATS')); print(s['requests'], s['bytes'])"; }

# --- the tier ------------------------------------------------------------------------------
# start_tier CASE: a fresh nginx with an empty cache, configured for CASE; sets TIER.
start_tier() {
    local case=$1 slice=1m dir=$W/case-$1 port
    case $case in
        slice1m | nolock) ;;
        slice4m) slice=4m ;;
        noslice) slice=0 ;;
        *) die "unknown case $case (CASES: slice1m slice4m noslice nolock)" ;;
    esac
    rm -rf "$dir"
    mkdir -p "$dir/conf" "$dir/run/logs"
    port=$(free_port)
    for f in packaging/tier/*.conf; do
        sed -e "s|@CACHE_DIR@|$dir/cache|g; s|@CACHE_SIZE@|$((2 * BLOB_MIB))m|g" \
            -e "s|@SLICE@|$slice|g; s|@RUN_DIR@|$dir/run|g" \
            -e "s|@REGISTRY_LISTEN@|127.0.0.1:$port|g; s|@REGISTRY_ORIGIN@|http://$ORIGIN|g" \
            -e "s|@S3_LISTEN@|127.0.0.1:$(free_port)|g; s|@S3_ORIGIN@|http://$ORIGIN|g" \
            -e "s|@S3_ORIGIN_HOST@|$ORIGIN|g" "$f" >"$dir/conf/${f##*/}"
    done
    [[ $case == nolock ]] && sed -i 's/proxy_cache_lock on;/proxy_cache_lock off;/' "$dir/conf/blob-cache.conf"
    nginx -q -p "$dir/run" -c "$dir/conf/nginx.conf" 2>"$dir/run/logs/start.log" ||
        die "nginx did not start: $(cat "$dir/run/logs/start.log")"
    NGINX_RUN=$dir/run
    TIER=127.0.0.1:$port
    for _ in $(seq 100); do curl -sf "http://$TIER/healthz" >/dev/null && return 0; sleep 0.05; done
    die "the tier did not answer on $TIER"
}

# --- the cases -------------------------------------------------------------------------------
RESULTS=$W/results.md
{
    echo "| case | clients | origin requests | origin MiB | client s (median) | client s (max) | request ms p50 / p99 |"
    echo "|---|---:|---:|---:|---:|---:|---:|"
} >"$RESULTS"
for case in $CASES; do
    for n in $CLIENTS; do
        start_tier "$case"
        read -r req0 bytes0 < <(origin_counts)
        log "$case: $n clients reading $BLOB_MIB MiB each through $TIER"
        out=$(python3 "$TIER_TOOLS" clients "http://$TIER$BLOB_PATH" $((BLOB_MIB << 20)) "$n" "$DEPTH" "$REQUEST") ||
            die "$case, $n clients: $out"
        sleep 0.2 # the proxy's counts are written every 50 ms
        read -r req1 bytes1 < <(origin_counts)
        stop_nginx
        python3 - "$case" "$n" $((req1 - req0)) $((bytes1 - bytes0)) "$DIGEST" "$out" >>"$RESULTS" <<'PY' ||
import json, statistics, sys
case, n, requests, nbytes, digest, out = sys.argv[1:]
r = json.loads(out)
if r["sha256"] != digest:
    sys.exit(f"{case}, {n} clients: client 0 read bytes hashing to {r['sha256']}, not {digest}")
s = r["client_s"]
print(f"| {case} | {n} | {requests} | {int(nbytes) / 2**20:.0f} | {statistics.median(s):.2f} | "
      f"{max(s):.2f} | {r['request_ms']['p50']:.0f} / {r['request_ms']['p99']:.0f} |")
PY
            die "$case, $n clients: wrong bytes"
        tail -1 "$RESULTS" >&2
    done
done
log "done: $RATE origin link, +$DELAY_MS ms per request, $BLOB_MIB MiB blob, $DEPTH requests in flight per client"
cat "$RESULTS"

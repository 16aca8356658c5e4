#!/usr/bin/env bash
# lazyd's resident memory (see docs/BENCHMARKS.md): idle, then with 8 mounts of 8 different
# images (the Debian + python3 image converted with 8 chunk sizes, $CHUNKS) read at once from
# end to end (`tar` of every file, cold: fetched from the registry over the shaped link), then
# read again (from the disk cache). The serving process is sampled every 50 ms (RssAnon: what
# lazyd allocated; RssFile: pages of the mapped cache segments and the binary, which the kernel
# may reclaim; VmRSS: both); the supervisor is read once.
#
# Targets (issue 19): idle <= 50 MB; busy <= 150 MB + fetch.memory_cache (64 MiB by default).
#
# Usage (as root, from the repository root):  sudo bench/memory.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, DELAY_MS=20, CHUNKS (8 sizes)
set -euo pipefail

BENCH_NAME=memory.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
require_tools cargo skopeo docker-registry python3 curl tar
W=$BENCH_DIR/memory
rm -rf "$W/run"
mkdir -p "$W/run"
RUN=$W/run
# Eight images: chunk sizes around the default 1M, as hosts mostly run (a chunk being read is
# held decoded, so bigger chunks cost more; CHUNKS="64K 128K 256K 512K 1M 2M 4M 8M" for a spread).
read -r -a CHUNKS <<<"${CHUNKS:-512K 640K 768K 896K 1M 1152K 1280K 1536K}"
[[ ${#CHUNKS[@]} == 8 ]] || die "CHUNKS names ${#CHUNKS[@]} chunk sizes, not 8"

build_and_trap
read -r PY_LAYOUT PY_TAG < <("$TOOLS" python-layout)
start_registry "$RUN/registry"
skopeo copy -q --insecure-policy --dest-tls-verify=false "oci:$PY_LAYOUT:$PY_TAG" "docker://$REG/bench/python:v1"
for c in "${CHUNKS[@]}"; do
    log "converting the python image with $c chunks"
    "$LAZYCTL" convert --no-progress --chunk-size "$c" "docker://$REG/bench/python:v1" \
        "docker://$REG/bench/python:lazy-$c" >"$RUN/convert-$c.log" 2>&1
done
shape_link "$TOOLS"

# kB of a field of /proc/PID/status.
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
mb() { echo $(($1 / 1024)); }

# The defaults but for what would read beyond the readers: profiles, the whole-image prefetch.
MEMORY_CACHE_MIB=64
start_agent agent "[fetch]\nmemory_cache = \"${MEMORY_CACHE_MIB}M\"\n[profile]\nrecord = false\nprefetch = false\n[background]\nwhole_image = \"never\""
server=$(status_field "s['pid']")
sleep 3
idle_rss=$(status_kb "$server" VmRSS) idle_anon=$(status_kb "$server" RssAnon)
supervisor_rss=$(status_kb "$AGENT_PID" VmRSS)
log "idle: server VmRSS $(mb "$idle_rss") MiB (anon $(mb "$idle_anon")), supervisor $(mb "$supervisor_rss") MiB"

for i in "${!CHUNKS[@]}"; do
    mkdir -p "$RUN/mnt$i"
    ctl mount "$LINK/bench/python:lazy-${CHUNKS[$i]}" "$RUN/mnt$i" >/dev/null
done
sleep 2
mounted_rss=$(status_kb "$server" VmRSS) mounted_anon=$(status_kb "$server" RssAnon)
log "8 mounts, idle: VmRSS $(mb "$mounted_rss") MiB (anon $(mb "$mounted_anon"))"

read_all() {
    local pids=() i
    for i in "${!CHUNKS[@]}"; do
        tar -C "$RUN/mnt$i" -cf - . | wc -c >"$RUN/read$i" &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || die "a reader failed"; done
}
declare -A PEAK
for pass in cold cached; do
    drop_caches
    start_mem_sampler
    t0=$(now)
    read_all
    secs=$(elapsed "$t0")
    stop_mem_sampler
    bytes=$(awk '{ n += $1 } END { print n }' "$RUN"/read*)
    PEAK[$pass]="$PEAK_RSS_MB $PEAK_ANON_MB $PEAK_FILE_MB $secs $bytes"
    log "$pass: 8 readers, $((bytes >> 20)) MiB in $secs s; peak VmRSS $PEAK_RSS_MB MiB (anon $PEAK_ANON_MB, file $PEAK_FILE_MB)"
done
final_rss=$(status_kb "$server" VmRSS) final_anon=$(status_kb "$server" RssAnon) hwm=$(status_kb "$server" VmHWM)
log "after: VmRSS $(mb "$final_rss") MiB (anon $(mb "$final_anon")), VmHWM $(mb "$hwm") MiB"
for i in "${!CHUNKS[@]}"; do ctl umount "$RUN/mnt$i" >/dev/null; done
stop_agent

busy_limit=$((150 + MEMORY_CACHE_MIB))
read -r cold_rss cold_anon cold_file cold_s _ <<<"${PEAK[cold]}"
read -r warm_rss warm_anon warm_file warm_s _ <<<"${PEAK[cached]}"
cat <<TABLE

| state | server VmRSS (MiB) | of it RssAnon | of it RssFile | target |
|---|---:|---:|---:|---|
| idle, no mount | $(mb "$idle_rss") | $(mb "$idle_anon") | $(mb $((idle_rss - idle_anon))) | <= 50 MB |
| 8 mounts, idle | $(mb "$mounted_rss") | $(mb "$mounted_anon") | $(mb $((mounted_rss - mounted_anon))) | |
| 8 readers, cold (peak; ${cold_s} s) | $cold_rss | $cold_anon | $cold_file | <= $busy_limit MiB (150 + memory_cache) |
| 8 readers, cached (peak; ${warm_s} s) | $warm_rss | $warm_anon | $warm_file | <= $busy_limit MiB |
| after | $(mb "$final_rss") | $(mb "$final_anon") | $(mb $((final_rss - final_anon))) | |

supervisor VmRSS: $(mb "$supervisor_rss") MiB; server VmHWM: $(mb "$hwm") MiB; memory_cache: $MEMORY_CACHE_MIB MiB
TABLE

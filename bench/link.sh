# Shared by the bench/*.sh scripts of the shaped link (sourced, not run): the settings of the
# link, a registry on a free loopback port, the link itself (tc htb on the registry's port +
# the harness's delaying proxy), fresh lazyd agents, and small helpers. The sourcing script sets
# BENCH_NAME first and keeps the pids it must stop in PIDS; for the lazyd helpers it also sets
# RUN (a scratch directory), LAZYD and LAZYCTL (the binaries).

BENCH_DIR=${BENCH_DIR:-/var/tmp/lazy-bench}
RATE=${RATE:-1gbit}
RATE_BYTES=${RATE_BYTES:-125000000} # $RATE in bytes/s, for percentages
DELAY_MS=${DELAY_MS:-20}
RUNS=${RUNS:-3}

die() {
    echo "bench/$BENCH_NAME: $*" >&2
    exit 1
}
log() { echo "[bench $(date +%T)] $*" >&2; }

# require_tools TOOL...: root, the repository root, and every TOOL on PATH.
require_tools() {
    [[ $(id -u) == 0 ]] || die "run me as root (tc, FUSE, chroot)"
    [[ -f bench/$BENCH_NAME ]] || die "run me from the repository root"
    for tool in "$@"; do
        command -v "$tool" >/dev/null || die "$tool is not in PATH (run scripts/setup.sh)"
    done
}

# build_and_trap: builds lazyctl, lazyd and bench_tools (release) into LAZYCTL, LAZYD and TOOLS,
# and on exit unmounts $RUN/mnt*, kills the agent and every pid in PIDS and removes the shaping.
build_and_trap() {
    log "building lazyctl, lazyd and the bench tools (release)"
    cargo build --release -q -p tools --bin lazyctl
    cargo build --release -q -p lazyd --bin lazyd
    cargo build --release -q -p lazy-tests --example bench_tools
    local target=${CARGO_TARGET_DIR:-target}
    LAZYCTL=$(realpath "$target/release/lazyctl")
    LAZYD=$(realpath "$target/release/lazyd")
    TOOLS=$(realpath "$target/release/examples/bench_tools")
    PIDS=()
    AGENT_PID=
    trap bench_cleanup EXIT
}
bench_cleanup() {
    set +e
    for m in "$RUN"/mnt*; do mountpoint -q "$m" 2>/dev/null && umount -l "$m"; done
    [[ -n $AGENT_PID ]] && kill -9 "$AGENT_PID" 2>/dev/null
    [[ -n ${MEM_SAMPLER_PID:-} ]] && kill "$MEM_SAMPLER_PID" 2>/dev/null
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    tc qdisc del dev lo root 2>/dev/null
    wait 2>/dev/null
}

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$(now) - $1:.3f}')"; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END{print (NR%2)?a[(NR+1)/2]:(a[NR/2]+a[NR/2+1])/2}'; }
calc() { python3 -c "print(f'{$1}')"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# start_registry DIR: docker-registry on a free 127.0.0.1 port storing into DIR; sets REG.
start_registry() {
    local dir=$1 port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    mkdir -p "$dir"
    cat >"$dir.yml" <<YML
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $dir
http:
  addr: 127.0.0.1:$port
YML
    docker-registry serve "$dir.yml" >"$dir.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done
    REG=127.0.0.1:$port
}

# shape_link TOOLS: limits what the registry sends to $RATE (tc htb on lo) and starts the
# delaying proxy (TOOLS = the bench_tools binary) in front of it; sets LINK (its HOST:PORT).
shape_link() {
    local tools=$1
    tc qdisc del dev lo root 2>/dev/null || true
    tc qdisc add dev lo root handle 1: htb default 1
    tc class add dev lo parent 1: classid 1:1 htb rate 100gbit
    tc class add dev lo parent 1: classid 1:2 htb rate "$RATE" ceil "$RATE"
    tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport "${REG##*:}" 0xffff flowid 1:2
    coproc PROXY { exec "$tools" proxy "$REG" "$DELAY_MS"; }
    PIDS+=("$PROXY_PID")
    read -r LINK <&"${PROXY[0]}"
    log "registry $REG shaped to $RATE, reached through $LINK (+$DELAY_MS ms per request)"
}

# start_agent NAME CONFIG: a fresh lazyd with its own socket, cache and state under $RUN/NAME.
start_agent() {
    local root=$RUN/$1
    rm -rf "$root"
    mkdir -p "$root"
    printf 'socket = "%s/sock"\nstate_dir = "%s/state"\ncache_dir = "%s/cache"\n%b\n' \
        "$root" "$root" "$root" "$2" >"$root/config.toml"
    RUST_LOG=info,fuser::mnt=error "$LAZYD" --config "$root/config.toml" >"$root/log" 2>&1 &
    AGENT_PID=$!
    AGENT_ROOT=$root
    for _ in $(seq 500); do
        [[ -S $root/sock ]] && "$LAZYCTL" --socket "$root/sock" status >/dev/null 2>&1 && return 0
        kill -0 "$AGENT_PID" 2>/dev/null || die "lazyd did not start: $(tail -5 "$root/log")"
        sleep 0.01
    done
    die "lazyd did not answer"
}
stop_agent() {
    kill -TERM "$AGENT_PID"
    wait "$AGENT_PID" || die "lazyd exited with $?"
    AGENT_PID=
    # Its cache is not used again (every case starts empty): a model's worth of disk per case.
    rm -rf "$AGENT_ROOT/cache"
}
ctl() { "$LAZYCTL" --socket "$AGENT_ROOT/sock" "$@"; }

# start_mem_sampler: samples the memory of lazyd's serving process (the status's `pid`, not
# $AGENT_PID, its supervisor) every 50 ms until stop_mem_sampler, which sets PEAK_ANON_MB,
# PEAK_RSS_MB and PEAK_FILE_MB: the peaks of RssAnon (what lazyd allocated), VmRSS and RssFile
# (mapped files) in MiB, each peak on its own.
start_mem_sampler() {
    local server
    server=$(status_field "s['pid']") || die "no server pid in lazyd's status"
    MEM_PEAKS=$AGENT_ROOT/mem-peaks
    rm -f "$MEM_PEAKS"
    python3 - "$server" "$MEM_PEAKS" <<'PY' &
import signal, sys, time
pid, out = sys.argv[1], sys.argv[2]
peak = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
def done(*_):
    with open(out, "w") as f:
        f.write(f"{peak['RssAnon']} {peak['VmRSS']} {peak['RssFile']}\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, done)
while True:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))  # kB
    except (FileNotFoundError, ProcessLookupError):
        done()
    time.sleep(0.05)
PY
    MEM_SAMPLER_PID=$!
}
stop_mem_sampler() {
    local anon rss file
    kill -TERM "$MEM_SAMPLER_PID" 2>/dev/null || true
    wait "$MEM_SAMPLER_PID" 2>/dev/null || true
    MEM_SAMPLER_PID=
    if read -r anon rss file <"$MEM_PEAKS" 2>/dev/null; then
        PEAK_ANON_MB=$((anon / 1024)) PEAK_RSS_MB=$((rss / 1024)) PEAK_FILE_MB=$((file / 1024))
    else
        PEAK_ANON_MB=- PEAK_RSS_MB=- PEAK_FILE_MB=-
    fi
}
status_field() { # status_field PYTHON-EXPR-ON-s: a figure from `lazyctl status --json`
    ctl status --json | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"
}
fetched_bytes() { status_field "sum(b['bytes'] for b in s['metrics']['backends'])"; }

# --- container starts (containers.sh, containerd.sh) -------------------------------------------

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

# lazy_run T0 NAME: `lazyctl run` of $IMAGE (python3 -c "$PY_SCRIPT", with $RUN_ENV, on
# $RUNTIME) through the current agent; prints the seconds from T0 to its first output.
lazy_run() {
    local env=()
    for e in "${RUN_ENV[@]}"; do env+=(-e "$e"); done
    first_output "$1" "$LAZYCTL" --socket "$AGENT_ROOT/sock" run --name "bench-$2" \
        --runtime "$RUNTIME" "${env[@]}" "$IMAGE" -- python3 -c "$PY_SCRIPT"
}

# record_profile: one `lazyctl run` of $IMAGE through a recording lazyd that pushes its profile
# beside the image (the registry keeps it); sets HOT to "BYTES CHUNKS" of the profile.
record_profile() {
    log "recording the image's profile"
    start_agent rec "[profile]\nrecord = true\nwindow = \"15s\"\npush = true\n$LAZYD_EXTRA"
    # The recording ends when the container exits (its lower mount goes) and is pushed then.
    [[ $(lazy_run "$(now)" rec) ]] || die "the recording start failed"
    for _ in $(seq 300); do grep -q "pushed the profile" "$AGENT_ROOT/log" && break; sleep 0.1; done
    grep -q "pushed the profile" "$AGENT_ROOT/log" || die "the profile was not pushed: $(tail -5 "$AGENT_ROOT/log")"
    HOT=$(ctl profile show --json "$IMAGE" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["hot_bytes"], len(r["remote"]["entries"]))')
    stop_agent
}

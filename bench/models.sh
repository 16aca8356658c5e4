#!/usr/bin/env bash
# Model-weight benchmark: loading a sharded safetensors model from S3, lazily through lazyd vs
# download-then-load (results are printed and written to $BENCH_DIR/models/results.md;
# docs/BENCHMARKS.md explains them):
#
#   Garage (a real S3 server, ~/.cargo/bin/garage or $GARAGE) on free 127.0.0.1 ports, single
#   node, its data under $BENCH_DIR/models/run. Its S3 replies are rate-limited to $RATE by tc
#   htb on lo and a delaying TCP proxy (tests/examples/bench_tools.rs) adds $DELAY_MS ms to
#   every request (bench/link.sh). Everything measured talks to the proxy.
#
#   model: `bench_tools make-model`, $SHARDS shards of ~$SHARD_MB MiB (mostly BF16 weights,
#          normal values; tests/src/model.rs), kept in $BENCH_DIR/models/model. Uploaded raw to
#          s3://$BUCKET/raw/model/ (unshaped), then converted (unshaped) into two lazy images:
#            s3://$BUCKET/lazy/model  `lazyctl convert s3://$BUCKET/raw/model/ ...` (compression
#                                     auto: chunks stored compressed only where it pays)
#            s3://$BUCKET/ref/model   the same with --reference (the index points at the raw
#                                     objects in place; no copy of the data)
#   loader ($LOADER), what loads the model in cases a, b, r and x:
#     safe-open  (default) bench/model_loaders.py: the real safetensors package as vLLM's default
#                loader and transformers use it: safe_open (an mmap) then get_tensor for every
#                name in name order, $PROCS shards at once (default 4), one thread each
#     load-file  bench/model_loaders.py: safetensors.numpy.load_file, $PROCS shards at once
#     cat        bench/model_loaders.py: every file read sequentially in 1 MiB reads, $PROCS
#                files at once (a server that copies the weights first)
#     tp         bench/model_loaders.py: $PROCS processes (default 2), each loading its own
#                shards with safe-open (tensor parallelism on one host)
#     offset     `bench_tools model-load`: $PARALLEL shards at once, every tensor read with pread
#                in offset order (the loader of the benchmarks before issue 13)
#   a. download: boto3, all shards at once, 16 ranged parts in flight per file
#      (bench/s3_transfer.py), then the loader over the local copy
#   b. `lazyctl mount s3://$BUCKET/lazy/model MNT` then at once the loader over MNT: time to
#      the first tensor and to the last, from the start of the mount command (a Python loader
#      is started, and has done its imports, before the mount, as a running model server)
#   o. case b with the offset loader (so one run measures both; skipped when LOADER=offset)
#   r. case b for the --reference image
#   x. case b through a lazyd whose disk cache (cache_size) is a quarter of the model: the
#      cache evicts while the model loads
#   h. `lazyctl warm` first (every chunk in lazyd's disk cache), page cache dropped, then case b;
#      beside it the same loader over the model on local disk, page cache dropped
#   w. `lazyctl warm s3://$BUCKET/lazy/model`: throughput against the link rate
#   Every lazyd starts with an empty cache. After the first run of b, o, r and x the mounted
#   model is checked against the source file by file and tensor by tensor (bench_tools
#   compare-model). During every lazy case a sampler reads /proc/PID/status of lazyd's server every
#   50 ms: the table gives the peaks (over the runs) of RssAnon (what lazyd allocated) and of
#   VmRSS, with RssFile (mapped files) beside it.
#
# Usage (as root, from the repository root):  sudo bench/models.sh
# Environment: BENCH_DIR=/var/tmp/lazy-bench, RATE=1gbit, RATE_BYTES=125000000, DELAY_MS=20,
#   RUNS=3, SHARDS=4, SHARD_MB=1024, LOADER=safe-open (above), PROCS (the loader's shards,
#   files or processes at once: 4, 2 for tp), PARALLEL=8 (the offset loader's shards at once),
#   CASES=aborxhw (the cases to run), LAZYD_EXTRA (TOML appended to every lazyd config, e.g.
#   "[background]\nmax_requests = 8" to try a setting), SOURCE=auto|s3|path: what the images are converted from
#   (s3: the raw objects, as the benchmark intends; path: the local model directory, for
#   builds whose lazyctl cannot read an S3 prefix; auto: s3, else path, said in the results).
#   A quick end-to-end check of the script: sudo SHARDS=2 SHARD_MB=64 RUNS=1 bench/models.sh
# Disk: about 4 x the model (the model, Garage's copy of the raw files and of the lazy image,
#   the downloaded copy or lazyd's cache).
set -euo pipefail

BENCH_NAME=models.sh
# shellcheck source=bench/link.sh
source "$(dirname "$0")/link.sh"
SHARDS=${SHARDS:-4}
SHARD_MB=${SHARD_MB:-1024}
PARALLEL=${PARALLEL:-8}
LOADER=${LOADER:-safe-open}
PROCS=${PROCS:-}
CASES=${CASES:-aborxhw}
SOURCE=${SOURCE:-auto}
BUCKET=bench
GARAGE=${GARAGE:-$HOME/.cargo/bin/garage}
VENV_PY=${VENV_PY:-/opt/lazy-venv/bin/python3}
want() { [[ $CASES == *$1* ]]; }
require_tools cargo tc curl python3 openssl "$GARAGE" "$VENV_PY"
"$VENV_PY" -c 'import boto3' 2>/dev/null || die "boto3 missing in $VENV_PY (run scripts/setup.sh)"
case $LOADER in
    offset) CASES=${CASES//o/} ;; # case o would be case b again
    safe-open | load-file | cat | tp)
        "$VENV_PY" -c 'import safetensors, numpy, ml_dtypes' 2>/dev/null ||
            die "safetensors, numpy or ml_dtypes missing in $VENV_PY (run scripts/setup.sh)"
        ;;
    *) die "LOADER=$LOADER: expected offset, safe-open, load-file, cat or tp" ;;
esac

W=$BENCH_DIR/models
RUN=$W/run
MODEL=$W/model
rm -rf "$RUN"
mkdir -p "$RUN"

build_and_trap

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json_field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"{d$2}\")" "$1"; }

# --- the model --------------------------------------------------------------------------------
SPEC="$SHARDS x $SHARD_MB MiB"
if [[ $(cat "$MODEL.spec" 2>/dev/null) != "$SPEC" ]]; then
    log "writing the model ($SPEC) into $MODEL"
    rm -rf "$MODEL" "$MODEL.spec"
    "$TOOLS" make-model "$MODEL" --shards "$SHARDS" --shard-mb "$SHARD_MB" >"$W/make-model.json"
    echo "$SPEC" >"$MODEL.spec"
fi
MODEL_BYTES=$(du -sb --apparent-size "$MODEL" | cut -f1)
MODEL_FILES=$(find "$MODEL" -type f | wc -l)
# Case x's disk cache: a quarter of the model.
SMALL_CACHE=$((MODEL_BYTES / 4))

# load_model LOADER DIR [ARGS...]: loads the model in DIR with LOADER (see the top) and the
# loader's ARGS (--since-epoch-ns T; --ready FILE for the Python loaders); prints its JSON line.
load_model() {
    local loader=$1 dir=$2 procs
    shift 2
    if [[ $loader == offset ]]; then
        "$TOOLS" model-load "$dir" --parallel "$PARALLEL" "$@"
    else
        procs=${PROCS:-$([[ $loader == tp ]] && echo 2 || echo 4)}
        "$VENV_PY" bench/model_loaders.py "$loader" "$dir" --procs "$procs" "$@"
    fi
}
loader_text() { # loader_text LOADER: one line for the results
    local procs=${PROCS:-$([[ $1 == tp ]] && echo 2 || echo 4)}
    case $1 in
        offset) echo "offset: bench_tools model-load, $PARALLEL shards at once, every tensor read (pread) in offset order into memory" ;;
        safe-open) echo "safe-open: safetensors $("$VENV_PY" -c 'import safetensors; print(safetensors.__version__)') safe_open(framework=\"numpy\") + get_tensor in name order (mmap), $procs shards at once (bench/model_loaders.py)" ;;
        load-file) echo "load-file: safetensors.numpy.load_file, $procs shards at once (bench/model_loaders.py)" ;;
        cat) echo "cat: every file read sequentially in 1 MiB reads, $procs files at once (bench/model_loaders.py)" ;;
        tp) echo "tp: $procs processes, each loading its shards one after another with safe-open (bench/model_loaders.py)" ;;
    esac
}

# --- Garage -----------------------------------------------------------------------------------
# start_garage DIR: a single-node Garage storing into DIR, with a fresh RPC secret; sets
# GARAGE_S3 (HOST:PORT of its S3 API) and exports the AWS_* variables of a key that owns
# $BUCKET.
start_garage() {
    local dir=$1 rpc s3 admin node key
    rpc=$(free_port) s3=$(free_port) admin=$(free_port)
    mkdir -p "$dir/meta" "$dir/data"
    cat >"$dir/garage.toml" <<TOML
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
# The benchmark measures the link, not Garage's CPU: store blocks as they come.
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$admin"
TOML
    GARAGE_CONF=$dir/garage.toml
    RUST_LOG=garage=warn "$GARAGE" -c "$GARAGE_CONF" server >"$dir/log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 200); do
        node=$("$GARAGE" -c "$GARAGE_CONF" node id -q 2>/dev/null) && break
        sleep 0.1
    done
    [[ -n ${node:-} ]] || die "garage did not start: $(tail -5 "$dir/log")"
    "$GARAGE" -c "$GARAGE_CONF" layout assign -z dc1 -c 100G "${node%%@*}" >/dev/null
    "$GARAGE" -c "$GARAGE_CONF" layout apply --version 1 >/dev/null
    key=$("$GARAGE" -c "$GARAGE_CONF" key create bench-key)
    AWS_ACCESS_KEY_ID=$(awk '/Key ID:/ {print $NF}' <<<"$key")
    AWS_SECRET_ACCESS_KEY=$(awk '/Secret key:/ {print $NF}' <<<"$key")
    [[ -n $AWS_ACCESS_KEY_ID && -n $AWS_SECRET_ACCESS_KEY ]] || die "no key in: $key"
    "$GARAGE" -c "$GARAGE_CONF" bucket create "$BUCKET" >/dev/null
    "$GARAGE" -c "$GARAGE_CONF" bucket allow --read --write --owner "$BUCKET" --key bench-key >/dev/null
    export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_REGION=garage
    GARAGE_S3=127.0.0.1:$s3
    for _ in $(seq 100); do curl -s -o /dev/null "http://$GARAGE_S3/" && break; sleep 0.1; done
    log "garage $("$GARAGE" --version 2>/dev/null | head -1) at $GARAGE_S3, bucket $BUCKET"
}
start_garage "$RUN/garage"

# --- upload and conversion (unshaped) ---------------------------------------------------------
export AWS_ENDPOINT_URL=http://$GARAGE_S3
log "uploading the raw model to s3://$BUCKET/raw/model/"
"$VENV_PY" bench/s3_transfer.py upload "$MODEL" "s3://$BUCKET/raw/model/" >"$RUN/upload.json"

CONVERTED_FROM=
convert_image() { # convert_image DST [FLAGS...]: converts the model into DST as $SOURCE says
    local dst=$1
    shift
    if [[ $SOURCE != path ]]; then
        if "$LAZYCTL" convert --no-progress "$@" "s3://$BUCKET/raw/model/" "$dst" >>"$RUN/convert.log" 2>&1; then
            CONVERTED_FROM=${CONVERTED_FROM:-s3://$BUCKET/raw/model/}
            return 0
        fi
        [[ $SOURCE == s3 ]] && die "lazyctl convert from s3://$BUCKET/raw/model/ failed: $(tail -3 "$RUN/convert.log")"
        log "this lazyctl cannot convert from an S3 prefix ($(tail -1 "$RUN/convert.log")); converting path:$MODEL instead"
    fi
    "$LAZYCTL" convert --no-progress "$@" "path:$MODEL" "$dst" >>"$RUN/convert.log" 2>&1 ||
        die "lazyctl convert path:$MODEL $dst failed: $(tail -3 "$RUN/convert.log")"
    CONVERTED_FROM="path:$MODEL (the local model directory: this lazyctl could not convert from S3)"
}
t0=$(now)
convert_image "s3://$BUCKET/lazy/model"
CONVERT_S=$(elapsed "$t0")
log "converted s3://$BUCKET/lazy/model in $CONVERT_S s"
REF_NOTE=
if want r; then
    if "$LAZYCTL" convert --help | grep -q -- '--reference'; then
        t0=$(now)
        SOURCE=s3 convert_image "s3://$BUCKET/ref/model" --reference
        REF_CONVERT_S=$(elapsed "$t0")
        log "converted s3://$BUCKET/ref/model (--reference) in $REF_CONVERT_S s"
    else
        REF_NOTE="not run: this lazyctl has no convert --reference"
        log "case r $REF_NOTE"
        CASES=${CASES//r/}
    fi
fi
# Stored bytes of each image (everything under its prefix).
prefix_bytes() {
    "$VENV_PY" - "$1" <<'PY'
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
bucket, _, prefix = sys.argv[1][len("s3://"):].partition("/")
total = 0
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
    total += sum(o["Size"] for o in page.get("Contents", []))
print(total)
PY
}
LAZY_STORED=$(prefix_bytes "s3://$BUCKET/lazy/model")
REF_STORED=-
want r && REF_STORED=$(prefix_bytes "s3://$BUCKET/ref/model")

# --- the shaped link --------------------------------------------------------------------------
REG=$GARAGE_S3 # shape_link shapes $REG's port
shape_link "$TOOLS"
export AWS_ENDPOINT_URL=http://$LINK

# --- the cases --------------------------------------------------------------------------------

# lazy_load CASE IMAGE RUN LOADER [TOP-LEVEL-CONFIG]: mounts IMAGE through a fresh lazyd
# (TOP-LEVEL-CONFIG: lines before its sections, e.g. cache_size) and loads the model at once
# with LOADER; sets FIRST and TOTAL (seconds from the start of the mount command), FETCHED
# (bytes over the link) and lazyd's memory peaks during the mount and load (PEAK_*_MB). The
# first run also checks the mounted model against the source.
lazy_load() {
    local case=$1 image=$2 run=$3 loader=$4 top=${5:-} mnt=$RUN/mnt-$1 t0 load pid
    local ready=$RUN/ready-$1 out=$RUN/load-$1.out
    start_agent "$case" "${top}[profile]\nrecord = false\nprefetch = false\n${LAZYD_EXTRA:-}"
    # Case h loads from a warm cache: every chunk on disk before the mount.
    [[ $case == h ]] && ctl warm --no-progress "$image" >/dev/null
    start_mem_sampler
    mkdir -p "$mnt"
    drop_caches
    if [[ $loader == offset ]]; then
        t0=$(date +%s%N)
        ctl mount "$image" "$mnt" >/dev/null
        load=$(load_model offset "$mnt" --since-epoch-ns "$t0")
    else
        # A Python loader starts first, as a model server is running when its weights appear:
        # its imports are not load time (model_loaders.py --ready).
        rm -f "$ready"
        load_model "$loader" "$mnt" --ready "$ready" >"$out" &
        pid=$!
        PIDS+=("$pid")
        until [[ -e $ready ]]; do
            kill -0 "$pid" 2>/dev/null || die "the $loader loader exited before the mount"
            sleep 0.01
        done
        t0=$(date +%s%N)
        echo "$t0" >"$ready"
        ctl mount "$image" "$mnt" >/dev/null
        wait "$pid" || die "the $loader loader failed over $image"
        load=$(cat "$out")
    fi
    stop_mem_sampler
    echo "$load" >>"$RUN/load-$case.jsonl"
    FIRST=$(json_field "$load" "['first_tensor_s']:.3f")
    # The first tensor's bound (issue 13): 1.5 x its bytes at the link's rate, plus the mount.
    FIRST_BOUND=$(python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(f\"{1.5 * d.get('first_tensor_bytes', 0) / $RATE_BYTES + d.get('mounted_s', 0):.3f}\")" "$load")
    TOTAL=$(json_field "$load" "['total_s']:.3f")
    FETCHED=$(fetched_bytes)
    if [[ $run == 1 ]]; then
        "$TOOLS" compare-model "$MODEL" "$mnt" >"$RUN/compare-$case.json" ||
            die "the model mounted from $image differs from the source"
    fi
    ctl umount "$mnt"
    stop_agent
}

DL=() DL_READ=() DL_SUM=() WARM=() WARM_F=() WARM_MEM=()
B_FIRST=() B_TOTAL=() B_F=() B_MEM=() O_FIRST=() O_TOTAL=() O_F=() O_MEM=()
R_FIRST=() R_TOTAL=() R_F=() R_MEM=() X_FIRST=() X_TOTAL=() X_F=() X_MEM=()
H_FIRST=() H_TOTAL=() H_F=() H_MEM=() LOCAL=()
B_BOUND=() O_BOUND=() R_BOUND=() X_BOUND=() H_BOUND=()
# record CASE: appends the last lazy_load's figures to CASE's arrays (MEM: "ANON RSS FILE" MiB).
record() {
    local -n first=$1_FIRST total=$1_TOTAL fetched=$1_F mem=$1_MEM bound=$1_BOUND
    first+=("$FIRST") total+=("$TOTAL") fetched+=("$FETCHED") mem+=("$PEAK_ANON_MB $PEAK_RSS_MB $PEAK_FILE_MB")
    bound+=("$FIRST_BOUND")
}
for run in $(seq "$RUNS"); do
    if want a; then
        log "run $run/$RUNS: a. download (boto3) then load"
        rm -rf "$RUN/download"
        drop_caches
        dl=$("$VENV_PY" bench/s3_transfer.py download "s3://$BUCKET/raw/model/" "$RUN/download")
        load=$(load_model "$LOADER" "$RUN/download")
        DL+=("$(json_field "$dl" "['seconds']:.3f")")
        DL_READ+=("$(json_field "$load" "['total_s']:.3f")")
        DL_SUM+=("$(calc "${DL[-1]} + ${DL_READ[-1]}:.3f")")
        if [[ $run == 1 ]]; then
            "$TOOLS" compare-model "$MODEL" "$RUN/download" >"$RUN/compare-a.json" ||
                die "the downloaded model differs from the source"
        fi
        rm -rf "$RUN/download"
    fi
    if want b; then
        log "run $run/$RUNS: b. lazyctl mount s3://$BUCKET/lazy/model, then load ($LOADER)"
        lazy_load b "s3://$BUCKET/lazy/model" "$run" "$LOADER"
        record B
    fi
    if want o; then
        log "run $run/$RUNS: o. lazyctl mount s3://$BUCKET/lazy/model, then load (offset)"
        lazy_load o "s3://$BUCKET/lazy/model" "$run" offset
        record O
    fi
    if want r; then
        log "run $run/$RUNS: r. lazyctl mount s3://$BUCKET/ref/model (--reference), then load ($LOADER)"
        lazy_load r "s3://$BUCKET/ref/model" "$run" "$LOADER"
        record R
    fi
    if want x; then
        log "run $run/$RUNS: x. case b with cache_size = $SMALL_CACHE (a quarter of the model)"
        lazy_load x "s3://$BUCKET/lazy/model" "$run" "$LOADER" "cache_size = $SMALL_CACHE\n"
        record X
    fi
    if want h; then
        log "run $run/$RUNS: h. lazyctl warm, then mount + load from the warm cache ($LOADER); the same load from local disk"
        lazy_load h "s3://$BUCKET/lazy/model" "$run" "$LOADER"
        record H
        drop_caches
        load=$(load_model "$LOADER" "$MODEL")
        LOCAL+=("$(json_field "$load" "['total_s']:.3f")")
    fi
    if want w; then
        log "run $run/$RUNS: w. lazyctl warm"
        start_agent w "[profile]\nrecord = false\nprefetch = false\n${LAZYD_EXTRA:-}"
        start_mem_sampler
        drop_caches
        t0=$(now)
        ctl warm --no-progress "s3://$BUCKET/lazy/model" >/dev/null
        WARM+=("$(elapsed "$t0")")
        stop_mem_sampler
        WARM_F+=("$(fetched_bytes)")
        WARM_MEM+=("$PEAK_ANON_MB $PEAK_RSS_MB $PEAK_FILE_MB")
        stop_agent
    fi
done

# --- summary ----------------------------------------------------------------------------------
med() { if (($#)); then median "$@"; else echo -; fi; }
pylist() { local IFS=,; echo "[$*]"; } # pylist ITEMS...: a Python list literal
verdict() { # verdict PYTHON-CONDITION (with "-" for cases not run)
    if [[ $1 == *" - "* || $1 == "- "* || $1 == *" -" ]]; then echo "not run"; else python3 -c "print('met' if $1 else 'MISSED')"; fi
}
mDL=$(med "${DL[@]}")
mDLR=$(med "${DL_READ[@]}")
mDLS=$(med "${DL_SUM[@]}")
mW=$(med "${WARM[@]}")
mWB=$(med "${WARM_F[@]}")
mBF=$(med "${B_FIRST[@]}") mBT=$(med "${B_TOTAL[@]}") mBB=$(med "${B_F[@]}")
mOF=$(med "${O_FIRST[@]}") mOT=$(med "${O_TOTAL[@]}") mOB=$(med "${O_F[@]}")
mRF=$(med "${R_FIRST[@]}") mRT=$(med "${R_TOTAL[@]}") mRB=$(med "${R_F[@]}")
mXF=$(med "${X_FIRST[@]}") mXT=$(med "${X_TOTAL[@]}") mXB=$(med "${X_F[@]}")
mHF=$(med "${H_FIRST[@]}") mHT=$(med "${H_TOTAL[@]}") mHB=$(med "${H_F[@]}") mL=$(med "${LOCAL[@]}")
pct() { # pct BYTES SECONDS: BYTES/SECONDS as % of the link rate
    if [[ $1 == - || $2 == - ]]; then echo -; else echo "$(calc "100 * $1 / $2 / $RATE_BYTES:.0f") %"; fi
}
ratio() { if [[ $1 == - || $2 == - ]]; then echo -; else calc "$1 / $2:.2f"; fi; }
# mem SAMPLES...: the "ANON | RSS (file FILE)" cells of a case, each the peak over its runs'
# samples ("ANON RSS FILE" in MiB, or "- - -").
mem() {
    printf '%s\n' "$@" | awk '$1 != "-" && NF == 3 { for (i = 1; i <= 3; i++) if ($i > m[i]) m[i] = $i; n++ }
        END { if (n) printf "%d | %d (file %d)\n", m[1], m[2], m[3]; else print "- | -" }'
}
O_NOTE=
[[ $LOADER == offset ]] && O_NOTE=" (not run: LOADER=offset makes it case b)"
X_CHECK="not run"
[[ -s $RUN/compare-x.json ]] && X_CHECK="compare-model $(cat "$RUN/compare-x.json")"

cat <<EOF | tee "$W/results.md"
Model-weight benchmark (bench/models.sh), $(date -u +%F), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')
link: Garage's S3 replies shaped to $RATE (tc htb on lo), +$DELAY_MS ms per request (delaying proxy); median of $RUNS runs; every lazyd starts empty; page cache dropped before each case
model: $MODEL_FILES files, $MODEL_BYTES bytes ($SHARDS safetensors shards of ~$SHARD_MB MiB, BF16-heavy, tests/src/model.rs); lazy image: $LAZY_STORED bytes stored (converted from $CONVERTED_FROM in $CONVERT_S s); reference image: $REF_STORED bytes stored${REF_NOTE:+ ($REF_NOTE)}
loader (a, b, r, x): $(loader_text "$LOADER")
loader (o): $(loader_text offset)
lazyd memory: peaks over the runs of RssAnon and VmRSS (RssFile in brackets), MiB, sampled every 50 ms from the mount command to the end of the load

| case | first tensor (s) | total (s) | bytes over the link | link utilisation | lazyd peak anon MB | lazyd peak RSS MB |
|---|---|---|---|---|---|---|
| a. boto3 download (16 parts in flight per file, all files at once), then load | - | $mDLS (download $mDL + load $mDLR) | $MODEL_BYTES | $(pct "$MODEL_BYTES" "$mDL") during the download | - | - |
| b. \`lazyctl mount\` + load, from the mount command's start | $mBF | $mBT | $mBB | $(pct "$MODEL_BYTES" "$mBT") (model bytes / total) | $(mem "${B_MEM[@]}") |
| o. case b with the offset loader$O_NOTE | $mOF | $mOT | $mOB | $(pct "$MODEL_BYTES" "$mOT") | $(mem "${O_MEM[@]}") |
| r. case b, --reference image | $mRF | $mRT | $mRB | $(pct "$MODEL_BYTES" "$mRT") | $(mem "${R_MEM[@]}") |
| x. case b, disk cache of a quarter of the model ($SMALL_CACHE bytes) | $mXF | $mXT ($(ratio "$mXT" "$mBT") x case b) | $mXB | $(pct "$MODEL_BYTES" "$mXT") | $(mem "${X_MEM[@]}") |
| h. every chunk in lazyd's disk cache (\`lazyctl warm\` before), \`lazyctl mount\` + load | $mHF | $mHT ($(ratio "$mHT" "$mL") x the same load from local disk, $mL s) | $mHB | - | $(mem "${H_MEM[@]}") |
| w. \`lazyctl warm\` | - | $mW | $mWB | $(pct "$mWB" "$mW") (bytes over the link / time) | $(mem "${WARM_MEM[@]}") |

targets (issue 13):
- first tensor <= 1.5 x its bytes at the link's rate + the mount (per run, b): first ${B_FIRST[*]} s, bound ${B_BOUND[*]} s: $(verdict "all(f <= b for f, b in zip($(pylist "${B_FIRST[@]}"), $(pylist "${B_BOUND[@]}")))")
- total through the mount <= 1.02 x the pure download ($mDL s): b $(ratio "$mBT" "$mDL")x $(verdict "$mBT <= 1.02 * $mDL"), r $(ratio "$mRT" "$mDL")x $(verdict "$mRT <= 1.02 * $mDL")
- link utilisation >= 95 %: b $(pct "$MODEL_BYTES" "$mBT") $(verdict "$MODEL_BYTES / $mBT / $RATE_BYTES >= 0.95")
- lazyd peak anonymous memory <= 150 MB + the memory cache (64 MiB): b $(mem "${B_MEM[@]}" | cut -d' ' -f1) MiB $(verdict "$(mem "${B_MEM[@]}" | cut -d' ' -f1) * 1.048576 <= 150 + 67.1")
- warm cache vs local disk <= 1.05 x: h $(ratio "$mHT" "$mL")x $(verdict "$mHT <= 1.05 * $mL")
- offset loader (o) and warm (w): no slower than before (compare with docs/BENCHMARKS.md)
- over budget (x): total $(ratio "$mXT" "$mBT")x case b, the model through the small cache checked against the source: $X_CHECK
- runs: a ${DL[*]} + ${DL_READ[*]} s | b first ${B_FIRST[*]} total ${B_TOTAL[*]} s | h ${H_TOTAL[*]} s, local ${LOCAL[*]} s | o first ${O_FIRST[*]} total ${O_TOTAL[*]} s | r first ${R_FIRST[*]} total ${R_TOTAL[*]} s | x first ${X_FIRST[*]} total ${X_TOTAL[*]} s | w ${WARM[*]} s
EOF

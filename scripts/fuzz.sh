#!/usr/bin/env bash
# Fuzzes every parser of untrusted input with cargo-fuzz. The targets (fuzz/fuzz_targets/, each
# saying at its top what it feeds and what it checks): index_open (the image index),
# safetensors_header, oci_manifest (lazy manifests, OCI indexes, referrers lists),
# image_config, www_authenticate, token_response (registry tokens), profile_json (hot-chunk
# profiles), s3_keys (S3 listing keys as paths), tar_layer (layer tar streams), pax_records.
# Each starts from fuzz/corpus/TARGET, seeded with real inputs (fuzz/seeds.py, and an index,
# a manifest and a config from a real conversion), with a dictionary from fuzz/dict/ where one
# helps.
#
#   scripts/fuzz.sh [SECONDS]      The short run CI makes (default 60): index_open for SECONDS,
#                                  every other target for SECONDS/12 (at least 2 s). Stops at
#                                  the first crash.
#   scripts/fuzz.sh --each SECONDS [TARGET...]
#                                  The long run (docs/BENCHMARKS.md: --each 600): each target
#                                  (default: all) for SECONDS, one after another, logged to
#                                  fuzz/logs/TARGET.log; then a table per target of runs,
#                                  coverage (libFuzzer's cov and ft), corpus entries and crashes.
#                                  A crash does not stop the other targets; the exit status is 1
#                                  if any target crashed.
#
# A crash leaves its input in fuzz/artifacts/TARGET/; replay it with
#   cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET artifacts/TARGET/crash-...
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

all_targets=(index_open safetensors_header oci_manifest image_config www_authenticate
    token_response profile_json s3_keys tar_layer pax_records)
# Largest input per target: room for a small tree's index or a layer of a few files; the text
# inputs are far smaller.
declare -A max_len=(
    [index_open]=65536 [safetensors_header]=4096 [oci_manifest]=8192 [image_config]=8192
    [www_authenticate]=1024 [token_response]=2048 [profile_json]=8192 [s3_keys]=4096
    [tar_layer]=65536 [pax_records]=8192
)
declare -A dict=(
    [oci_manifest]=json [image_config]=json [token_response]=json [profile_json]=json
    [www_authenticate]=www_authenticate [s3_keys]=s3_keys [tar_layer]=tar [pax_records]=tar
)

mode=short
seconds=60
targets=("${all_targets[@]}")
case "${1:-}" in
    --each)
        mode=long
        seconds=${2:?usage: scripts/fuzz.sh --each SECONDS [TARGET...]}
        shift 2
        if [ $# -gt 0 ]; then
            targets=("$@")
        fi
        ;;
    "") ;;
    *) seconds=$1 ;;
esac
for t in "${targets[@]}"; do
    if [ -z "${max_len[$t]:-}" ]; then
        echo "fuzz.sh: no fuzz target $t (targets: ${all_targets[*]})" >&2
        exit 2
    fi
done

# The seeds' converter: the release build scripts/setup.sh made (the same command, run before
# RUSTC_BOOTSTRAP is set, so nothing is rebuilt; `cargo run --release -p tools` here rebuilt every
# dependency, ~10 min on 2 cores).
cargo build -q --release --workspace --bins
lazyctl=$(realpath "${CARGO_TARGET_DIR:-target}/release/lazyctl")
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

python3 fuzz/seeds.py fuzz/corpus
# The index, lazy manifest and config of a real conversion.
seed_store=$(mktemp -d)
trap 'rm -rf "$seed_store"' EXIT
mkdir -p "$seed_store/src/d" && echo hello > "$seed_store/src/d/f" && ln -s f "$seed_store/src/d/l"
"$lazyctl" convert --no-progress \
    "path:$seed_store/src" "dir:$seed_store/store" >/dev/null
blob() { echo "$seed_store/store/blobs/sha256/${1#sha256:}"; }
manifest=$(blob "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
    "$seed_store/store/index.json")")
read -r index config < <(python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))
print(m["layers"][0]["digest"], m["config"]["digest"])' "$manifest")
mkdir -p fuzz/corpus/index_open
cp "$(blob "$index")" fuzz/corpus/index_open/seed-small-tree
cp "$manifest" fuzz/corpus/oci_manifest/seed-lazy-manifest
cp "$(blob "$config")" fuzz/corpus/image_config/seed-directory-config

cd fuzz
# Every target at once: the dependencies build once and the targets link in parallel.
cargo fuzz build

# fuzz TARGET SECONDS [LIBFUZZER_ARGS...]
fuzz() {
    local target=$1 secs=$2
    shift 2
    local args=(-max_total_time="$secs" -max_len="${max_len[$target]}" -timeout=10 "$@")
    if [ -n "${dict[$target]:-}" ]; then
        args+=(-dict="dict/${dict[$target]}.dict")
    fi
    cargo fuzz run "$target" "corpus/$target" -- "${args[@]}"
}

if [ "$mode" = short ]; then
    for t in "${targets[@]}"; do
        case $t in
            index_open) secs=$seconds ;;
            *) secs=$((seconds / 12 > 2 ? seconds / 12 : 2)) ;;
        esac
        fuzz "$t" "$secs"
    done
    exit 0
fi

mkdir -p logs
rows=()
crashed=0
for t in "${targets[@]}"; do
    log=logs/$t.log
    echo "fuzz.sh: $t for $seconds s (log: fuzz/$log)"
    status=0
    fuzz "$t" "$seconds" -print_final_stats=1 >"$log" 2>&1 || status=$?
    runs=$(awk '/^stat::number_of_executed_units:/ { print $2 }' "$log" | tail -1)
    cov=$(grep -o ' cov: [0-9]*' "$log" | tail -1 | awk '{ print $2 }')
    ft=$(grep -o ' ft: [0-9]*' "$log" | tail -1 | awk '{ print $2 }')
    corpus=$(find "corpus/$t" -type f | wc -l)
    if [ "$status" = 0 ]; then
        result=0
    else
        crashed=1
        artifact=$(grep -o 'artifacts/[^ ]*' "$log" | tail -1 || true)
        result="1 (exit $status${artifact:+, $artifact})"
    fi
    rows+=("$t|$seconds|${runs:-?}|${cov:-?}|${ft:-?}|$corpus|$result")
done
printf '\n%-20s %8s %12s %7s %7s %8s  %s\n' target seconds runs cov ft corpus crashes
for row in "${rows[@]}"; do
    IFS='|' read -r t s r c f n x <<<"$row"
    printf '%-20s %8s %12s %7s %7s %8s  %s\n' "$t" "$s" "$r" "$c" "$f" "$n" "$x"
done
exit "$crashed"

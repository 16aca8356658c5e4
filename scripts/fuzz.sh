#!/usr/bin/env bash
# Runs the index-reader fuzz target for N seconds (default 60), seeded with real indexes, then
# the safetensors header parser's for half as long, seeded with a small valid header.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
# The seed's converter: the release build scripts/setup.sh made (the same command, run before
# RUSTC_BOOTSTRAP is set, so nothing is rebuilt; `cargo run --release -p tools` here rebuilt every
# dependency, ~10 min on 2 cores).
cargo build -q --release --workspace --bins
lazyctl=$(realpath "${CARGO_TARGET_DIR:-target}/release/lazyctl")
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
corpus=fuzz/corpus/index_open
mkdir -p "$corpus"
# Seed with the index of a real conversion so the fuzzer starts from valid structure.
seed_store=$(mktemp -d)
trap 'rm -rf "$seed_store"' EXIT
mkdir -p "$seed_store/src/d" && echo hello > "$seed_store/src/d/f" && ln -s f "$seed_store/src/d/l"
"$lazyctl" convert --no-progress \
    "path:$seed_store/src" "dir:$seed_store/store" >/dev/null
index=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["layers"][0]["digest"][7:])' \
    "$seed_store/store/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$seed_store/store/index.json")")
cp "$seed_store/store/blobs/sha256/$index" "$corpus/seed-small-tree"
cd fuzz
cargo fuzz run index_open "corpus/index_open" -- -max_total_time="$seconds" -max_len=65536
st_corpus=corpus/safetensors_header
mkdir -p "$st_corpus"
# Eight bytes of file size, then a file's first bytes: the length prefix and the JSON.
python3 -c 'import struct,sys
j=b"{\"__metadata__\":{\"format\":\"pt\"},\"w\":{\"dtype\":\"BF16\",\"shape\":[2,2],\"data_offsets\":[0,8]}}"
sys.stdout.buffer.write(struct.pack("<QQ", 16+len(j), len(j)) + j)' > "$st_corpus/seed-one-tensor"
cargo fuzz run safetensors_header "$st_corpus" -- -max_total_time="$(( (seconds + 1) / 2 ))" -max_len=4096

#!/usr/bin/env bash
# Runs the index-reader fuzz target for N seconds (default 60), seeded with real indexes.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP=1 enables them on the stable toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
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
cargo run -q --release -p tools --bin lazyctl -- convert --no-progress \
    "path:$seed_store/src" "dir:$seed_store/store" >/dev/null
index=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(m["layers"][0]["digest"][7:])' \
    "$seed_store/store/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$seed_store/store/index.json")")
cp "$seed_store/store/blobs/sha256/$index" "$corpus/seed-small-tree"
cd fuzz
cargo fuzz run index_open "corpus/index_open" -- -max_total_time="$seconds" -max_len=65536

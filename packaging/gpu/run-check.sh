#!/usr/bin/env bash
# Runs check-model-load.py against a lazy image on a host without network (see README.md):
# starts a private lazyd (socket, state and cache in a temporary directory), mounts IMAGE,
# runs the check with the mount and LOCAL_DIR (the same model on a local disk), then unmounts,
# stops what it started and removes the temporary directory, on success, failure or Ctrl-C.
#
#   run-check.sh [--s3-standin] IMAGE LOCAL_DIR [CHECK ARGS...]
#
#   IMAGE          a lazy image of the model: dir:STORE[:TAG] (a store converted beforehand,
#                  e.g. `lazyctl convert path:MODEL dir:STORE:model`, and carried to the host),
#                  or s3://BUCKET/PREFIX with AWS_ENDPOINT_URL etc. pointing at an S3 server
#   --s3-standin   IMAGE must be dir:...: start moto_server (a local S3 stand-in, from
#                  $MOTO_SERVER or /opt/lazy-venv/bin/moto_server) on a free loopback port,
#                  `lazyctl push` the image into s3://models/model there and mount that, so the
#                  S3 backend is exercised. moto is slow (Python): figures are then no measure
#                  of S3 throughput, only of correctness.
#   CHECK ARGS     passed to check-model-load.py (e.g. --device cpu, --drop-caches)
#
# Environment: LAZYD, LAZYCTL (default: target/release/ of this checkout, else PATH),
#   PYTHON (default python3: the one with torch and safetensors), KEEP=1 keeps the temporary
#   directory (lazyd's log) for a look afterwards.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
die() {
    echo "run-check: $*" >&2
    exit 2
}

STANDIN=false
if [[ ${1:-} == --s3-standin ]]; then
    STANDIN=true
    shift
fi
(($# >= 2)) || die "usage: run-check.sh [--s3-standin] IMAGE LOCAL_DIR [CHECK ARGS...]"
IMAGE=$1 LOCAL=$2
shift 2
[[ -d $LOCAL ]] || die "$LOCAL: not a directory"
[[ $(id -u) == 0 ]] || die "run me as root (lazyd mounts with FUSE)"
[[ -e /dev/fuse ]] || die "/dev/fuse is missing: modprobe fuse"

find_bin() { # find_bin NAME VAR: $VAR, else target/release/NAME of this checkout, else PATH
    local override=${!2:-}
    if [[ -n $override ]]; then
        echo "$override"
    elif [[ -x $REPO/target/release/$1 ]]; then
        echo "$REPO/target/release/$1"
    elif [[ -n ${CARGO_TARGET_DIR:-} && -x $CARGO_TARGET_DIR/release/$1 ]]; then
        echo "$CARGO_TARGET_DIR/release/$1"
    elif command -v "$1" >/dev/null; then
        command -v "$1"
    else
        die "$1 not found: build it (cargo build --release) or set $2"
    fi
}
LAZYD=$(find_bin lazyd LAZYD)
LAZYCTL=$(find_bin lazyctl LAZYCTL)
PYTHON=${PYTHON:-python3}

TMP=$(mktemp -d /tmp/lazy-gpu-check.XXXXXX)
MNT=$TMP/mnt
AGENT_PID= MOTO_PID=
cleanup() {
    set +e
    mountpoint -q "$MNT" 2>/dev/null && { "$LAZYCTL" --socket "$TMP/sock" umount "$MNT" || umount -l "$MNT"; }
    if [[ -n $AGENT_PID ]]; then
        kill -TERM "$AGENT_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$AGENT_PID" 2>/dev/null
    fi
    [[ -n $MOTO_PID ]] && kill "$MOTO_PID" 2>/dev/null
    mountpoint -q "$MNT" 2>/dev/null && umount -l "$MNT"
    wait 2>/dev/null
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "run-check: kept $TMP (lazyd.log)" >&2
    else
        rm -rf "$TMP"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

if $STANDIN; then
    [[ $IMAGE == dir:* ]] || die "--s3-standin takes a dir: image to push"
    MOTO=${MOTO_SERVER:-/opt/lazy-venv/bin/moto_server}
    [[ -x $MOTO ]] || die "--s3-standin: no moto_server at $MOTO (set MOTO_SERVER)"
    port=$(free_port)
    "$MOTO" -H 127.0.0.1 -p "$port" >"$TMP/moto.log" 2>&1 &
    MOTO_PID=$!
    for _ in $(seq 300); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.1; done
    export AWS_ENDPOINT_URL=http://127.0.0.1:$port AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1
    # moto accepts any credentials; the bucket is made with a plain PUT (no SDK needed).
    curl -sf -X PUT "$AWS_ENDPOINT_URL/models" >/dev/null || die "cannot create the bucket in moto: $(tail -3 "$TMP/moto.log")"
    "$LAZYCTL" push "$IMAGE" s3://models/model >"$TMP/push.log" 2>&1 || die "lazyctl push failed: $(tail -3 "$TMP/push.log")"
    IMAGE=s3://models/model
fi

printf 'socket = "%s/sock"\nstate_dir = "%s/state"\ncache_dir = "%s/cache"\n' "$TMP" "$TMP" "$TMP" >"$TMP/lazyd.toml"
RUST_LOG=${RUST_LOG:-info,fuser::mnt=error} "$LAZYD" --config "$TMP/lazyd.toml" >"$TMP/lazyd.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 500); do
    [[ -S $TMP/sock ]] && "$LAZYCTL" --socket "$TMP/sock" status >/dev/null 2>&1 && break
    kill -0 "$AGENT_PID" 2>/dev/null || die "lazyd did not start: $(tail -5 "$TMP/lazyd.log")"
    sleep 0.02
done
mkdir -p "$MNT"
"$LAZYCTL" --socket "$TMP/sock" mount "$IMAGE" "$MNT" >/dev/null || die "mount failed: $(tail -5 "$TMP/lazyd.log")"
echo "run-check: $IMAGE mounted at $MNT by lazyd $AGENT_PID" >&2

set +e
"$PYTHON" "$HERE/check-model-load.py" --mounted "$MNT" --local "$LOCAL" "$@"
rc=$?
set -e
"$LAZYCTL" --socket "$TMP/sock" status >"$TMP/status.txt" 2>&1 && grep -i -E 'fetch|bytes' "$TMP/status.txt" | head -5 >&2
exit "$rc"

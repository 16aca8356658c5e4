#!/usr/bin/env python3
"""Model loaders as model servers run them, for bench/models.sh and tests/tests/model_loaders.rs:
the real `safetensors` package (with numpy, no GPU) over a directory of `.safetensors` shards.
Run it with /opt/lazy-venv/bin/python3, where scripts/setup.sh installs safetensors, numpy and
ml_dtypes.

Usage: model_loaders.py MODE DIR [--procs N] [--since-epoch-ns T | --ready FILE] [--digests FILE]

Modes (every one reads every byte of every tensor, or of every file for `cat`):
  safe-open  as vLLM's default loader and transformers read a checkpoint:
             `safetensors.safe_open(shard, framework="numpy")`, then
             `for name in f.keys(): f.get_tensor(name)`; keys() is name order and safetensors
             mmaps the shard, so the reads are page faults in name order, not offset order.
             All shards at once, one thread each (or N at once with --procs N).
  load-file  `safetensors.numpy.load_file(shard)` (the whole shard into a dict; in safetensors
             0.8 that is safe_open + get_tensors over the same mmap), shards at once as for
             safe-open.
  cat        a model server that copies the weights first: every file of DIR (subdirectories
             included) read sequentially in 1 MiB reads, all files at once (or N at once).
  tp         tensor parallelism on one host: N processes (--procs, default 2), process i loading
             shards i, i+N, ... one after another with safe-open.

It prints one JSON line, as `bench_tools model-load` does: mode, shards, files, workers,
tensors, bytes (tensor bytes; file bytes for cat), mounted_s (when DIR was a mount point, with
--ready), first_tensor_s and first_tensor_bytes (that tensor's size), total_s, loader_s,
gib_per_s. first_tensor_s is when the first non-empty tensor was in memory: for safe-open and
tp the first get_tensor, for load-file the first load_file to return (nothing is usable
before), for cat the first shard read to its end (the earliest a copying server can load one).
Times count from T (nanoseconds since the epoch, e.g. taken just before `lazyctl mount`) if
given, else from the loader's start (imports done).

--ready FILE runs the loader as a model server runs, already started when its weights appear:
after the imports (half a second of numpy and safetensors on a busy host, which would otherwise
count as load time) it creates FILE and waits until DIR is a mount point; the caller writes T
into FILE before it mounts, and the loader reads it from there once the mount is up.

--digests FILE writes a JSON object of the sha256 of everything read: tensor name -> hex of its
bytes (all modes but cat; a name seen in two shards is an error), or for cat the file's path
relative to DIR -> hex of its bytes.

BF16: numpy has no bfloat16, and safetensors' numpy framework asks numpy for a "bfloat16"
dtype, so without help every BF16 tensor fails with "data type 'bfloat16' not understood"
(safetensors 0.8). Importing ml_dtypes (the bfloat16 numpy dtype JAX uses) registers it, and the
package's own path then reads BF16 as it reads every other dtype; nothing here parses headers.
"""

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16": see the module documentation)
import numpy as np
import safetensors
from safetensors import safe_open
from safetensors.numpy import load_file

READ_SIZE = 1 << 20  # cat's read size: what `cp` and most copy loops use on a file system
PAGE = 4096  # one touched byte per page reads every page of a tensor still backed by the mmap


class Loaded:
    """What one worker read: first_ns (epoch ns of its first non-empty tensor, or None), bytes,
    tensors and, when asked, the digests."""

    def __init__(self, want_digests):
        self.first_ns = None
        self.first_bytes = 0
        self.bytes = 0
        self.tensors = 0
        self.digests = {} if want_digests else None

    def first(self, ns, size):
        if self.first_ns is None or ns < self.first_ns:
            self.first_ns = ns
            self.first_bytes = size

    def tensor(self, name, array):
        """Counts one tensor in memory, reading every page of it, and digests it if asked."""
        raw = array.reshape(-1).view(np.uint8)
        if raw.size:
            # get_tensor copies out of the mmap in safetensors 0.8; should a version hand back a
            # view of the mapping instead, this still reads every page of it.
            int(raw[::PAGE].sum())
            self.first(time.time_ns(), raw.size)
        self.bytes += raw.size
        self.tensors += 1
        if self.digests is not None:
            if name in self.digests:
                raise SystemExit(f"model_loaders.py: tensor {name} is in two shards")
            self.digests[name] = hashlib.sha256(raw).hexdigest()

    def merge(self, other):
        if other.first_ns is not None:
            self.first(other.first_ns, other.first_bytes)
        self.bytes += other.bytes
        self.tensors += other.tensors
        if self.digests is not None:
            for name, digest in other.digests.items():
                if name in self.digests:
                    raise SystemExit(f"model_loaders.py: tensor {name} is in two shards")
                self.digests[name] = digest


def safe_open_shard(path, want_digests):
    loaded = Loaded(want_digests)
    with safe_open(path, framework="numpy") as f:
        for name in f.keys():
            loaded.tensor(name, f.get_tensor(name))
    return loaded


def load_file_shard(path, want_digests):
    loaded = Loaded(want_digests)
    tensors = load_file(path)
    for name in sorted(tensors):
        loaded.tensor(name, tensors[name])
    return loaded


def cat_file(path, rel, want_digests):
    loaded = Loaded(want_digests)
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(READ_SIZE):
            loaded.bytes += len(chunk)
            if want_digests:
                digest.update(chunk)
    if path.endswith(".safetensors"):
        loaded.first(time.time_ns(), loaded.bytes)
    if want_digests:
        loaded.digests[rel] = digest.hexdigest()
    return loaded


def tp_rank(shards, want_digests):
    """One process of `tp`: its shards one after another, with safe-open."""
    loaded = Loaded(want_digests)
    for path in shards:
        loaded.merge(safe_open_shard(path, want_digests))
    return loaded


def list_files(root):
    """Every file under root, as (absolute path, path relative to root), sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            out.append((path, os.path.relpath(path, root)))
    out.sort(key=lambda p: p[1])
    return out


def run_threads(fn, jobs, workers, want_digests):
    total = Loaded(want_digests)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for loaded in pool.map(lambda job: fn(*job, want_digests), jobs):
            total.merge(loaded)
    return total


def main():
    parser = argparse.ArgumentParser(
        description="Load a safetensors model directory as model servers do (see the source)."
    )
    parser.add_argument("mode", choices=["safe-open", "load-file", "cat", "tp"])
    parser.add_argument("dir")
    parser.add_argument(
        "--procs",
        type=int,
        help="tp: processes (default 2); the other modes: shards (files) at once (default all)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--since-epoch-ns", type=int)
    start.add_argument("--ready", help="wait for DIR to be mounted (see the source)")
    parser.add_argument("--digests", help="write the sha256 of everything read to this file")
    args = parser.parse_args()
    if args.procs is not None and args.procs < 1:
        parser.error("--procs must be at least 1")
    if args.ready:
        open(args.ready, "w").close()
        while not os.path.ismount(args.dir):
            time.sleep(0.001)
        mounted_ns = time.time_ns()
        with open(args.ready) as f:
            args.since_epoch_ns = int(f.read())
    start_ns = args.since_epoch_ns or time.time_ns()
    if not args.ready:
        mounted_ns = start_ns
    loader_start = time.monotonic()
    want_digests = args.digests is not None

    files = list_files(args.dir)
    shards = [path for path, rel in files if rel.endswith(".safetensors")]
    if not shards:
        sys.exit(f"model_loaders.py: no .safetensors files in {args.dir}")
    if args.mode == "safe-open":
        workers = args.procs or len(shards)
        loaded = run_threads(safe_open_shard, [(s,) for s in shards], workers, want_digests)
    elif args.mode == "load-file":
        workers = args.procs or len(shards)
        loaded = run_threads(load_file_shard, [(s,) for s in shards], workers, want_digests)
    elif args.mode == "cat":
        workers = args.procs or len(files)
        loaded = run_threads(cat_file, files, workers, want_digests)
    else:
        workers = min(args.procs or 2, len(shards))
        # fork: the children inherit the imports (no second start-up of numpy per process),
        # and nothing runs in a thread yet.
        context = multiprocessing.get_context("fork")
        loaded = Loaded(want_digests)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            ranks = [pool.submit(tp_rank, shards[i::workers], want_digests) for i in range(workers)]
            for rank in ranks:
                loaded.merge(rank.result())
    end_ns = time.time_ns()

    if want_digests:
        with open(args.digests, "w") as f:
            json.dump(loaded.digests, f, indent=0, sort_keys=True)
    total_s = (end_ns - start_ns) / 1e9
    print(
        json.dumps(
            {
                "mode": args.mode,
                "dir": args.dir,
                "shards": len(shards),
                "files": len(files),
                "workers": workers,
                "tensors": None if args.mode == "cat" else loaded.tensors,
                "bytes": loaded.bytes,
                "from": "since-epoch-ns" if args.since_epoch_ns else "loader start",
                "mounted_s": (mounted_ns - start_ns) / 1e9,
                "first_tensor_s": None
                if loaded.first_ns is None
                else (loaded.first_ns - start_ns) / 1e9,
                "first_tensor_bytes": loaded.first_bytes,
                "total_s": total_s,
                "loader_s": time.monotonic() - loader_start,
                "gib_per_s": loaded.bytes / max(total_s, 1e-9) / (1 << 30),
                "safetensors": safetensors.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Loads a safetensors model onto a GPU from a lazyctl mount and from a local copy, times both,
and checks that every tensor is equal. See README.md beside this file.

    check-model-load.py --mounted MNT --local DIR [--device cuda|cuda:N|cpu]
                        [--order mount-first|local-first] [--drop-caches]

For each directory, every *.safetensors file is loaded with
`safetensors.torch.load_file(path, device=DEVICE)` one after the other, as transformers does
for a sharded checkpoint, then `torch.cuda.synchronize()`; the tensors of all shards stay
loaded until the phase ends (the model's size in device memory). Printed per phase: seconds,
GiB of tensor data, GiB/s. Then every shard is loaded again from both directories, one shard at
a time, and every tensor compared (name, dtype, shape, values with `torch.equal`); the other
files (config.json, tokenizer files, the shard index) are compared byte for byte.

The mount is read first by default (cold: its chunks come over the network), the local copy
second; the local copy is then in the page cache unless --drop-caches (root) drops it first.
The last line of output is one JSON object with all figures.

Exit status: 0 when everything is equal, 1 on a difference, 2 on a usage or environment error
(no torch, no safetensors, no GPU for --device cuda).
"""

import argparse
import filecmp
import gc
import json
import os
import sys
import time

GIB = float(1 << 30)


def die(message, code=2):
    print(f"check-model-load: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mounted", required=True, help="the model directory in a lazyctl mount")
    p.add_argument("--local", required=True, help="the same model on a local disk")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu")
    p.add_argument("--order", choices=["mount-first", "local-first"], default="mount-first")
    p.add_argument(
        "--drop-caches",
        action="store_true",
        help="sync and drop the page cache before each timed phase (root)",
    )
    return p.parse_args()


def import_torch(device):
    """torch and safetensors.torch.load_file, or a clear exit."""
    try:
        import torch
    except ImportError:
        die(
            "torch is not installed for "
            f"{sys.executable}: install it (e.g. pip install torch safetensors, or a CUDA "
            "build from https://pytorch.org) or run with the Python that has it"
        )
    try:
        from safetensors.torch import load_file
    except ImportError:
        die(f"safetensors is not installed for {sys.executable}: pip install safetensors")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            die(
                f"--device {device}: torch {torch.__version__} sees no CUDA device "
                f"(torch.version.cuda = {torch.version.cuda}); use --device cpu to check "
                "without a GPU"
            )
    elif device != "cpu":
        die(f"--device {device}: expected cuda, cuda:N or cpu")
    return torch, load_file


def shard_names(directory):
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    except OSError as e:
        die(f"{directory}: {e}")
    if not names:
        die(f"{directory}: no .safetensors files")
    return names


def sync(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def drop_caches():
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        die(f"--drop-caches: {e} (run as root)")


def timed_load(torch, load_file, directory, names, device):
    """Loads every shard, keeping all of them; returns seconds, tensor bytes, tensors, and the
    seconds until the first shard was loaded."""
    loaded = []
    nbytes = tensors = 0
    first_shard_s = None
    start = time.perf_counter()
    for name in names:
        shard = load_file(os.path.join(directory, name), device=device)
        sync(torch, device)
        if first_shard_s is None:
            first_shard_s = time.perf_counter() - start
        loaded.append(shard)
        tensors += len(shard)
        nbytes += sum(t.numel() * t.element_size() for t in shard.values())
    seconds = time.perf_counter() - start
    del loaded
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "seconds": seconds,
        "first_shard_s": first_shard_s,
        "bytes": nbytes,
        "tensors": tensors,
        "gib_per_s": nbytes / GIB / seconds if seconds > 0 else None,
    }


def compare(torch, load_file, mounted, local, names, device):
    """Differences between the two directories, as messages; and the number of tensors."""
    problems = []
    tensors = 0
    for name in names:
        a = load_file(os.path.join(local, name), device=device)
        b = load_file(os.path.join(mounted, name), device=device)
        if a.keys() != b.keys():
            missing = sorted(a.keys() - b.keys())[:5]
            extra = sorted(b.keys() - a.keys())[:5]
            problems.append(f"{name}: tensors missing {missing}, unexpected {extra}")
        for key in sorted(a.keys() & b.keys()):
            x, y = a[key], b[key]
            if x.dtype != y.dtype or x.shape != y.shape:
                problems.append(f"{name}: {key} is {y.dtype} {tuple(y.shape)}, expected {x.dtype} {tuple(x.shape)}")
            elif not torch.equal(x, y):
                problems.append(f"{name}: {key} differs")
            tensors += 1
        del a, b
        gc.collect()
    # Everything that is not a shard, byte for byte.
    others = set()
    for root in (local, mounted):
        for d, _, files in os.walk(root):
            for f in files:
                rel = os.path.relpath(os.path.join(d, f), root)
                if not rel.endswith(".safetensors"):
                    others.add(rel)
    for rel in sorted(others):
        pa, pb = os.path.join(local, rel), os.path.join(mounted, rel)
        if not (os.path.isfile(pa) and os.path.isfile(pb)):
            problems.append(f"{rel}: only in {'the local copy' if os.path.isfile(pa) else 'the mount'}")
        elif not filecmp.cmp(pa, pb, shallow=False):
            problems.append(f"{rel}: differs")
    return problems, tensors, len(others)


def main():
    args = parse_args()
    for d in (args.mounted, args.local):
        if not os.path.isdir(d):
            die(f"{d}: not a directory")
    names = shard_names(args.local)
    if shard_names(args.mounted) != names:
        die(f"{args.mounted} and {args.local} hold different .safetensors files", code=1)
    torch, load_file = import_torch(args.device)
    device_name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"

    phases = [("mount", args.mounted), ("local", args.local)]
    if args.order == "local-first":
        phases.reverse()
    results = {}
    for label, directory in phases:
        if args.drop_caches:
            drop_caches()
        r = timed_load(torch, load_file, directory, names, args.device)
        results[label] = r
        print(
            f"{label:5}: {len(names)} shards, {r['tensors']} tensors, {r['bytes'] / GIB:.2f} GiB "
            f"in {r['seconds']:.2f} s = {r['gib_per_s']:.2f} GiB/s (first shard after "
            f"{r['first_shard_s']:.2f} s) onto {device_name}"
        )
    problems, tensors, others = compare(torch, load_file, args.mounted, args.local, names, args.device)
    for p in problems[:20]:
        print(f"DIFFERS: {p}")
    if len(problems) > 20:
        print(f"... and {len(problems) - 20} more differences")
    print(
        f"compare: {tensors} tensors and {others} other files, "
        + ("all equal" if not problems else f"{len(problems)} differences")
    )
    print(
        json.dumps(
            {
                "device": args.device,
                "device_name": device_name,
                "torch": torch.__version__,
                "order": args.order,
                "drop_caches": args.drop_caches,
                "shards": len(names),
                "mount": results["mount"],
                "local": results["local"],
                "mount_vs_local": results["mount"]["seconds"] / results["local"]["seconds"]
                if results["local"]["seconds"] > 0
                else None,
                "tensors_compared": tensors,
                "other_files_compared": others,
                "differences": len(problems),
            }
        )
    )
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()

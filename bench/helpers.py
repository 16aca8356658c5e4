#!/usr/bin/env python3
"""Helpers for bench/run.sh: deterministic inputs, an OCI layout writer, a timer that also
reports CPU time, and a mount-time probe. Standard library only.

Subcommands:
  select-tree LIST BUDGET ROOT...    NUL-separated list (paths relative to /) of the files,
                                     symlinks and directories under ROOT..., each ROOT walked in
                                     sorted order, until BUDGET bytes of regular-file data (hard
                                     links counted once); prints "files bytes entries"
  concat OUT SIZE ROOT...            OUT = the regular files under ROOT... (sorted), concatenated
                                     and cut at exactly SIZE bytes
  small-files DIR FILES DIRS SEED    FILES small files spread over DIRS directories
  oci-layout LAYOUT TAR GZ           an OCI image layout holding one image twice: tag "tar"
                                     (uncompressed layer TAR) and tag "gzip" (layer GZ, the same
                                     tar gzip-compressed); both files are moved into blobs/
  timeit LOG -- CMD...               runs CMD (stdout+stderr to LOG); prints
                                     "wall_s user_s sys_s" of CMD
  mount-time LAZYCTL IMAGE MNT LOG   starts `lazyctl mount IMAGE MNT`, polls /proc/self/mountinfo
                                     until MNT shows up, unmounts; prints
                                     "wall_ms logged_ms poll_us polls"
"""

import hashlib
import json
import os
import random
import re
import resource
import stat
import subprocess
import sys
import time


def die(msg):
    print(f"helpers.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# Inputs


def walk_sorted(root, seen):
    """Yields (path, lstat) for root and everything below it, parents first, names sorted,
    never following symlinks or crossing into another filesystem, skipping paths in `seen`."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    dev = st.st_dev
    stack = [root]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        st = os.lstat(path)
        yield path, st
        if stat.S_ISDIR(st.st_mode) and st.st_dev == dev:
            try:
                names = sorted(os.listdir(path), reverse=True)
            except OSError:
                continue
            stack.extend(os.path.join(path, n) for n in names)


def select_tree(out, budget, roots):
    budget = int(budget)
    seen = set()
    inodes = set()  # hard links carry their data once, in the tree and in a tar
    entries = []
    total = files = 0
    # Parents of the roots first, so tar recreates them with their real metadata.
    for root in roots:
        parts = os.path.abspath(root).strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/" + "/".join(parts[:i])
            if p not in seen:
                seen.add(p)
                entries.append(p)
    for root in roots:
        for path, st in walk_sorted(os.path.abspath(root), seen):
            mode = st.st_mode
            if stat.S_ISREG(mode):
                if total >= budget:
                    break
                if (st.st_dev, st.st_ino) not in inodes:
                    inodes.add((st.st_dev, st.st_ino))
                    total += st.st_size
                files += 1
            elif not (stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
                continue  # sockets, fifos, devices: not in image layers
            entries.append(path)
        if total >= budget:
            break
    with open(out, "wb") as f:
        for p in entries:
            f.write(p.lstrip("/").encode() + b"\0")
    print(f"{files} {total} {len(entries)}")


def concat(out, size, roots):
    size = int(size)
    left = size
    seen = set()
    with open(out, "wb") as dst:
        for root in roots:
            for path, st in walk_sorted(os.path.abspath(root), seen):
                if left == 0:
                    break
                if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                    continue
                with open(path, "rb") as src:
                    while left:
                        buf = src.read(min(left, 1 << 20))
                        if not buf:
                            break
                        dst.write(buf)
                        left -= len(buf)
    if left:
        die(f"{' '.join(roots)} hold only {size - left} bytes, need {size}")


def small_files(top, nfiles, ndirs, seed):
    """Text-like content (log lines, config lines): compresses about 3:1 with zstd, like the
    small files of a real rootfs. File sizes are log-uniform between 64 B and 16 KiB."""
    nfiles, ndirs = int(nfiles), int(ndirs)
    rng = random.Random(int(seed))
    words = [
        "alpha", "bravo", "config", "delta", "enable", "false", "global", "handler",
        "include", "json", "kernel", "library", "module", "network", "option", "python",
        "query", "runtime", "service", "true", "user", "value", "worker", "xattr", "yaml",
    ]
    lines = []
    for i in range(20000):
        n = rng.randint(3, 12)
        lines.append(
            f"{i:05d} " + " ".join(rng.choice(words) for _ in range(n))
            + f" = {rng.getrandbits(32):08x}\n"
        )
    pool = "".join(lines).encode()
    fanout = max(1, int(round(ndirs ** 0.5)))
    dirs = []
    for d in range(ndirs):
        path = os.path.join(top, f"d{d // fanout:03d}", f"s{d % fanout:03d}")
        os.makedirs(path, exist_ok=True)
        dirs.append(path)
    total = 0
    for i in range(nfiles):
        size = int(64 * (256 ** rng.random()))
        off = rng.randrange(0, len(pool) - size)
        with open(os.path.join(dirs[i % ndirs], f"file{i:06d}.txt"), "wb") as f:
            f.write(pool[off : off + size])
        total += size
    dircount = sum(1 for _ in os.scandir(top)) + ndirs + 1
    print(f"{nfiles} {dircount} {total}")


# ---------------------------------------------------------------------------------------------
# OCI layout


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(4 << 20)
            if not b:
                break
            h.update(b)
    return "sha256:" + h.hexdigest()


def put_blob(blobs, data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, d[7:]), "wb") as f:
        f.write(data)
    return d, len(data)


def oci_layout(layout, tar, gz):
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)
    diff_id = sha256_file(tar)
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created_by": "lazy bench/run.sh"}],
        },
        sort_keys=True,
    ).encode()
    config_digest, config_size = put_blob(blobs, config)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": []}
    for tag, path, media in [
        ("tar", tar, "application/vnd.oci.image.layer.v1.tar"),
        ("gzip", gz, "application/vnd.oci.image.layer.v1.tar+gzip"),
    ]:
        digest = diff_id if path == tar else sha256_file(path)
        size = os.path.getsize(path)
        os.replace(path, os.path.join(blobs, digest[7:]))
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_digest, "size": config_size},
                "layers": [{"mediaType": media, "digest": digest, "size": size}],
            },
            sort_keys=True,
        ).encode()
        md, ms = put_blob(blobs, manifest)
        index["manifests"].append(
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md,
             "size": ms, "annotations": {"org.opencontainers.image.ref.name": tag}}
        )
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# Timing


def timeit(log, cmd):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log, "ab") as out:
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        die(f"{' '.join(cmd)} failed with status {rc}; see {log}")
    print(f"{wall:.6f} {after.ru_utime - before.ru_utime:.6f} "
          f"{after.ru_stime - before.ru_stime:.6f}")


def mounted(mnt):
    with open("/proc/self/mountinfo", "rb") as f:
        table = f.read()
    return (b" " + mnt + b" ") in table


def mount_time(lazyctl, image, mnt, log):
    mnt_b = os.path.abspath(mnt).encode()
    env = dict(os.environ, RUST_LOG="info,fuser::mnt=error", NO_COLOR="1")
    if mounted(mnt_b):
        die(f"{mnt} is already mounted")
    with open(log, "wb") as err:
        t0 = time.perf_counter_ns()
        proc = subprocess.Popen([lazyctl, "mount", "--standalone", image, mnt], stdout=err, stderr=err, env=env)
        polls = 0
        deadline = t0 + 30 * 10**9
        while True:
            polls += 1
            if mounted(mnt_b):
                t1 = time.perf_counter_ns()
                break
            if proc.poll() is not None:
                die(f"lazyctl mount exited with {proc.returncode}; see {log}")
            if time.perf_counter_ns() > deadline:
                proc.kill()
                die(f"{mnt} not mounted after 30 s; see {log}")
        # The poll granularity: how long one check of the mount table takes.
        g0 = time.perf_counter_ns()
        for _ in range(200):
            mounted(mnt_b)
        poll_us = (time.perf_counter_ns() - g0) / 200 / 1e3
        # The log line is written right after the mount syscall returns; give it a moment.
        logged = None
        for _ in range(200):
            m = re.search(rb"mounted in ([0-9.]+) ms", open(log, "rb").read())
            if m:
                logged = float(m.group(1))
                break
            time.sleep(0.01)
        rc = subprocess.call([lazyctl, "umount", mnt], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            die(f"lazyctl mount did not exit after umount (status {rc}); see {log}")
    if logged is None:
        die(f"no 'mounted in X ms' line in {log}")
    print(f"{(t1 - t0) / 1e6:.1f} {logged:.1f} {poll_us:.0f} {polls}")


def main():
    if len(sys.argv) < 2:
        die(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "select-tree" and len(args) >= 3:
        select_tree(args[0], args[1], args[2:])
    elif cmd == "concat" and len(args) >= 3:
        concat(args[0], args[1], args[2:])
    elif cmd == "small-files" and len(args) == 4:
        small_files(*args)
    elif cmd == "oci-layout" and len(args) == 3:
        oci_layout(*args)
    elif cmd == "timeit" and len(args) >= 3 and args[1] == "--":
        timeit(args[0], args[2:])
    elif cmd == "mount-time" and len(args) == 4:
        mount_time(*args)
    else:
        die(__doc__)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The reader and the events of bench/restart.sh: how long a reader of a lazyd mount stalls
while the server is restarted, killed or upgraded. Standard library only.

Subcommands:
  probe MNT                  reads MNT in a tight loop on a thread: open, drop the file's page
                             cache (POSIX_FADV_DONTNEED, so the read reaches lazyd), pread
                             4 KiB, close, over up to FILES (300) files under MNT/usr (each
                             block checked against its first read). Prints "ready FILES"; then
                             reads commands on stdin, one a line: "begin" opens a window, "end"
                             closes it and prints "MAX_GAP_MS READS ERRORS" (the longest time
                             between two completed reads in the window, counting a gap still
                             open at its end; reads and failed reads in it); "quit" ends.
  replace SOCKET KIND SUPERVISOR LAZYCTL [BINARY]
                             replaces lazyd's server: KIND "restart" (SIGHUP to SUPERVISOR),
                             "crash" (SIGKILL to the server) or "upgrade" (LAZYCTL --socket
                             SOCKET upgrade --binary BINARY); waits until a new server answers
                             on SOCKET; prints "OLD_PID NEW_PID ANSWERED_MS" (from the signal
                             or the start of lazyctl).
  status SOCKET EXPR         prints EXPR evaluated on lazyd's status JSON `s`.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

FILES = 300
# Small reads, as a program reading its files does; one page.
BLOCK = 4096
# A new server must answer within this (a crash is restarted within about 100 ms).
ANSWER_TIMEOUT_S = 30


def die(msg):
    print(f"stall_probe.py: {msg}", file=sys.stderr)
    sys.exit(1)


# ---------------------------------------------------------------------------------------------
# The reader


def pick_files(mnt):
    """Up to FILES regular files under MNT/usr, in path order, spread over the tree: each with
    the offset of the block to read and that block's digest."""
    found = []
    for top, dirs, names in os.walk(os.path.join(mnt, "usr")):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000:
                found.append((path, st.st_size))
    if not found:
        die(f"no files under {mnt}/usr")
    step = max(1, len(found) // FILES)
    picked = []
    for i, (path, size) in enumerate(found[::step][:FILES]):
        # A different whole page of each file.
        offset = (i * 7919) % (size // BLOCK) * BLOCK if size >= 2 * BLOCK else 0
        picked.append((path, offset, hashlib.sha256(read_block(path, offset)).digest()))
    return picked


def read_block(path, offset):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, BLOCK, offset)
    finally:
        os.close(fd)


class Reader:
    def __init__(self, files):
        self.files = files
        self.lock = threading.Lock()
        self.last = time.perf_counter()
        self.active = False
        self.max_gap = 0.0
        self.reads = 0
        self.errors = 0
        self.stop = False

    def run(self):
        i = 0
        n = len(self.files)
        while not self.stop:
            path, offset, digest = self.files[i % n]
            i += 1
            try:
                ok = hashlib.sha256(read_block(path, offset)).digest() == digest
                error = None if ok else f"{path}: wrong bytes at {offset}"
            except OSError as e:
                error = f"{path}: {e}"
            t = time.perf_counter()
            with self.lock:
                if self.active:
                    self.max_gap = max(self.max_gap, t - self.last)
                    self.reads += 1
                    if error:
                        self.errors += 1
                self.last = t
            if error:
                print(f"stall_probe.py: read failed: {error}", file=sys.stderr, flush=True)

    def begin(self):
        with self.lock:
            self.active = True
            self.max_gap = 0.0
            self.reads = self.errors = 0

    def end(self):
        with self.lock:
            self.active = False
            gap = max(self.max_gap, time.perf_counter() - self.last)
            return gap, self.reads, self.errors


def probe(mnt):
    reader = Reader(pick_files(mnt))
    thread = threading.Thread(target=reader.run, daemon=True)
    thread.start()
    print(f"ready {len(reader.files)}", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "begin":
            reader.begin()
        elif cmd == "end":
            gap, reads, errors = reader.end()
            print(f"{gap * 1e3:.1f} {reads} {errors}", flush=True)
        elif cmd == "quit":
            break
        else:
            die(f"unknown command {cmd!r}")
    reader.stop = True
    thread.join(timeout=10)


# ---------------------------------------------------------------------------------------------
# The events


def status(sock_path, timeout=5.0):
    """lazyd's status (GET /v1/status on its socket), or None when it does not answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(b"GET /v1/status HTTP/1.0\r\nHost: lazyd\r\n\r\n")
            chunks = []
            while True:
                b = s.recv(1 << 16)
                if not b:
                    break
                chunks.append(b)
    except OSError:
        return None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def replace(sock_path, kind, supervisor, lazyctl, binary=None):
    s = status(sock_path)
    if s is None:
        die(f"lazyd does not answer on {sock_path}")
    old = s["pid"]
    t0 = time.perf_counter()
    if kind == "restart":
        os.kill(int(supervisor), signal.SIGHUP)
    elif kind == "crash":
        os.kill(old, signal.SIGKILL)
    elif kind == "upgrade":
        if not binary:
            die("upgrade needs a BINARY")
        out = subprocess.run([lazyctl, "--socket", sock_path, "upgrade", "--binary", binary],
                             capture_output=True, text=True)
        if out.returncode != 0:
            die(f"lazyctl upgrade failed with {out.returncode}: {out.stderr.strip()}")
    else:
        die(f"unknown event {kind!r}")
    while True:
        s = status(sock_path)
        if s is not None and s["pid"] != old:
            print(f"{old} {s['pid']} {(time.perf_counter() - t0) * 1e3:.1f}", flush=True)
            return
        if time.perf_counter() - t0 > ANSWER_TIMEOUT_S:
            die(f"no new server answered within {ANSWER_TIMEOUT_S} s after {kind}")
        time.sleep(0.002)


def main():
    args = sys.argv[1:]
    if args[:1] == ["probe"] and len(args) == 2:
        probe(args[1])
    elif args[:1] == ["replace"] and len(args) in (5, 6):
        replace(*args[1:])
    elif args[:1] == ["status"] and len(args) == 3:
        s = status(args[1])
        if s is None:
            die(f"lazyd does not answer on {args[1]}")
        print(eval(args[2], {}, {"s": s}))
    else:
        die(__doc__)


if __name__ == "__main__":
    main()

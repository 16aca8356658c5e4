#!/usr/bin/env python3
"""Helpers of bench/tier.sh (the cache tier benchmark).

Subcommands:
  proxy UPSTREAM DELAY_MS STATS   a TCP proxy on a free 127.0.0.1 port (printed first) in front
                                  of UPSTREAM (HOST:PORT): each burst of bytes from a client (a
                                  request) is held DELAY_MS before it is passed on, as
                                  tests/src/proxy.rs's DelayProxy does. It counts the requests
                                  (request heads seen) and the bytes sent back, and keeps them
                                  in STATS as {"requests", "bytes"}, rewritten as they change.
  clients URL SIZE N DEPTH SLICE  N clients, each reading bytes 0..SIZE of URL in SLICE-aligned
                                  ranges of SLICE bytes, DEPTH at a time (DEPTH threads with a
                                  keep-alive connection each, taking the ranges in order), the
                                  way lazyd's readers do. All start together. Prints JSON:
                                  {"client_s": [each client's seconds], "request_ms": {"p50",
                                  "p99", "max"}, "sha256": of client 0's bytes}; fails on any
                                  answer but a 206 of the right length.
"""

import asyncio
import hashlib
import http.client
import json
import os
import sys
import threading
import time
import urllib.parse


def proxy(upstream, delay_ms, stats_path):
    host, port = upstream.rsplit(":", 1)
    delay = int(delay_ms) / 1000
    stats = {"requests": 0, "bytes": 0}
    dirty = asyncio.Event()

    async def pipe(reader, writer, held, counted):
        try:
            while data := await reader.read(1 << 16):
                if held:
                    stats["requests"] += data.count(b"\r\n\r\n")
                    await asyncio.sleep(delay)
                if counted:
                    stats["bytes"] += len(data)
                dirty.set()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(client_r, client_w):
        try:
            up_r, up_w = await asyncio.open_connection(host, int(port))
        except OSError:
            client_w.close()
            return
        await asyncio.gather(pipe(client_r, up_w, True, False), pipe(up_r, client_w, False, True))

    async def keep_stats():
        while True:
            await dirty.wait()
            dirty.clear()
            with open(stats_path + ".tmp", "w") as f:
                json.dump(stats, f)
            os.replace(stats_path + ".tmp", stats_path)
            await asyncio.sleep(0.05)

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        print(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
        with open(stats_path, "w") as f:
            json.dump(stats, f)
        await asyncio.gather(server.serve_forever(), keep_stats())

    asyncio.run(main())


def clients(url, size, n, depth, slice_size):
    size, n, depth, slice_size = int(size), int(n), int(depth), int(slice_size)
    u = urllib.parse.urlsplit(url)
    starts = list(range(0, size, slice_size))
    latencies, errors = [], []
    client_s = [0.0] * n
    first = [None] * len(starts)  # client 0's bytes, by range
    go = threading.Barrier(n * depth)

    def reader(client, lane, t0_box):
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
        go.wait()
        if lane == 0:
            t0_box[0] = time.monotonic()
        for i in range(lane, len(starts), depth):
            start = starts[i]
            end = min(start + slice_size, size) - 1
            t = time.monotonic()
            conn.request("GET", u.path, headers={"Range": f"bytes={start}-{end}"})
            resp = conn.getresponse()
            body = resp.read()
            latencies.append(time.monotonic() - t)
            if resp.status != 206 or len(body) != end - start + 1:
                errors.append(f"client {client} range {start}-{end}: {resp.status}, {len(body)} bytes")
                return
            if client == 0:
                first[i] = body

    def run_client(client):
        t0_box = [0.0]
        lanes = [threading.Thread(target=reader, args=(client, lane, t0_box)) for lane in range(depth)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join()
        client_s[client] = time.monotonic() - t0_box[0]

    threads = [threading.Thread(target=run_client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit("; ".join(errors[:5]))
    latencies.sort()
    digest = hashlib.sha256()
    for part in first:
        digest.update(part)
    print(json.dumps({
        "client_s": [round(s, 3) for s in client_s],
        "request_ms": {
            "p50": round(1000 * latencies[len(latencies) // 2], 1),
            "p99": round(1000 * latencies[int(len(latencies) * 0.99)], 1),
            "max": round(1000 * latencies[-1], 1),
        },
        "sha256": digest.hexdigest(),
    }))


def main():
    commands = {"proxy": (proxy, 3), "clients": (clients, 5)}
    if len(sys.argv) < 2 or sys.argv[1] not in commands or len(sys.argv) - 2 != commands[sys.argv[1]][1]:
        sys.exit(__doc__)
    fn, _ = commands[sys.argv[1]]
    fn(*sys.argv[2:])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets: small valid examples of each input kind, so the
fuzzers start from real structure. Usage: seeds.py CORPUS_DIR (one folder per target is
created in it). scripts/fuzz.sh runs it; the index seed comes from a real conversion there."""

import io
import json
import os
import struct
import sys
import tarfile

SHA = "sha256:" + "ab" * 32
CHUNK = "cd" * 32


def pax_record(key: bytes, value: bytes) -> bytes:
    body = key + b"=" + value + b"\n"
    n = len(body) + 2
    while len(str(n)) + 1 + len(body) != n:
        n = len(str(n)) + 1 + len(body)
    return str(n).encode() + b" " + body


def layer(whiteouts: bool) -> bytes:
    """A layer with every kind of entry the converter handles."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as t:
        def add(name, kind=tarfile.REGTYPE, data=b"", **kw):
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mode, info.mtime = kind, len(data), 0o644, 1700000000
            for k, v in kw.items():
                setattr(info, k, v)
            t.addfile(info, io.BytesIO(data) if data else None)

        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/hostname", data=b"box\n")
        add("etc/big", data=bytes(range(256)) * 20)  # more than one 4 KiB chunk
        add("etc/l", tarfile.SYMTYPE, linkname="hostname")
        add("etc/h", tarfile.LNKTYPE, linkname="etc/hostname")
        add("etc/x", data=b"x", pax_headers={"SCHILY.xattr.user.bin": "a\nb", "mtime": "1.5"})
        add("d/" + "n" * 120 + "/long", data=b"long name")
        add("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("run/fifo", tarfile.FIFOTYPE)
        if whiteouts:
            add("etc/.wh.hostname")
            add("d/.wh..wh..opq")
        end = t.offset
    # The end-of-archive marker (two zero blocks) but not tarfile's padding to 10 KiB.
    return out.getvalue()[:end] + bytes(1024)


SEEDS = {
    "oci_manifest": {
        "oci-index": json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": SHA,
                 "size": 500, "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": SHA,
                 "size": 500, "platform": {"os": "linux", "architecture": "arm64"},
                 "artifactType": "application/vnd.lazyimg.image.v1",
                 "annotations": {"org.opencontainers.image.created": "2025-01-01T00:00:00Z"}},
            ]}),
        "docker-manifest": json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": SHA, "size": 1},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": SHA, "size": 2}]}),
    },
    "image_config": {
        "config": json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"],
                       "Env": ["PATH=/usr/bin", "A=1", "A=2", "B"], "User": "app:staff",
                       "WorkingDir": "srv"},
            "rootfs": {"type": "layers", "diff_ids": [SHA]}}),
        "numeric-user": json.dumps({"architecture": "arm64", "os": "linux",
                                    "config": {"Cmd": ["true"], "User": "1000:50"},
                                    "rootfs": {"type": "layers", "diff_ids": []}}),
    },
    "www_authenticate": {
        "docker-hub": 'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                      'scope="repository:library/ubuntu:pull"',
        "several": 'Basic realm="a, b", BEARER Realm = "http://x/t?a=1" , service=svc,'
                   'error="invalid_token"\nBearer realm="a\\"b\\\\c"',
    },
    "token_response": {
        "token": json.dumps({"token": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", "expires_in": 300,
                             "issued_at": "2025-01-01T00:00:00Z"}),
        "access-token": json.dumps({"token": "", "access_token": "abc", "expires_in": "600"}),
    },
    "profile_json": {
        "profile": json.dumps({"schema_version": 1, "image": SHA, "runs": 2, "entries": [
            {"chunk": CHUNK, "path": "/usr/bin/python3", "offset": 0, "len": 1048576,
             "seen": 2, "rank": 0.0},
            {"chunk": "ef" * 32, "path": "/etc/os-release", "offset": 0, "len": 39504,
             "seen": 1, "rank": 0.5}]}),
    },
    "s3_keys": {
        # First line: the location after s3://; then a size byte and a key per line.
        "model": "bucket/models/llama\n"
                 "\x00models/llama/\n\x05models/llama/config.json\n"
                 "\x07models/llama/shard-1.safetensors\n\x00models/llama/empty/\n",
    },
    "pax_records": {
        "records": pax_record(b"path", b"a/b/c") + pax_record(b"linkpath", b"../x")
                   + pax_record(b"SCHILY.xattr.user.v", b"bin\nary\x00"),
    },
}


def safetensors_header() -> bytes:
    """Eight bytes of file size, then a file's first bytes: the length prefix and the JSON."""
    j = (b'{"__metadata__":{"format":"pt"},'
         b'"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}')
    return struct.pack("<QQ", 16 + len(j), len(j)) + j


def main() -> None:
    corpus = sys.argv[1]
    seeds = dict(SEEDS)
    seeds["safetensors_header"] = {"one-tensor": safetensors_header()}
    seeds["tar_layer"] = {"layer": layer(False), "whiteouts": layer(True)}
    seeds["pax_records"]["layer"] = layer(False)
    merge = json.loads(SEEDS["profile_json"]["profile"])
    merge["entries"][0]["rank"] = 0.75
    seeds["profile_json"]["merge"] = (
        SEEDS["profile_json"]["profile"].encode() + b"\xff" + json.dumps(merge).encode())
    for target, files in seeds.items():
        os.makedirs(os.path.join(corpus, target), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(corpus, target, "seed-" + name), "wb") as f:
                f.write(data if isinstance(data, bytes) else data.encode())


main()

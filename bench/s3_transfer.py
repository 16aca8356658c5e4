#!/usr/bin/env python3
"""S3 transfers for bench/models.sh, with boto3 (run it with /opt/lazy-venv/bin/python3, where
scripts/setup.sh installs moto and therefore boto3). The endpoint, credentials and region come
from the environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION),
as for lazyctl; requests are path-style (an endpoint on 127.0.0.1 has no bucket subdomains).

Subcommands (each prints one JSON line):
  upload DIR s3://BUCKET/PREFIX/     every file of DIR (not recursive) to PREFIX/NAME
  download s3://BUCKET/PREFIX/ DIR   every object under PREFIX into DIR, all files at once,
                                     each a multipart ranged download (the good parallel
                                     downloader the benchmark compares lazy loading with):
                                     {"files", "bytes", "seconds"}

Transfers use boto3's TransferConfig with max_concurrency=16 per file and 8 MiB parts, and
all files run at the same time (one thread per file).
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

PART = 8 << 20
CONCURRENCY = 16


def client():
    return boto3.client(
        "s3",
        config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=64,
            # Only what S3 requires: newer botocore otherwise adds CRC trailers and checks
            # that S3-compatible servers may not all implement.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def split(url):
    if not url.startswith("s3://"):
        sys.exit(f"s3_transfer.py: {url}: expected s3://BUCKET/PREFIX/")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix


def transfer_config():
    return TransferConfig(
        multipart_threshold=PART,
        multipart_chunksize=PART,
        max_concurrency=CONCURRENCY,
        use_threads=True,
    )


def upload(directory, url):
    s3 = client()
    bucket, prefix = split(url)
    names = sorted(n for n in os.listdir(directory) if os.path.isfile(os.path.join(directory, n)))
    config = transfer_config()
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
        jobs = [
            pool.submit(s3.upload_file, os.path.join(directory, n), bucket, prefix + n, Config=config)
            for n in names
        ]
        for j in jobs:
            j.result()
    size = sum(os.path.getsize(os.path.join(directory, n)) for n in names)
    return {"files": len(names), "bytes": size, "seconds": time.perf_counter() - start}


def download(url, directory):
    s3 = client()
    bucket, prefix = split(url)
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        objects += page.get("Contents", [])
    if not objects:
        sys.exit(f"s3_transfer.py: nothing under {url}")
    config = transfer_config()
    with ThreadPoolExecutor(max_workers=len(objects)) as pool:
        jobs = []
        for o in objects:
            rel = o["Key"][len(prefix) :]
            if "/" in rel:
                os.makedirs(os.path.join(directory, os.path.dirname(rel)), exist_ok=True)
            jobs.append(
                pool.submit(s3.download_file, bucket, o["Key"], os.path.join(directory, rel), Config=config)
            )
        for j in jobs:
            j.result()
    seconds = time.perf_counter() - start
    return {"files": len(objects), "bytes": sum(o["Size"] for o in objects), "seconds": seconds}


def main():
    args = sys.argv[1:]
    if len(args) == 3 and args[0] == "upload":
        result = upload(args[1], args[2])
    elif len(args) == 3 and args[0] == "download":
        result = download(args[1], args[2])
    else:
        sys.exit(__doc__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Backup store throughput: the S3 store on a real SeaweedFS (`weed server -s3` on loopback, its data on
the same disk) next to the local folder store, the same bytes through the same encryption and digests, in
the same run, turns alternating, and boto3's own multipart upload and GET of the same bytes on the same
SeaweedFS as the floor of what S3 can do here. Write = open_writer, 1 MiB writes (the agent's chunk), commit with the
SHA-256 check; read = open_reader (authenticate, decrypt) and re-hash, as verify and restore do.

Run: `.venv/bin/python -m bench.backup_store_bench [--mb 256] [--rounds 3]`.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from reddwarf.server.backup_store import BackupStore, LocalStore, S3Settings, S3Store
from reddwarf.server.keys import MemoryKeys
from tests.fixtures.seaweed import start_seaweed

STEP = 1 << 20


async def write(store: BackupStore, bid: str, data: bytes, sha: str) -> float:
    t = time.monotonic()
    async with store.open_writer(bid, "bench") as w:
        view = memoryview(data)
        for i in range(0, len(data), STEP):
            await w.write(bytes(view[i:i + STEP]))
        await w.commit(sha)
    return time.monotonic() - t


async def read(store: BackupStore, bid: str, sha: str) -> float:
    t = time.monotonic()
    digest = hashlib.sha256()
    async for chunk in store.open_reader(bid):
        digest.update(chunk)
    assert digest.hexdigest() == sha
    return time.monotonic() - t


def raw_s3(client: Any, bucket: str, key: str, data: bytes) -> tuple[float, float]:
    """The floor: boto3's own multipart upload (8 MiB parts, 4 threads) and a plain GET of the same bytes,
    no encryption, no digest checks."""
    from boto3.s3.transfer import TransferConfig
    t = time.monotonic()
    client.upload_fileobj(io.BytesIO(data), bucket, key,
                          Config=TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4))
    up = time.monotonic() - t
    t = time.monotonic()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    while body.read(STEP):
        pass
    down = time.monotonic() - t
    client.delete_object(Bucket=bucket, Key=key)
    return up, down


async def main_async(mb: int, rounds: int) -> int:
    # Backups arrive zstd-compressed: random bytes are what the store sees.
    data = os.urandom(mb << 20)
    sha = hashlib.sha256(data).hexdigest()
    base = Path(tempfile.mkdtemp(prefix="reddwarf-storebench-", dir="/var/tmp"))
    times: dict[str, dict[str, list[float]]] = {k: {"write": [], "read": []} for k in ("local", "s3", "raw")}
    try:
        with start_seaweed(base / "seaweed") as sw:
            stores: dict[str, BackupStore] = {
                "local": LocalStore(str(base / "local"), MemoryKeys()),
                "s3": S3Store(S3Settings(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key), MemoryKeys()),
            }
            for r in range(rounds):
                for name, store in stores.items():
                    bid = f"b{r}"
                    times[name]["write"].append(await write(store, bid, data, sha))
                    times[name]["read"].append(await read(store, bid, sha))
                    await store.delete(bid)
                up, down = await asyncio.to_thread(raw_s3, sw.client(), sw.bucket, f"raw{r}", data)
                times["raw"]["write"].append(up)
                times["raw"]["read"].append(down)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def rate(name: str, op: str) -> float:
        return mb / statistics.median(times[name][op])

    print("## Backup store throughput: SeaweedFS (S3) vs the local folder\n")
    print(f"{mb} MiB of random bytes (a compressed backup) per operation, median of {rounds} rounds, the two "
          "stores taking turns; both encrypt (AES-256-GCM, 1 MiB chunks) and hash (SHA-256) the same way. The "
          "S3 store uploads 8 MiB parts, up to 3 in flight while the next fills, each with Content-MD5 and "
          "x-amz-checksum-sha256, and checks the parts (ListParts) before the create-only complete. "
          "SeaweedFS runs on this machine (master, volume, filer and S3 gateway in one `weed` process), "
          "competing for the same 2 cores.\n")
    print("| operation | S3 store (SeaweedFS) | local store (same run) | S3 / local | raw boto3 on SeaweedFS (same "
          "run, no encryption or checks) | S3 store / raw |")
    print("|---|---|---|---|---|---|")
    for op, what in (("write", "write (encrypt, hash, store, commit)"),
                     ("read", "read (fetch, authenticate, decrypt, re-hash)")):
        s3, local, raw = rate("s3", op), rate("local", op), rate("raw", op)
        print(f"| {what} | {s3:,.0f} MiB/s | {local:,.0f} MiB/s | {100 * s3 / local:.0f}% | {raw:,.0f} MiB/s | "
              f"{100 * s3 / raw:.0f}% |")
    print("\nWrites are bounded by SeaweedFS itself on this machine (boto3's own upload of the same bytes, with 4 "
          "threads, is the raw column); the store's encryption, per-part digests and part check cost the rest. "
          "Reads pay AES-GCM authentication and SHA-256 on the same 2 cores that serve the GET.")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    return asyncio.run(main_async(a.mb, a.rounds))


if __name__ == "__main__":
    sys.exit(main())

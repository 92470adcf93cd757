"""Backup and restore throughput through BackupRunner (mariadb-backup | zstd | SHA-256, streamed to the
store as the agent does over gRPC) next to raw `mariadb-backup --backup --stream=xbstream > file` and a raw
restore (mbstream -x, --prepare, --copy-back), on sysbench data, in the same run.

Run: `.venv/bin/python -m bench.backup_bench [--tables 8] [--rows 200000]`. Target (issue 6): >= 80% of raw.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time

from reddwarf.server.backup_store import LocalStore
from reddwarf.server.keys import MemoryKeys
from tests.backup.conftest import Mysqld


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


async def main_async(tables: int, rows: int) -> int:
    base = tempfile.mkdtemp(prefix="reddwarf-bkbench-", dir="/var/tmp")
    made: list[Mysqld] = []
    try:
        src = Mysqld(os.path.join(base, "src"))
        made.append(src)
        src.start_sync()
        src.connect().cursor().execute("CREATE DATABASE sbtest")
        subprocess.run(["sysbench", "oltp_read_write", f"--mysql-socket={src.socket}", "--mysql-user=root",
                        "--mysql-db=sbtest", f"--tables={tables}", f"--table-size={rows}", "--threads=2", "prepare"],
                       check=True, capture_output=True, timeout=1800)
        data = dir_bytes(src.datadir)

        # raw backup
        raw_file = os.path.join(base, "raw.xb")
        t = time.monotonic()
        with open(raw_file, "wb") as out:
            subprocess.run(["mariadb-backup", "--backup", "--stream=xbstream", f"--socket={src.socket}", "--user=root",
                            f"--datadir={src.datadir}", f"--target-dir={base}/rawtmp"], stdout=out,
                           stderr=subprocess.DEVNULL, check=True, timeout=3600)
        raw_backup = time.monotonic() - t

        # Red Dwarf backup
        store = LocalStore(os.path.join(base, "store"), MemoryKeys())

        async def upload(chunks):  # type: ignore[no-untyped-def]
            from reddwarf.v1 import agent_pb2
            async with store.open_writer("b1", "bench") as w:
                final = ""
                async for c in chunks:
                    if c.data:
                        await w.write(c.data)
                    final = c.sha256 or final
                obj = await w.commit(final)
            return agent_pb2.UploadBackupResponse(size_bytes=obj.size_bytes, sha256=obj.sha256)

        async def prog(*_a):  # type: ignore[no-untyped-def]
            return None

        # The source's checksums, outside the timing (nothing writes to it): the restored copy must equal them.
        source_sums = {c.table: c.checksum for c in await src.runner().table_checksums()}
        t = time.monotonic()
        result = await src.runner().backup("b1", "", upload, prog)
        rd_backup = time.monotonic() - t

        # raw restore: extract, prepare, copy back into a fresh datadir
        raw_dst = os.path.join(base, "rawrestore")
        os.makedirs(raw_dst)
        t = time.monotonic()
        with open(raw_file, "rb") as f:
            subprocess.run(["mbstream", "-x", "-C", raw_dst], stdin=f, check=True, timeout=3600)
        subprocess.run(["mariadb-backup", "--prepare", f"--target-dir={raw_dst}"], capture_output=True, check=True,
                       timeout=3600)
        subprocess.run(["mariadb-backup", "--copy-back", f"--target-dir={raw_dst}",
                        f"--datadir={base}/rawdata"], capture_output=True, check=True, timeout=3600)
        raw_restore = time.monotonic() - t

        # Red Dwarf restore (digest checked before the datadir is touched, then the same steps + swap)
        dst = Mysqld(os.path.join(base, "dst"))
        made.append(dst)
        dst.start_sync()

        async def download(bid):  # type: ignore[no-untyped-def]
            from reddwarf.v1 import agent_pb2
            async for d in store.open_reader(bid):
                yield agent_pb2.BackupChunk(data=d)

        t = time.monotonic()
        await dst.runner().restore(["b1"], [result.sha256], download, prog)
        rd_restore = time.monotonic() - t
        same = {c.table: c.checksum for c in await dst.runner().table_checksums()} == source_sums
    finally:
        for m in made:
            m.stop_sync()
        shutil.rmtree(base, ignore_errors=True)
    mb = data / 2**20
    print("## Backup and restore throughput\n")
    print(f"sysbench data: {tables} tables x {rows:,} rows, datadir {mb:,.0f} MB; stored backup "
          f"{result.size_bytes / 2**20:,.0f} MB (zstd -1). Restored table checksums equal the source's: {same}. "
          "The backup row is the guest's part (what the tenant's instance spends); before a backup is COMPLETED "
          "the server also restores it once in a scratch mariadbd to prove it, which takes about what the "
          "restore row shows.\n")
    print("| operation | Red Dwarf | raw mariadb-backup (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| backup (stream, compress, hash, store) | {mb / rd_backup:,.0f} MB/s | {mb / raw_backup:,.0f} MB/s "
          f"(--stream=xbstream > file) | {100 * raw_backup / rd_backup:.0f}% (target >= 80%) |")
    print(f"| restore (verify digest, extract, prepare, swap) | {mb / rd_restore:,.0f} MB/s | {mb / raw_restore:,.0f} MB/s "
          f"(mbstream -x, --prepare, --copy-back) | {100 * raw_restore / rd_restore:.0f}% (target >= 80%) |")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=200_000)
    a = ap.parse_args()
    return asyncio.run(main_async(a.tables, a.rows))


if __name__ == "__main__":
    sys.exit(main())

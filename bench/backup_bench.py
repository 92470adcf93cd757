"""Backup and restore throughput through BackupRunner (mariadb-backup | zstd | SHA-256, streamed to the
store as the agent does over gRPC) next to raw `mariadb-backup --backup --stream=xbstream > file` and a raw
restore (mbstream -x, --prepare, --copy-back), on sysbench data, in the same run.

Run: `.venv/bin/python -m bench.backup_bench [--tables 8] [--rows 200000] [--rounds 3]`. Targets (issue 19): backup >= 90% of raw; restore >= 80%.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from reddwarf.server.backup_store import LocalStore
from reddwarf.server.keys import MemoryKeys
from tests.backup.conftest import Mysqld


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


async def main_async(tables: int, rows: int, rounds: int) -> int:
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

        mb_argv = ["mariadb-backup", "--backup", "--stream=xbstream", f"--socket={src.socket}", "--user=root",
                   f"--datadir={src.datadir}"]

        def raw(compress: bool, n: int) -> str:
            """`mariadb-backup --stream=xbstream > file` (the baseline), or `| zstd -1 -T0 > file` (what the
            compression alone costs, for the notes): both as a shell would run them, no Python in the way."""
            path = os.path.join(base, f"raw{n}.xb" + (".zst" if compress else ""))
            with open(path, "wb") as out:
                target = [f"--target-dir={base}/rawtmp{n}{'z' if compress else ''}"]
                if not compress:
                    subprocess.run(mb_argv + target, stdout=out, stderr=subprocess.DEVNULL, check=True, timeout=3600)
                    return path
                mb = subprocess.Popen(mb_argv + target, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                assert mb.stdout is not None
                z = subprocess.run(["zstd", "-q", "-c", "-1", "-T0"], stdin=mb.stdout, stdout=out, timeout=3600)
                mb.stdout.close()
                if mb.wait(3600) != 0 or z.returncode != 0:
                    raise RuntimeError("mariadb-backup | zstd failed")
            return path

        # Red Dwarf backup
        store = LocalStore(os.path.join(base, "store"), MemoryKeys())

        def upload_to(bid: str):  # type: ignore[no-untyped-def]
            async def upload(chunks):  # type: ignore[no-untyped-def]
                from reddwarf.v1 import agent_pb2
                async with store.open_writer(bid, "bench") as w:
                    final = ""
                    async for c in chunks:
                        if c.data:
                            await w.write(c.data)
                        final = c.sha256 or final
                    obj = await w.commit(final)
                return agent_pb2.UploadBackupResponse(size_bytes=obj.size_bytes, sha256=obj.sha256)
            return upload

        async def prog(*_a):  # type: ignore[no-untyped-def]
            return None

        # The source's checksums, outside the timing (nothing writes to it): the restored copy must equal them.
        source_sums = {c.table: c.checksum for c in await src.runner().table_checksums()}

        def cpu() -> float:
            t = os.times()
            return t.user + t.system + t.children_user + t.children_system

        # The three take turns, `rounds` times: on a shared machine the load moves, and each gets the same
        # share of it. Medians are reported; every round is printed.
        times: dict[str, list[float]] = {"raw": [], "zstd": [], "rd": []}
        cpus: dict[str, list[float]] = {"raw": [], "zstd": [], "rd": []}
        result = None
        for n in range(rounds):
            for kind in ("raw", "zstd", "rd"):
                c, t = cpu(), time.monotonic()
                if kind == "rd":
                    r = await src.runner().backup(f"b{n}", "", upload_to(f"b{n}"), prog)
                    result = result or r
                else:
                    path = await asyncio.to_thread(raw, kind == "zstd", n)
                times[kind].append(time.monotonic() - t)
                cpus[kind].append(cpu() - c)
                if kind != "rd":
                    if kind == "raw" and n == 0:
                        raw_file = path
                    else:
                        os.unlink(path)
            print(f"round {n + 1}: raw {times['raw'][-1]:.2f} s, raw | zstd {times['zstd'][-1]:.2f} s, "
                  f"Red Dwarf {times['rd'][-1]:.2f} s, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        assert result is not None
        raw_backup, zstd_backup, rd_backup = (statistics.median(times[k]) for k in ("raw", "zstd", "rd"))

        # Restores take turns too: raw (extract, prepare, copy back into a fresh datadir) and Red Dwarf
        # (digest checked before the datadir is touched, then the same steps and the swap), into one mysqld.
        def raw_restore_once(n: int) -> None:
            raw_dst = os.path.join(base, f"rawrestore{n}")
            os.makedirs(raw_dst)
            with open(raw_file, "rb") as f:
                subprocess.run(["mbstream", "-x", "-C", raw_dst], stdin=f, check=True, timeout=3600)
            subprocess.run(["mariadb-backup", "--prepare", f"--target-dir={raw_dst}"], capture_output=True,
                           check=True, timeout=3600)
            subprocess.run(["mariadb-backup", "--copy-back", f"--target-dir={raw_dst}",
                            f"--datadir={base}/rawdata{n}"], capture_output=True, check=True, timeout=3600)

        dst = Mysqld(os.path.join(base, "dst"))
        made.append(dst)
        dst.start_sync()

        async def download(bid):  # type: ignore[no-untyped-def]
            from reddwarf.v1 import agent_pb2
            async for d in store.open_reader(bid):
                yield agent_pb2.BackupChunk(data=d)

        raw_restores: list[float] = []
        rd_restores: list[float] = []
        same = True
        for n in range(rounds):
            t = time.monotonic()
            await asyncio.to_thread(raw_restore_once, n)
            raw_restores.append(time.monotonic() - t)
            shutil.rmtree(os.path.join(base, f"rawrestore{n}"), ignore_errors=True)
            shutil.rmtree(os.path.join(base, f"rawdata{n}"), ignore_errors=True)
            t = time.monotonic()
            await dst.runner().restore(["b0"], [result.sha256], download, prog)
            rd_restores.append(time.monotonic() - t)
            same = same and {c.table: c.checksum for c in await dst.runner().table_checksums()} == source_sums
            print(f"restore round {n + 1}: raw {raw_restores[-1]:.2f} s, Red Dwarf {rd_restores[-1]:.2f} s, "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        raw_restore, rd_restore = statistics.median(raw_restores), statistics.median(rd_restores)
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
          f"restore row shows. Median of {rounds} rounds; in each the backups, then the restores, take turns.\n")
    print("| operation | Red Dwarf | raw mariadb-backup (same run) | ratio |")
    print("|---|---|---|---|")
    print(f"| backup (stream, compress, hash, store) | {mb / rd_backup:,.0f} MB/s | {mb / raw_backup:,.0f} MB/s "
          f"(--stream=xbstream > file) | {100 * raw_backup / rd_backup:.0f}% (target >= 90%) |")
    print(f"| for reference: compression alone | {mb / zstd_backup:,.0f} MB/s (mariadb-backup \\| zstd -1 -T0 > file, "
          f"no Python) | {mb / raw_backup:,.0f} MB/s | {100 * raw_backup / zstd_backup:.0f}% |")
    print(f"| restore (verify digest, extract, prepare, swap) | {mb / rd_restore:,.0f} MB/s | {mb / raw_restore:,.0f} MB/s "
          f"(mbstream -x, --prepare, --copy-back) | {100 * raw_restore / rd_restore:.0f}% (target >= 80%) |")
    med = {k: statistics.median(v) for k, v in cpus.items()}
    print(f"\nCPU seconds per backup (median; this process and its children): raw {med['raw']:.1f}, "
          f"raw | zstd {med['zstd']:.1f}, Red Dwarf {med['rd']:.1f}. Machine: {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end.")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3, help="backups of each kind, taking turns (median reported)")
    a = ap.parse_args()
    return asyncio.run(main_async(a.tables, a.rows, max(1, a.rounds)))


if __name__ == "__main__":
    sys.exit(main())

"""What compressing a backup costs before any of Red Dwarf's work: `mariadb-backup --stream=xbstream` into a
file raw and through each compressor the guest has, on the same sysbench data, rounds taking turns. No
Python in the pipelines: this is the ceiling the backup pipeline (bench/backup_bench.py) works under.

Run: `.venv/bin/python -m bench.compressor_bench [--tables 8] [--rows 200000] [--rounds 3]` (root).
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from tests.backup.conftest import Mysqld

PIPELINES: dict[str, list[str] | None] = {
    "raw `> file`": None,
    "`zstd -1 -T0` (the default)": ["zstd", "-q", "-c", "-1", "-T0"],
    "`zstd --fast=3 -T0`": ["zstd", "-q", "-c", "--fast=3", "-T0"],
    "`lz4 -1`": ["lz4", "-q", "-1", "-c"],
    "`zstd --format=lz4` (LZ4 frames from the guest's zstd)": ["zstd", "-q", "-c", "--format=lz4"],
}


def one(src: Mysqld, base: str, compressor: list[str] | None) -> tuple[float, float, int]:
    """Wall time, CPU seconds of the children, bytes written."""
    out, target = os.path.join(base, "out"), os.path.join(base, "target")
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    with open(out, "wb") as f:
        mb = subprocess.Popen(["mariadb-backup", "--backup", "--stream=xbstream", f"--socket={src.socket}",
                               "--user=root", f"--target-dir={target}", f"--datadir={src.datadir}"],
                              stdout=subprocess.PIPE if compressor else f, stderr=subprocess.DEVNULL)
        if compressor:
            assert mb.stdout is not None
            z = subprocess.run(compressor, stdin=mb.stdout, stdout=f, check=False)
            mb.stdout.close()
            if z.returncode:
                raise RuntimeError(f"{compressor[0]} exited {z.returncode}")
        if mb.wait():
            raise RuntimeError(f"mariadb-backup exited {mb.returncode}")
    elapsed = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    size = os.path.getsize(out)
    os.unlink(out)
    shutil.rmtree(target, ignore_errors=True)
    return elapsed, r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime, size


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tables", type=int, default=8)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="reddwarf-compbench-", dir="/var/tmp")
    src = Mysqld(os.path.join(base, "src"))
    try:
        src.start_sync()
        src.connect().cursor().execute("CREATE DATABASE sbtest")
        subprocess.run(["sysbench", "oltp_read_write", f"--mysql-socket={src.socket}", "--mysql-user=root",
                        "--mysql-db=sbtest", f"--tables={args.tables}", f"--table-size={args.rows}", "--threads=2",
                        "prepare"], check=True, capture_output=True, timeout=1800)
        load0 = os.getloadavg()[0]
        pipelines = {k: c for k, c in PIPELINES.items() if c is None or shutil.which(c[0])}
        runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in pipelines}
        for _ in range(args.rounds):
            for name, compressor in pipelines.items():
                runs[name].append(one(src, base, compressor))
        med = {k: tuple(statistics.median(r[i] for r in v) for i in range(3)) for k, v in runs.items()}
        raw_t = med["raw `> file`"][0]
        print("## Compressors alone: what compressing a backup costs before our pipeline\n")
        print(f"sysbench data {args.tables} x {args.rows:,} rows; `mariadb-backup --backup --stream=xbstream | "
              f"<compressor> > file`, median of {args.rounds} rounds taking turns; no Python in the pipelines. "
              f"Load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; {os.cpu_count()} CPUs.\n")
        print("| pipeline | time | share of raw | CPU-s (both processes) | stored |")
        print("|---|---|---|---|---|")
        for name, (t, cpu, size) in med.items():
            print(f"| {name} | {t:.2f} s | {100 * raw_t / t:.0f}% | {cpu:.2f} | {size / 2**20:,.0f} MiB |")
        return 0
    finally:
        src.stop_sync()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

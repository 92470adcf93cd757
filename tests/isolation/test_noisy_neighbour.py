"""The noisy-neighbour promise in a bounded form (the measured one is bench/isolation_bench.py, `make
bench`): two containers made by hostd's LXC driver on this host, a victim running sysbench oltp_read_write
against its own mariadbd and an aggressor burning CPU, allocating past its memory limit and writing to
disk. Asserted: the aggressor is held to its limits (CPU time within its cap, memory refused at its limit),
and the victim keeps serving: no sysbench error, its mariadbd neither killed nor restarted. The victim's
throughput next to its solo throughput is printed, not asserted (timing targets live in bench/)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from bench.isolation_bench import AGGRESSOR, START_MYSQL, Bench, prepare_data, sysbench, wait_socket
from reddwarf.hostd.containers import Limits

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, cgroups"),
              pytest.mark.skipif(not shutil.which("sysbench"), reason="sysbench (Debian package) missing")]

SECONDS = 6


def beancounters(bench: Bench, cid: str, limits: Limits) -> dict[str, object]:
    return {b.resource: b for b in bench.driver.usage(cid, limits).beancounters}


def test_a_noisy_neighbour_is_held_to_its_limits_and_the_victim_keeps_serving():
    work = tempfile.mkdtemp(prefix="reddwarf-isolation-test-", dir="/var/tmp")
    bench = Bench(work)
    try:
        victim_limits = Limits(memory_mb=1024, cpu_shares=1024, max_processes=512, io_weight=500)
        sock = bench.container("victim", victim_limits, START_MYSQL)
        victim = bench.containers[-1]
        wait_socket(sock)
        prepare_data(sock)
        mysqld = bench.driver.status(victim).init_pid  # START_MYSQL execs mariadbd: it is PID 1
        solo = sysbench("oltp_read_write", sock, SECONDS)

        bad = Limits(memory_mb=256, swap_mb=0, cpu_shares=256, cpu_limit_millicores=500, max_processes=64,
                     io_weight=100, io_iops=2000, io_bytes_per_sec=64 * 1024 * 1024)
        bench.container("aggressor", bad, AGGRESSOR)
        aggressor = bench.containers[-1]
        time.sleep(2)  # let it reach its limits
        before = beancounters(bench, aggressor, bad)
        t0 = time.monotonic()
        noisy = sysbench("oltp_read_write", sock, SECONDS)  # raises if sysbench reports a failure
        elapsed = time.monotonic() - t0
        after = beancounters(bench, aggressor, bad)

        used_ms = after["cpu"].held - before["cpu"].held  # type: ignore[attr-defined]
        # four CPU burners, capped at 0.5 CPU: at most half of the wall time (plus one scheduling period)
        assert 0 < used_ms <= elapsed * 1000 * 0.5 * 1.1 + 100, f"aggressor used {used_ms} ms CPU in {elapsed:.1f} s"
        assert after["cpu"].failcnt > before["cpu"].failcnt  # type: ignore[attr-defined]  # throttled periods
        mem = after["memory"]
        assert mem.failcnt > 0 and mem.maxheld <= 256 * 1024 * 1024, mem  # type: ignore[attr-defined]
        assert bench.driver.status(victim).init_pid == mysqld, "the victim's mariadbd was restarted"
        assert noisy > 0 and solo > 0
        print(f"\nvictim oltp_read_write: {noisy:,.0f} QPS with the neighbour vs {solo:,.0f} alone "
              f"({100 * noisy / solo:.0f}%); aggressor CPU {used_ms} ms in {elapsed:.1f} s, "
              f"memory failcnt {mem.failcnt}")  # type: ignore[attr-defined]
    finally:
        bench.close()
        leftover = subprocess.run(["lxc-ls", "-P", os.path.join(work, "lxc")], capture_output=True, text=True)
        shutil.rmtree(work, ignore_errors=True)
        assert not leftover.stdout.strip(), f"containers left: {leftover.stdout}"

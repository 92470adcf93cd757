"""Do 1,000 WatchInstance watchers slow creates? create→ACTIVE on one cluster (fake driver) with and without
1,000 open WatchInstance streams on a running instance, in alternating phases of the same run (without,
with, without, with...), so the machine's noise falls on both alike.

The watchers are a separate process (its own GIL) holding the streams open on 20 mTLS channels; the watched
instance's guest heartbeats every 2 s, and every heartbeat pokes all 1,000 streams (each re-derives the
instance's view: through the view cache, one state-DB read serves them all).

Run: `.venv/bin/python -m bench.watch_bench [--watchers 1000] [--phases 4] [--creates 3]`.
Target (issue 19): creates are not slowed by the watchers.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reddwarf.common import tls
from reddwarf.common.pki import TlsFiles
from reddwarf.v1 import admin_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.cluster import start_cluster


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CHANNELS = 20  # the server allows 100 streams per connection (common/tls.py)


async def watch(address: str, files: TlsFiles, token: str, name: str, n: int) -> None:
    """Opens n WatchInstance streams, prints `ready` once each has its first event, then counts events until
    SIGTERM and prints the count."""
    md = (("authorization", f"Bearer {token}"),)
    channels = [tls.aio_channel(address, files) for _ in range(CHANNELS)]
    first = asyncio.Semaphore(0)
    events = 0

    async def one(ch: object) -> None:
        nonlocal events
        stub = database_pb2_grpc.InstancesStub(ch)  # type: ignore[arg-type]
        seen = False
        async for _ in stub.WatchInstance(database_pb2.WatchInstanceRequest(name=name), metadata=md):
            events += 1
            if not seen:
                seen = True
                first.release()

    streams = [asyncio.create_task(one(channels[i % CHANNELS])) for i in range(n)]
    for _ in range(n):
        await first.acquire()
    print("ready", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(events, flush=True)
    for s in streams:
        s.cancel()
    for ch in channels:
        await ch.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--watchers", type=int, default=1000)
    ap.add_argument("--phases", type=int, default=4, help="alternating phases (without, with, ...)")
    ap.add_argument("--creates", type=int, default=3, help="creates per phase")
    ap.add_argument("--watch", nargs=5, metavar=("ADDRESS", "CERT", "KEY", "CA", "NAME,N"),
                    help=argparse.SUPPRESS)  # the watcher process
    a = ap.parse_args()
    if a.watch:
        address, cert, key, ca, rest = a.watch
        name, n = rest.split(",")
        asyncio.run(watch(address, TlsFiles(Path(cert), Path(key), Path(ca)), os.environ["REDDWARF_BENCH_TOKEN"],
                          name, int(n)))
        return 0
    work = Path(tempfile.mkdtemp(prefix="reddwarf-watchbench-", dir="/var/tmp"))
    try:
        with start_cluster(work, driver="fake") as c:
            c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{c.tenant}", quota=admin_pb2.Quota(
                instances=100, memory_mb=10**6, volume_gb=10**5, backups=10)))
            watched = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
                instance=database_pb2.Instance(display_name="watched", flavor="tiny",
                                               volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
            deadline = time.monotonic() + 120
            while c.instances.GetInstance(database_pb2.GetInstanceRequest(name=watched.name), metadata=c.md
                                          ).status != database_pb2.INSTANCE_STATUS_ACTIVE:
                if time.monotonic() > deadline:
                    raise RuntimeError("the watched instance never became ACTIVE")
                time.sleep(0.1)
            f = c.server.client_files
            argv = [sys.executable, "-m", "bench.watch_bench", "--watch", c.server.api, str(f.cert), str(f.key),
                    str(f.ca), f"{watched.name},{a.watchers}"]
            env = {**os.environ, "REDDWARF_BENCH_TOKEN": c.token}  # not on argv, where ps shows it

            def timed_create(n: int) -> float:
                """events_bench's create_once, but `watched` stays: wait for the list to shrink back to it."""
                t0 = time.monotonic()
                inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
                    instance=database_pb2.Instance(display_name=f"w-{n}", flavor="tiny",
                                                   volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
                while True:
                    i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
                    if i.status == database_pb2.INSTANCE_STATUS_ACTIVE:
                        took = time.monotonic() - t0
                        break
                    if i.status == database_pb2.INSTANCE_STATUS_ERROR:
                        raise RuntimeError(i.fault.message)
                    time.sleep(0.02)
                c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
                while len(c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances) > 1:
                    time.sleep(0.1)
                return took

            server_cpu = {False: [0.0, 0.0], True: [0.0, 0.0]}  # watchers open? → [CPU s, wall s] of the server

            def creates(n0: int, watching: bool) -> list[float]:
                cpu0, t0 = cpu_seconds(c.server.proc.pid), time.monotonic()
                out = [timed_create(n0 + k) for k in range(a.creates)]
                server_cpu[watching][0] += cpu_seconds(c.server.proc.pid) - cpu0
                server_cpu[watching][1] += time.monotonic() - t0
                return out

            timed_create(-1)  # warm
            without: list[float] = []
            with_watchers: list[float] = []
            delivered = 0
            for phase in range(a.phases):
                if phase % 2 == 0:
                    without += creates(phase * a.creates, False)
                    continue
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env, start_new_session=True)
                try:
                    assert proc.stdout is not None
                    if proc.stdout.readline().strip() != b"ready":
                        raise RuntimeError("the watchers did not start")
                    with_watchers += creates(phase * a.creates, True)
                    proc.send_signal(signal.SIGTERM)
                    delivered += int(proc.stdout.readline() or 0)
                    proc.wait(30)
                finally:
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        m_off, m_on = statistics.median(without), statistics.median(with_watchers)
        print("## 1,000 WatchInstance watchers vs creates\n")
        print(f"create→ACTIVE on one cluster (fake driver: guest agents as processes; flavor tiny; each instance "
              f"deleted before the next), {a.phases} alternating phases of {a.creates} creates, without and with "
              f"{a.watchers} WatchInstance streams open (a separate process, {CHANNELS} mTLS channels) on a running "
              f"instance whose guest heartbeats every 2 s; {delivered:,} events delivered to the watchers during "
              f"their phases. Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end "
              "(shared).\n")
        print("| creates | p50 | min | max | n |")
        print("|---|---|---|---|---|")
        print(f"| without watchers (baseline) | {m_off:.3f} s | {min(without):.3f} s | {max(without):.3f} s | "
              f"{len(without)} |")
        print(f"| with {a.watchers} watchers | {m_on:.3f} s | {min(with_watchers):.3f} s | "
              f"{max(with_watchers):.3f} s | {len(with_watchers)} |")
        print(f"| difference of the medians | {(m_on / m_off - 1) * 100:+.1f}% | | | |")
        off, on = (100 * server_cpu[w][0] / server_cpu[w][1] for w in (False, True))
        print(f"\nThe server's own CPU while the creates ran: {off:.0f}% of a core without watchers, {on:.0f}% with "
              "them (the rest of the difference is the machine: the watcher process and other jobs share its 2 "
              "cores).")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Create→ACTIVE through the whole system, next to the raw floor measured in the same run.

Floor (by hand, no Red Dwarf): truncate + mkfs.ext4 + losetup + mount a loop volume, lxc-copy an overlay
snapshot of the same template, lxc-start it, mariadb-install-db on the volume and mariadbd answering.
Red Dwarf: CreateInstance over mTLS gRPC → ACTIVE (a created database and user, health proven), for one
instance at a time and for N concurrent creates.

Run: `.venv/bin/python -m bench.provision_bench [--rounds 5] [--concurrent 20]` (root; builds the template
if missing). Targets (issue 19): one create p50 <= 1.0x the floor; makespan of N concurrent creates
<= 1.3x that of N concurrent floors.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymysql

from bench.provision_breakdown import analyse
from reddwarf.hostd import template
from reddwarf.hostd.settings import Settings as HostSettings
from reddwarf.v1 import admin_pb2, common_pb2, database_pb2
from tests.fixtures.cluster import start_cluster


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout.strip()


def container_cpu(name: str) -> float:
    """CPU seconds a container's processes have used so far (its cgroup: v1 cpuacct or v2 cpu.stat); 0.0 when
    unreadable. On 2 CPUs the burst makespans are bounded by this work: N containers' CPU / 2."""
    try:
        with open(f"/sys/fs/cgroup/cpuacct/lxc.payload.{name}/cpuacct.usage") as f:
            return int(f.read()) / 1e9
    except (OSError, ValueError):
        pass
    try:
        with open(f"/sys/fs/cgroup/lxc.payload.{name}/cpu.stat") as f:
            return int(f.read().split("usage_usec", 1)[1].split()[0]) / 1e6
    except (OSError, ValueError, IndexError):
        return 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds of a process and of its children it has waited for (hostd's lxc-copy, mkfs, lxc-start)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def floor_once(work: Path, tpl: str, tpl_path: str) -> float:
    elapsed, cleanup = floor_up(work, tpl, tpl_path)
    cleanup()
    return elapsed


def floor_up(work: Path, tpl: str, tpl_path: str, cpu: list[float] | None = None
             ) -> tuple[float, Callable[[], None]]:
    """Bring one raw floor up; return its time and a cleanup. Teardown stays outside the timing so that a
    concurrent burst of floors is not slowed by the early finishers tearing down (issue 19, target 5)."""
    name = f"rdfloor-{uuid.uuid4().hex[:6]}"
    img, mnt, lxc = work / f"{name}.img", work / f"{name}-mnt", work / "lxc"
    lxc.mkdir(exist_ok=True)
    mnt.mkdir()
    dev_box: list[str] = [""]

    def cleanup() -> None:
        _floor_cleanup(lxc, name, mnt, img, dev_box)

    t0 = time.monotonic()
    try:
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(img))
        dev_box[0] = sh("losetup", "-f", "--show", str(img))
        sh("mount", dev_box[0], str(mnt))
        (mnt / "start.sh").write_text("mariadb-install-db --user=root --datadir=/srv/data "
                                      "--auth-root-authentication-method=normal --skip-test-db >/dev/null 2>&1 && "
                                      "exec mariadbd --user=root --datadir=/srv/data --socket=/srv/s.sock --pid-file=/srv/m.pid "
                                      "--skip-networking\n")
        sh("lxc-copy", "-P", tpl_path, "-n", tpl, "-p", str(lxc), "-N", name, "-s", "-B", "overlayfs")
        cfg = lxc / name / "config"
        with open(cfg, "a") as f:
            f.write(f"\nlxc.net.0.type = none\nlxc.apparmor.profile = unconfined\n"
                    f"lxc.mount.entry = {mnt} srv none bind,create=dir 0 0\n"
                    "lxc.init.cmd = /bin/sh /srv/start.sh\n")
        sh("lxc-start", "-P", str(lxc), "-n", name)
        sock = mnt / "s.sock"
        while True:
            try:
                pymysql.connect(unix_socket=str(sock), user="root", password="", connect_timeout=1).close()
                break
            except pymysql.err.MySQLError:
                time.sleep(0.05)
            if time.monotonic() - t0 > 90:
                raise RuntimeError("floor mariadbd did not come up")
        elapsed = time.monotonic() - t0
        if cpu is not None:
            cpu.append(container_cpu(name))
        return elapsed, cleanup
    except BaseException:
        cleanup()
        raise


def _floor_cleanup(lxc: Path, name: str, mnt: Path, img: Path, dev_box: list[str]) -> None:
    subprocess.run(["lxc-stop", "-P", str(lxc), "-n", name, "-k"], capture_output=True, check=False)
    subprocess.run(["lxc-destroy", "-P", str(lxc), "-n", name, "-f"], capture_output=True, check=False)
    subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
    if dev_box[0]:
        subprocess.run(["losetup", "-d", dev_box[0]], capture_output=True, check=False)
    shutil.rmtree(mnt, ignore_errors=True)
    img.unlink(missing_ok=True)


def floor_burst(work: Path, tpl: str, tpl_path: str, n: int, cpu: list[float]) -> tuple[list[float], float]:
    """n raw floors at once: per-floor times and the makespan (start of the burst to the last mariadbd ready)."""
    t0 = time.monotonic()
    ups: list[tuple[float, Callable[[], None]]] = []
    errors: list[BaseException] = []

    def one(_: int) -> None:
        try:
            ups.append(floor_up(work, tpl, tpl_path, cpu))
        except BaseException as e:  # noqa: BLE001 - collected, re-raised after every floor is cleaned up
            errors.append(e)

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    makespan = time.monotonic() - t0
    for _, cleanup in ups:
        cleanup()
    if errors:
        raise errors[0]
    return [t for t, _ in ups], makespan


def create_once(c, n: int, cpu: list[float] | None = None) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=f"bench-{n}", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="app")],
        users=[common_pb2.User(user="app", password="bench-pw-123", databases=["app"])]), metadata=c.md)
    # Followed the way a client is told to (CreateInstance's comment): one WatchInstance stream pushes each
    # change. Polling GetInstance every 50 ms from 20 threads was a fifth of the server's CPU in the burst
    # (py-spy) and kept this process busy on the same 2 cores the creates run on.
    events = c.instances.WatchInstance(database_pb2.WatchInstanceRequest(name=inst.name), metadata=c.md)
    try:
        for ev in events:
            if ev.instance.status == database_pb2.INSTANCE_STATUS_ACTIVE:
                elapsed = time.monotonic() - t0
                if cpu is not None:
                    cpu.append(container_cpu(c.hostd.prefix + inst.name.rsplit("/", 1)[-1]))
                return elapsed
            if ev.instance.status == database_pb2.INSTANCE_STATUS_ERROR:
                raise RuntimeError(ev.instance.fault.message)
    finally:
        events.cancel()
    raise RuntimeError(f"{inst.name}: the watch ended before ACTIVE")


def delete_all(c) -> None:  # type: ignore[no-untyped-def]
    for i in c.instances.ListInstances(database_pb2.ListInstancesRequest(page_size=1000), metadata=c.md).instances:
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=i.name), metadata=c.md)
    while c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances:
        time.sleep(0.3)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--tenant-tasks", type=int, default=0,
                    help="the server's task_workers_per_tenant (and task_workers at least as many); default: "
                         "--concurrent, so one tenant's burst is not queued by the fairness cap (4 by default)")
    ap.add_argument("--keep-logs", metavar="DIR", help="copy the server's and hostd's logs here at the end")
    args = ap.parse_args()
    hs = HostSettings()
    tpl = template.build_template(hs)
    work = Path(tempfile.mkdtemp(prefix="reddwarf-provbench-", dir="/var/tmp"))
    try:
        # The bench's creates are one tenant's: with the default per-tenant cap (4) the engine runs them four at a
        # time whatever hostd can do. An operator who lets a tenant create N at once sets the same two values.
        tenant_tasks = args.tenant_tasks or args.concurrent
        server_env = {"REDDWARF_TASK_WORKERS_PER_TENANT": str(tenant_tasks),
                      "REDDWARF_TASK_WORKERS": str(max(8, tenant_tasks))}
        with start_cluster(work / "cluster", server_env=server_env) as c:
            c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{c.tenant}", quota=admin_pb2.Quota(
                instances=1000, memory_mb=10**6, volume_gb=10**5, backups=10)))
            # Floor and Red Dwarf rounds alternate: the machine is shared (2 cores, several engineers), so only
            # ratios measured side by side in time mean anything.
            floors: list[float] = []
            singles: list[float] = []
            for n in range(args.rounds):
                floors.append(floor_once(work, tpl, hs.template_lxc_path))
                singles.append(create_once(c, n))
                delete_all(c)
            floor_cpu: list[float] = []
            create_cpu: list[float] = []
            burst_floors: list[float] = []
            burst: list[float] = []
            floor_makespan = makespan = server_cpu = hostd_cpu = 0.0
            breakdown = ""
            if args.concurrent > 0:  # --concurrent 0: the one-at-a-time rounds only
                burst_floors, floor_makespan = floor_burst(work, tpl, hs.template_lxc_path, args.concurrent,
                                                           floor_cpu)
                procs = (c.server.proc.pid, c.hostd.proc.pid)
                before = [process_cpu(p) for p in procs]
                t0, burst_epoch = time.monotonic(), time.time()
                with ThreadPoolExecutor(args.concurrent) as pool:
                    burst = list(pool.map(lambda n: create_once(c, 100 + n, create_cpu), range(args.concurrent)))
                makespan = time.monotonic() - t0
                server_cpu, hostd_cpu = (process_cpu(p) - b for p, b in zip(procs, before, strict=True))
                # Where the burst's time went, from the server's step records and hostd's operation lines.
                breakdown = analyse(c.server.log(), c.hostd.log(), burst_epoch).markdown()
                delete_all(c)
            if args.keep_logs:
                os.makedirs(args.keep_logs, exist_ok=True)
                shutil.copy(c.server.log_path, os.path.join(args.keep_logs, "server.log"))
                shutil.copy(c.hostd.log_path, os.path.join(args.keep_logs, "hostd.log"))
        f50 = statistics.median(floors)
        print("## Provisioning: create → ACTIVE\n")
        print(f"{args.rounds} sequential creates interleaved with raw floors, then {args.concurrent} concurrent raw "
              f"floors, then {args.concurrent} concurrent creates (flavor tiny, 1 GB volume, one database and one user); "
              "the floor does the same container, volume and MariaDB start by hand. "
              f"Server: task_workers_per_tenant={tenant_tasks}, task_workers={max(8, tenant_tasks)}. "
              f"Machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.\n")
        print("| measure | p50 | p95 | makespan | vs floor |")
        print("|---|---|---|---|---|")
        print(f"| raw floor (loop volume + lxc-copy + lxc-start + install-db + mariadbd ready) | {f50:.2f} s | "
              f"{pct(floors, 95):.2f} s | | 1.0x |")
        print(f"| Red Dwarf, one at a time | {statistics.median(singles):.2f} s | {pct(singles, 95):.2f} s | | "
              f"{statistics.median(singles) / f50:.2f}x p50 (target <= 1.0x) |")
        if burst:
            print(f"| raw floor, {args.concurrent} concurrent | {statistics.median(burst_floors):.2f} s | {pct(burst_floors, 95):.2f} s | "
                  f"{floor_makespan:.2f} s | 1.0x |")
            print(f"| Red Dwarf, {args.concurrent} concurrent | {statistics.median(burst):.2f} s | {pct(burst, 95):.2f} s | "
                  f"{makespan:.2f} s | {makespan / floor_makespan:.2f}x makespan (target <= 1.3x) |")
            print(f"\nCPU seconds used in the bursts, summed: the {args.concurrent} floor containers "
                  f"{sum(floor_cpu):.1f} s (p50 {statistics.median(floor_cpu):.2f} s each); the {args.concurrent} "
                  f"Red Dwarf containers up to ACTIVE {sum(create_cpu):.1f} s (p50 {statistics.median(create_cpu):.2f} s "
                  f"each: agent, install-db, mariadbd); the server {server_cpu:.1f} s and hostd {hostd_cpu:.1f} s "
                  "(with the commands it ran) over the creates' burst.")
            print(f"\nWhere the {args.concurrent} concurrent creates spent their time (server and hostd logs):\n")
            print(breakdown)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())

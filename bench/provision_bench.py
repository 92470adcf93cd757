"""Create→ACTIVE through the whole system, next to the raw floor measured in the same run.

Floor (by hand, no Red Dwarf): truncate + mkfs.ext4 + losetup + mount a loop volume, lxc-copy an overlay
snapshot of the same template, lxc-start it, mariadb-install-db on the volume and mariadbd answering.
Red Dwarf: CreateInstance over mTLS gRPC → ACTIVE (a created database and user, health proven), for one
instance at a time and for N concurrent creates.

Run: `.venv/bin/python -m bench.provision_bench [--rounds 5] [--concurrent 20]` (root; builds the template
if missing). Target (issue 5): p50 within 2.5x the floor.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pymysql

from reddwarf.hostd import template
from reddwarf.hostd.settings import Settings as HostSettings
from reddwarf.v1 import admin_pb2, common_pb2, database_pb2
from tests.fixtures.cluster import start_cluster


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=600).stdout.strip()


def floor_once(work: Path, tpl: str, tpl_path: str) -> float:
    name = f"rdfloor-{uuid.uuid4().hex[:6]}"
    img, mnt, lxc = work / f"{name}.img", work / f"{name}-mnt", work / "lxc"
    lxc.mkdir(exist_ok=True)
    mnt.mkdir()
    dev = ""
    t0 = time.monotonic()
    try:
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        sh("mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(img))
        dev = sh("losetup", "-f", "--show", str(img))
        sh("mount", dev, str(mnt))
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
        return time.monotonic() - t0
    finally:
        subprocess.run(["lxc-stop", "-P", str(lxc), "-n", name, "-k"], capture_output=True, check=False)
        subprocess.run(["lxc-destroy", "-P", str(lxc), "-n", name, "-f"], capture_output=True, check=False)
        subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
        if dev:
            subprocess.run(["losetup", "-d", dev], capture_output=True, check=False)
        shutil.rmtree(mnt, ignore_errors=True)
        img.unlink(missing_ok=True)


def create_once(c, n: int) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=f"bench-{n}", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="app")],
        users=[common_pb2.User(user="app", password="bench-pw-123", databases=["app"])]), metadata=c.md)
    while True:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        if i.status == database_pb2.INSTANCE_STATUS_ACTIVE:
            return time.monotonic() - t0
        if i.status == database_pb2.INSTANCE_STATUS_ERROR:
            raise RuntimeError(i.fault.message)
        time.sleep(0.05)


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
    args = ap.parse_args()
    hs = HostSettings()
    tpl = template.build_template(hs)
    work = Path(tempfile.mkdtemp(prefix="reddwarf-provbench-", dir="/var/tmp"))
    try:
        floors = [floor_once(work, tpl, hs.template_lxc_path) for _ in range(args.rounds)]
        with start_cluster(work / "cluster") as c:
            c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{c.tenant}", quota=admin_pb2.Quota(
                instances=1000, memory_mb=10**6, volume_gb=10**5, backups=10)))
            singles = []
            for n in range(args.rounds):
                singles.append(create_once(c, n))
                delete_all(c)
            with ThreadPoolExecutor(args.concurrent) as pool:
                burst = list(pool.map(lambda n: create_once(c, 100 + n), range(args.concurrent)))
            delete_all(c)
        f50 = statistics.median(floors)
        print("## Provisioning: create → ACTIVE\n")
        print(f"{args.rounds} sequential creates, then {args.concurrent} concurrent creates (flavor tiny, 1 GB volume, "
              "one database and one user); the floor does the same container, volume and MariaDB start by hand. "
              f"Machine: {os.cpu_count()} CPUs.\n")
        print("| measure | p50 | p95 | vs floor p50 |")
        print("|---|---|---|---|")
        print(f"| raw floor (loop volume + lxc-copy + lxc-start + install-db + mariadbd ready) | {f50:.2f} s | "
              f"{pct(floors, 95):.2f} s | 1.0x |")
        print(f"| Red Dwarf, one at a time | {statistics.median(singles):.2f} s | {pct(singles, 95):.2f} s | "
              f"{statistics.median(singles) / f50:.1f}x (target <= 2.5x) |")
        print(f"| Red Dwarf, {args.concurrent} concurrent | {statistics.median(burst):.2f} s | {pct(burst, 95):.2f} s | "
              f"{statistics.median(burst) / f50:.1f}x |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())

"""Time from a lost host to its instances ACTIVE elsewhere, for 1 and for 5 instances on SAN volumes, with the
grace period stated, next to a plain MigrateInstance of the same instances in the same run.

A real fleet on this machine (tests/fixtures/fleet.py): the server, a SAN node with its own tgtd, two LXC
compute hosts with the user-space initiator (qemu-storage-daemon), each in its own network namespace;
instances are MariaDB in real containers, their datadirs LUNs. For each N (1, then 5; a fresh fleet each,
since a lost host stays fenced):
- baseline: the N instances (created on h-a) are migrated, all at once, to h-b, the host that will be lost (MigrateInstance:
  clean mysqld stop, detach, attach on the target, new container, agent back); time until all are ACTIVE there;
- loss: every process of that host is SIGKILLed at once (hostd, containers' agents and mysqld, its initiator);
  time until all N are ACTIVE on the other host. The watch probes each REDDWARF_HOST_CHECK_SECONDS and
  evacuates after REDDWARF_HOST_LOST_SECONDS of silence (the grace period, set short here; 60 s by default).

Run: `.venv/bin/python -m bench.hostloss_bench [--grace S] [--counts 1,5]` (as root).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.fleet import clear_dead_host, start_lxc_fleet
from tests.fixtures.waiting import until

PASSWORD = "bench-pw-123"
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE
CHECK_SECONDS = 1.0


def netns_pids(ns_path: str) -> list[int]:
    ino = os.stat(ns_path).st_ino
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d}/ns/net").st_ino == ino:
                    pids.append(int(d))
    return pids


def one_round(n: int, grace: float) -> tuple[float, float, float]:
    """(baseline migrate of n, host loss → n ACTIVE elsewhere, loss → the evacuation task's start)."""
    env = {"REDDWARF_HOST_CHECK_SECONDS": str(CHECK_SECONDS), "REDDWARF_HOST_LOST_SECONDS": str(grace)}
    with tempfile.TemporaryDirectory(prefix="rdhl") as tmp, start_lxc_fleet(Path(tmp), env) as fleet:
        server = fleet.server
        admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id="bench")))
        md = (("authorization", "Bearer " + admin.CreateToken(
            admin_pb2.CreateTokenRequest(tenant="tenants/bench")).secret),)
        instances = database_pb2_grpc.InstancesStub(server.channel())

        def get(name: str) -> database_pb2.Instance:
            return instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=md)

        def all_active_on(names: list[str], host: str, timeout: float) -> None:
            def done() -> bool:
                got = [get(x) for x in names]
                bad = [i for i in got if i.status == database_pb2.INSTANCE_STATUS_ERROR and not i.task]
                if bad:
                    raise RuntimeError(f"{bad[0].id} went to ERROR: {bad[0].fault.message}")
                return all(i.status == ACTIVE and not i.task and i.host == f"hosts/{host}" for i in got)
            until(done, lambda ok: ok, timeout=timeout, what=f"{len(names)} ACTIVE on {host}", interval=0.1)

        # All N start on h-a (h-b drained meanwhile), so the baseline moves every one of them to h-b, the host
        # that is then lost; they are evacuated back to h-a.
        lost, survivor = "h-b", "h-a"
        admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{lost}", drain=True))
        names = [instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name=f"hl{i}", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database="shop")],
            users=[common_pb2.User(user="app", password=PASSWORD, databases=["shop"])]), metadata=md).name
            for i in range(n)]
        all_active_on(names, survivor, 900)
        admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{lost}", drain=False))
        t0 = time.monotonic()
        for x in names:
            admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=x, host=lost))
        all_active_on(names, lost, 900)
        baseline = time.monotonic() - t0

        key = lost.removeprefix("h-")
        t0 = time.monotonic()
        for pid in netns_pids(fleet.net[key].netns_path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        fleet.computes[lost].proc.wait(timeout=30)
        until(lambda: admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{lost}")).state,
              lambda s: s == admin_pb2.HOST_STATE_FENCED, timeout=600, what="fenced", interval=0.1)
        fenced = time.monotonic() - t0
        all_active_on(names, survivor, 900)
        lost_s = time.monotonic() - t0

        clear_dead_host(fleet.computes[lost].root)
        for x in names:
            instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=x), metadata=md)
        until(lambda: admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{survivor}")).instances,
              lambda left: not left, timeout=600, what="deleted", interval=0.5)
        return baseline, lost_s, fenced


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--grace", type=float, default=5.0, help="REDDWARF_HOST_LOST_SECONDS for the run")
    ap.add_argument("--counts", default="1,5")
    args = ap.parse_args()
    rows = []
    for n in (int(c) for c in args.counts.split(",")):
        rows.append((n, *one_round(n, args.grace)))
    print("## Host loss: time to ACTIVE elsewhere\n")
    print("| instances on the lost host | host loss → all ACTIVE on the other host, s | of which grace period, s "
          "| loss → host FENCED, s | baseline: MigrateInstance of the same instances, s |")
    print("|---|---|---|---|---|")
    for n, base, lost, fenced in rows:
        print(f"| {n} | {lost:.1f} | {args.grace:.0f} | {fenced:.1f} | {base:.1f} |")
    print()
    print(f"Every process of one compute host is SIGKILLed at once (hostd, its containers, its initiator). The "
          f"server probes each host every {CHECK_SECONDS:.0f} s and evacuates one silent for the grace period "
          f"(REDDWARF_HOST_LOST_SECONDS={args.grace:.0f} here; the default is 60 s, which adds 55 s to every "
          "figure). After the grace the host is fenced (certificate revoked, initiator out of every LUN ACL), "
          "then each instance is attached to the survivor and started there from its own volume. The baseline "
          "migrates the same instances at once onto the host that is then lost (a clean stop and detach first). "
          "Instances are MariaDB on SAN LUNs (tgtd, user-space initiator), flavor tiny.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Migration downtime as a client sees it: the longest gap between two acknowledged writes while an instance
is migrated to another host, next to the same gap for an in-place restart (RestartInstance: mysqld restarted
in its container) of the same instance, in the same run.

A real fleet on this machine (tests/fixtures/fleet.py): the server, a SAN node with its own tgtd, two LXC
compute hosts with the user-space initiator (qemu-storage-daemon), each in its own network namespace; the
instance is MariaDB in a real container, its datadir a LUN. The client inserts one row at a time
(autocommit, durable commits); after an error it asks the API for the instance's endpoint again (a migrated
instance has the target host's address) and reconnects. Migrations go back and forth, alternating with
restarts; the median of the rounds.

Run: `.venv/bin/python -m bench.migrate_bench [--rounds N]` (as root).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import pymysql

from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.fleet import start_lxc_fleet
from tests.fixtures.waiting import until

PASSWORD = "bench-pw-123"
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE


class Prober(threading.Thread):
    """Inserts rows one by one and keeps the time of every acknowledged one."""

    def __init__(self, endpoint: callable[[], tuple[str, int]]) -> None:  # type: ignore[valid-type]
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.acks: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                host, port = self.endpoint()
                with pymysql.connect(host=host, port=port, user="app", password=PASSWORD, database="shop",
                                     autocommit=True, connect_timeout=2, read_timeout=5, write_timeout=5) as c, \
                        c.cursor() as cur:
                    while not self.stop.is_set():
                        n += 1
                        cur.execute("INSERT INTO probe (id) VALUES (%s)", (n,))
                        self.acks.append(time.monotonic())
                        time.sleep(0.005)
            except Exception:  # noqa: BLE001 - down: look the endpoint up again and retry
                time.sleep(0.05)

    def gap(self, start: float, end: float) -> float:
        """The longest time without an acknowledged write between start and end (both ends included)."""
        times = [start, *[t for t in self.acks if start <= t <= end], end]
        return max(b - a for a, b in zip(times, times[1:], strict=False))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rdmb") as tmp, start_lxc_fleet(Path(tmp)) as fleet:
        server = fleet.server
        admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id="bench")))
        md = (("authorization", "Bearer " + admin.CreateToken(
            admin_pb2.CreateTokenRequest(tenant="tenants/bench")).secret),)
        instances = database_pb2_grpc.InstancesStub(server.channel())

        def get(name: str) -> database_pb2.Instance:
            return instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=md)

        def settled(name: str) -> database_pb2.Instance:
            inst = until(lambda: get(name), lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR)
                         and not i.task, timeout=600, what="settled", interval=0.1)
            assert inst.status == ACTIVE, inst.fault.message
            return inst

        inst = instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="mover", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database="shop")],
            users=[common_pb2.User(user="app", password=PASSWORD, databases=["shop"])]), metadata=md)
        inst = settled(inst.name)
        ep = inst.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop") as c:
            c.cursor().execute("CREATE TABLE probe (id INT PRIMARY KEY) ENGINE=InnoDB")

        def endpoint() -> tuple[str, int]:
            e = get(inst.name).endpoints[0]
            return e.host, e.port
        prober = Prober(endpoint)
        prober.start()
        until(lambda: len(prober.acks), lambda n: n > 50, timeout=60, what="probe writing", interval=0.1)
        migrate: list[float] = []
        restart: list[float] = []
        totals: list[float] = []
        try:
            for _ in range(args.rounds):
                t0 = time.monotonic()
                task = admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name))
                until(lambda t=task.id: admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{t}")).state,
                      lambda s: s in (admin_pb2.TASK_STATE_SUCCEEDED, admin_pb2.TASK_STATE_FAILED), timeout=600,
                      what="migrated", interval=0.1)
                settled(inst.name)
                n = len(prober.acks)
                until(lambda: len(prober.acks), lambda m, n=n: m > n + 20, timeout=60, what="writes again", interval=0.05)
                t1 = time.monotonic()
                migrate.append(prober.gap(t0, t1))
                totals.append(t1 - t0)
                t0 = time.monotonic()
                instances.RestartInstance(database_pb2.RestartInstanceRequest(name=inst.name), metadata=md)
                settled(inst.name)
                n = len(prober.acks)
                until(lambda: len(prober.acks), lambda m, n=n: m > n + 20, timeout=60, what="writes again", interval=0.05)
                restart.append(prober.gap(t0, time.monotonic()))
        finally:
            prober.stop.set()
            prober.join(10)
        instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=md)
        until(lambda: admin.GetHost(admin_pb2.GetHostRequest(name="hosts/h-a")).instances
              or admin.GetHost(admin_pb2.GetHostRequest(name="hosts/h-b")).instances,
              lambda left: not left, timeout=300, what="deleted", interval=0.5)

    def fmt(xs: list[float]) -> str:
        return ", ".join(f"{x:.1f}" for x in xs)
    m, r = statistics.median(migrate), statistics.median(restart)
    print("## Migration downtime: the gap a client sees\n")
    print("| operation | longest gap without an acknowledged write, s (p50) | rounds |")
    print("|---|---|---|")
    print(f"| MigrateInstance to the other host (SAN volume, LXC, MariaDB) | {m:.1f} | {fmt(migrate)} |")
    print(f"| RestartInstance in place (baseline) | {r:.1f} | {fmt(restart)} |")
    print()
    print(f"A migration costs a client {m / r:.1f}× the gap of an in-place mysqld restart (p50 of {args.rounds} "
          f"rounds; migrate task submit → writes again took {fmt(totals)} s). The gap holds a clean mysqld "
          "shutdown, the container's stop and delete, the LUN's ACL switch, the target's login and mount, a "
          "new container from the template, the agent's enrollment and a prepare on the existing datadir, and "
          "the client's own endpoint lookup. The client writes durable commits (one INSERT per commit).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

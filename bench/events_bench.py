"""What recording the event history costs on the create path: create→ACTIVE with events recorded next to a
server with recording off (REDDWARF_EVENTS_ENABLED=false), both clusters up at once and the creates
interleaved (on, off, on, off...) so the machine's noise falls on both alike.

Run: `.venv/bin/python -m bench.events_bench [--rounds 10] [--driver fake|lxc]`. The fake driver (guest agents
as processes, no MariaDB) makes create→ACTIVE about a second, so a fixed cost shows larger there than on LXC.
Target (issue 18): create→ACTIVE at most 5% slower with events recorded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, observe_pb2, observe_pb2_grpc
from tests.fixtures.cluster import Cluster, start_cluster


def create_once(c: Cluster, n: int) -> float:
    t0 = time.monotonic()
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=f"ev-{n}", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="app")],
        users=[common_pb2.User(user="app", password="bench-pw-123", databases=["app"])]), metadata=c.md)
    while True:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        if i.status == database_pb2.INSTANCE_STATUS_ACTIVE:
            took = time.monotonic() - t0
            break
        if i.status == database_pb2.INSTANCE_STATUS_ERROR:
            raise RuntimeError(i.fault.message)
        time.sleep(0.02)
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    while c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances:
        time.sleep(0.1)
    return took


def events_recorded(c: Cluster) -> int:
    stub = observe_pb2_grpc.EventsStub(c.server.channel(c.server.admin_files))
    n, token = 0, ""
    while True:
        page = stub.ListEvents(observe_pb2.ListEventsRequest(page_size=1000, page_token=token))
        n += len(page.events)
        token = page.next_page_token
        if not token:
            return n


def state_write_costs(work: Path, n: int = 100) -> tuple[float, float, float]:
    """In one process on a SQLite state DB (the default): ms per instance status change written without the
    status hook, with it, and ms per API event written alone (the writer's worst case: a batch of one)."""
    from reddwarf.common.states import InstanceStatus
    from reddwarf.server import audit, db, models

    url = f"sqlite:///{work}/micro/state.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    sessions = db.session_factory(engine)
    with sessions() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="bench"))
        s.flush()
        s.add(models.Instance(id="i-bench", tenant_id="bench", display_name="x", flavor_id="tiny", volume_size_gb=1,
                              datastore="mariadb", datastore_version="10.11"))

    def status_changes() -> float:
        t0 = time.perf_counter()
        for k in range(n):
            db.update_row(sessions, models.Instance, "i-bench",
                          status=InstanceStatus.ACTIVE if k % 2 else InstanceStatus.SHUTDOWN)
        return (time.perf_counter() - t0) / n * 1000

    plains, hookeds = [], []
    for _ in range(5):  # alternated: the disk's own noise falls on both
        plains.append(status_changes())
        audit.record_status_changes(sessions)
        hookeds.append(status_changes())
        audit.stop_recording(sessions)
    plain, hooked = statistics.median(plains), statistics.median(hookeds)
    writer = audit.EventWriter(sessions)
    t0 = time.perf_counter()
    for k in range(n):
        writer._write([models.Event(kind="api", method="/reddwarf.v1.Instances/CreateInstance", summary="{}" * k,
                                    code="OK")])
    api = (time.perf_counter() - t0) / n * 1000
    engine.dispose()
    return plain, hooked, api


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--driver", choices=("fake", "lxc"), default="fake")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reddwarf-eventsbench-", dir="/var/tmp"))
    try:
        with ExitStack() as stack:
            on = stack.enter_context(start_cluster(work / "on", driver=args.driver,
                                                   server_env={"REDDWARF_EVENTS_ENABLED": "true"}))
            off = stack.enter_context(start_cluster(work / "off", driver=args.driver,
                                                    server_env={"REDDWARF_EVENTS_ENABLED": "false"}))
            for c in (on, off):
                c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{c.tenant}", quota=admin_pb2.Quota(
                    instances=100, memory_mb=10**6, volume_gb=10**5, backups=10)))
            create_once(on, -1), create_once(off, -2)  # warm both (imports, first container)
            with_events: list[float] = []
            without: list[float] = []
            for n in range(args.rounds):
                first, second = ((on, with_events), (off, without)) if n % 2 == 0 else ((off, without), (on, with_events))
                for c, sink in (first, second):
                    sink.append(create_once(c, n))
            recorded, not_recorded = events_recorded(on), events_recorded(off)
        plain, hooked, api = state_write_costs(work)
        m_on, m_off = statistics.median(with_events), statistics.median(without)
        overhead = (m_on / m_off - 1) * 100
        print("## Event history: what recording costs on create→ACTIVE\n")
        print(f"{args.rounds} creates on each of two clusters up at once ({args.driver} driver; flavor tiny, one "
              "database and one user; each instance deleted before the next create), interleaved; one with the event "
              f"history recorded ({recorded} events by the end), one with recording off ({not_recorded}). "
              f"Machine: {os.cpu_count()} CPUs, shared.\n")
        print("| measure | p50 | min | max |")
        print("|---|---|---|---|")
        print(f"| create→ACTIVE, recording off (baseline) | {m_off:.3f} s | {min(without):.3f} s | {max(without):.3f} s |")
        print(f"| create→ACTIVE, events recorded | {m_on:.3f} s | {min(with_events):.3f} s | {max(with_events):.3f} s |")
        print(f"| difference of the medians | {overhead:+.1f}% (target <= +5%) | | |")
        # A create records one API event and two status changes (BUILD, ACTIVE): what that costs, measured
        # directly, against the create's own median.
        per_create = 2 * (hooked - plain) + api
        print("\nThe same cost measured directly, in one process on a SQLite state DB (5 alternated runs of 100 writes each, medians):\n")
        print("| write | ms each |")
        print("|---|---|")
        print(f"| instance status change, recording off | {plain:.3f} |")
        print(f"| instance status change, with its status event | {hooked:.3f} |")
        print(f"| one API event alone (the writer batches; off the call's path) | {api:.3f} |")
        print(f"| per create (2 status events + 1 API event) | {per_create:.3f} = "
              f"{per_create / 1000 / m_off * 100:.2f}% of the baseline's create→ACTIVE p50 |")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())

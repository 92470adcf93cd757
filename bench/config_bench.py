"""How long a configuration change takes to apply on a real instance (LXC container, MariaDB in the guest):
from the API call until the new value shows in SHOW GLOBAL VARIABLES, for an attach of a group, an update of
an attached group, and a detach — next to the floor measured on the same instance in the same run, a
direct SET GLOBAL from a client followed by the same SHOW GLOBAL VARIABLES.

The restart-required path (a static parameter, innodb_log_buffer_size): from the UpdateConfiguration call,
through RESTART_REQUIRED and ApplyPendingMaintenance (the pending restart run at once instead of in the
window), until the new value shows — next to a plain RestartInstance in the same run, until its task ended and
mysqld answers again.

Run: `.venv/bin/python -m bench.config_bench [--rounds 20] [--restart-rounds 5]` (root: LXC, loop volumes).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pymysql

from reddwarf.v1 import configuration_pb2 as cpb
from reddwarf.v1 import configuration_pb2_grpc as cpb_grpc
from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import start_cluster
from tests.fixtures.waiting import until


def timed(fn: Callable[[], None], seen: Callable[[], bool]) -> float:
    """Seconds from calling fn until seen() holds (checked at once after fn returns, then every 5 ms)."""
    t = time.monotonic()
    fn()
    while not seen():
        time.sleep(0.005)
    return time.monotonic() - t


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--restart-rounds", type=int, default=5)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-cfgbench-", dir="/var/tmp") as tmp, \
            start_cluster(Path(tmp)) as c:
        cfg = cpb_grpc.ConfigurationsStub(c.channel)
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="cfg-bench", flavor="small", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
        until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md),
              lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE and not i.task, 900, "instance ACTIVE")
        inst = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        password = c.root.EnableRoot(database_pb2.EnableRootRequest(name=inst.name), metadata=c.md).password
        ep = inst.endpoints[0]
        conn = pymysql.connect(host=ep.host, port=ep.port, user="root", password=password, autocommit=True)
        cur = conn.cursor()

        def value() -> int:
            cur.execute("SHOW GLOBAL VARIABLES LIKE 'max_connections'")
            row = cur.fetchone()
            return int(row[1]) if row else -1

        group = cfg.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
            display_name="bench", values={"max_connections": "300"})), metadata=c.md)
        attach, update, detach, direct = [], [], [], []
        default = value()
        try:
            for n in range(a.rounds):
                want = 300 + n
                cfg.UpdateConfiguration(cpb.UpdateConfigurationRequest(
                    name=group.name, values={"max_connections": str(want)}), metadata=c.md)  # not attached: stored only
                attach.append(timed(lambda: cfg.AttachConfiguration(cpb.AttachConfigurationRequest(
                    instance=inst.name, configuration=group.name), metadata=c.md), lambda w=want: value() == w))
                want2 = 600 + n
                update.append(timed(lambda w=want2: cfg.UpdateConfiguration(cpb.UpdateConfigurationRequest(
                    name=group.name, merge=True, values={"max_connections": str(w)}), metadata=c.md),
                    lambda w=want2: value() == w))
                detach.append(timed(lambda: cfg.DetachConfiguration(cpb.DetachConfigurationRequest(
                    instance=inst.name), metadata=c.md), lambda: value() == default))
                want3 = 900 + n
                direct.append(timed(lambda w=want3: cur.execute("SET GLOBAL max_connections = %s", (w,)),
                                    lambda w=want3: value() == w))
                cur.execute("SET GLOBAL max_connections = %s", (default,))
            static, plain = restart_path(c, cfg, inst, group, password, a.restart_rounds)
        finally:
            conn.close()
            c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
            until(lambda: [i.id for i in c.instances.ListInstances(database_pb2.ListInstancesRequest(),
                                                                  metadata=c.md).instances],
                  lambda ids: inst.id not in ids, 300, "instance deleted")

    def row(label: str, xs: list[float]) -> str:
        xs = sorted(xs)
        p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
        return f"| {label} | {statistics.median(xs) * 1000:.1f} ms | {p95 * 1000:.1f} ms | {max(xs) * 1000:.1f} ms |"

    print("## Configuration changes: time to apply\n")
    print(f"One real instance (LXC, MariaDB 10.11, flavor small), {a.rounds} rounds, same run. Each figure is from "
          "the call until `max_connections` shows the new value in SHOW GLOBAL VARIABLES (polled from a client "
          "connection at once, then every 5 ms). The API path: server validation, the agent command over its stream, "
          "SET GLOBAL in the guest, the my.cnf include rewritten, the state DB updated.\n")
    print("| change | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(row("attach a group (AttachConfiguration)", attach))
    print(row("update an attached group (UpdateConfiguration, PATCH)", update))
    print(row("detach (values back to the flavor's)", detach))
    print(row("baseline: SET GLOBAL from a client", direct))
    print(f"\nAn update through the API takes {statistics.median(update) / statistics.median(direct):.0f}× the direct "
          "SET GLOBAL; the difference is the API call (validation, the state DB's "
          "writes), the agent's stream and the include file's rewrite.")
    print(f"\nRestart-required path ({a.restart_rounds} rounds, same instance and run): a static value "
          "(innodb_log_buffer_size) changed with UpdateConfiguration, the instance RESTART_REQUIRED, its pending "
          "restart applied at once with ApplyPendingMaintenance, until SHOW GLOBAL VARIABLES shows the value; "
          "baseline: RestartInstance alone until its task ended and mysqld answers.\n")
    print("| change | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(row("static value: update + apply pending restart", static))
    print(row("baseline: RestartInstance", plain))
    return 0


def restart_path(c, cfg, inst, group, password: str, rounds: int) -> tuple[list[float], list[float]]:  # type: ignore[no-untyped-def]
    ep = inst.endpoints[0]

    def log_buffer() -> int:
        try:
            with pymysql.connect(host=ep.host, port=ep.port, user="root", password=password,
                                 connect_timeout=2) as conn, conn.cursor() as cur:
                cur.execute("SHOW GLOBAL VARIABLES LIKE 'innodb_log_buffer_size'")
                row = cur.fetchone()
                return int(row[1]) if row else -1
        except pymysql.MySQLError:
            return -1  # restarting

    def restarted() -> bool:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        return i.status == database_pb2.INSTANCE_STATUS_ACTIVE and not i.task and log_buffer() > 0

    cfg.AttachConfiguration(cpb.AttachConfigurationRequest(instance=inst.name, configuration=group.name),
                            metadata=c.md)
    static, plain = [], []
    for n in range(rounds):
        want = (24 + n) * 1024 * 1024  # never the default (16 MiB): each round needs a restart

        def change(w: int = want) -> None:
            cfg.UpdateConfiguration(cpb.UpdateConfigurationRequest(
                name=group.name, merge=True, values={"innodb_log_buffer_size": str(w)}), metadata=c.md)
            c.instances.ApplyPendingMaintenance(database_pb2.ApplyPendingMaintenanceRequest(
                name=inst.name, kinds=["restart"]), metadata=c.md)
        static.append(timed(change, lambda w=want: log_buffer() == w and restarted()))
        plain.append(timed(lambda: c.instances.RestartInstance(database_pb2.RestartInstanceRequest(
            name=inst.name), metadata=c.md), restarted))
    return static, plain


if __name__ == "__main__":
    sys.exit(main())

"""A failed upgrade is rolled back, real: the new container's mysqld is killed (SIGKILL) while mariadb-upgrade
runs in it; the instance comes back on 10.11 in a container of the old template, with its data as it was
(restored from the pre-upgrade backup, since the new mysqld had touched the datadir)."""
from __future__ import annotations

import os
import signal
import threading
import time

import pymysql
import pytest

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2
from tests.provisioning.test_e2e import wait_status, wait_task

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]
PASSWORD = "s3cret-pw"


def procs_of(iid: str, comm: str) -> list[int]:
    """Host pids of processes named `comm` in the instance's container (its cgroup path names the instance)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() != comm:
                    continue
            with open(f"/proc/{pid}/cgroup") as f:
                if iid in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


def test_a_killed_mysqld_during_mariadb_upgrade_rolls_back_to_10_11_with_the_data(cluster) -> None:
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="upg-rb", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       datastore="mariadb", datastore_version="10.11"),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password=PASSWORD, databases=["shop"])]), metadata=cluster.md)
    try:
        up = wait_status(cluster, inst.name, timeout=600)
        ep = up.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop",
                             autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(16))")
            cur.executemany("INSERT INTO t VALUES (%s, %s)", [(i, f"v{i}") for i in range(300)])
            cur.execute("CHECKSUM TABLE t")
            before = cur.fetchall()
        killed: list[int] = []
        stop = threading.Event()

        def killer() -> None:
            while not stop.is_set() and not killed:
                if procs_of(inst.id, "mariadb-upgrade"):
                    for pid in procs_of(inst.id, "mariadbd"):
                        os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                time.sleep(0.02)
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        cluster.instances.UpgradeInstance(database_pb2.UpgradeInstanceRequest(
            name=inst.name, datastore_version="11.8"), metadata=cluster.md)
        try:
            with pytest.raises(AssertionError, match="upgrade_instance failed"):
                wait_task(cluster, inst, timeout=900)
        finally:
            stop.set()
            t.join(5)
        assert killed, "mariadb-upgrade was never seen running in the new container"
        task = cluster.admin.ListTasks(admin_pb2.ListTasksRequest(resource=f"instances/{inst.id}")).tasks[0]
        assert task.kind == "upgrade_instance" and task.current_step == "upgrade_datadir"
        back = wait_status(cluster, inst.name, timeout=300)
        assert back.datastore_version == "10.11"
        assert back.last_upgrade.outcome == "ROLLED_BACK" and back.last_upgrade.downtime_seconds > 0
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop",
                             connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            assert cur.fetchone()[0].startswith("10.11.")
            cur.execute("CHECKSUM TABLE t")
            assert cur.fetchall() == before
    finally:
        cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
        wait_task(cluster, inst, timeout=300)

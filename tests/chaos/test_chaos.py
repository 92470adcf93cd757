"""Faults against the real processes, in a bounded, seeded form (`make chaos` runs more rounds): the system
converges — instances end ACTIVE (or in a clear ERROR), nothing duplicated or orphaned, no committed row
lost."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time

import pymysql
import pytest

from reddwarf.common import states
from reddwarf.v1 import common_pb2, database_pb2
from tests.fixtures.cluster import start_cluster

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]


def wait_active(c, name, timeout=240):
    deadline = time.monotonic() + timeout
    while True:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)
        if i.status == database_pb2.INSTANCE_STATUS_ACTIVE:
            return i
        assert i.status != database_pb2.INSTANCE_STATUS_ERROR, i.fault.message
        assert time.monotonic() < deadline, f"still {states.from_pb(states.InstanceStatus, i.status)} {i.task_step}"
        time.sleep(0.5)


def mysqld_pid(container_init_pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(container_init_pid), "mariadbd"], capture_output=True, text=True,
                         check=False).stdout.split()
    return int(out[0]) if out else 0


class Writer(threading.Thread):
    """Inserts rows with known ids; remembers which commits were acknowledged."""

    def __init__(self, inst) -> None:
        super().__init__(daemon=True)
        self.ep = inst.endpoints[0]
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with pymysql.connect(host=self.ep.host, port=self.ep.port, user="app", password="app-pw-123",
                                     database="shop", connect_timeout=2, autocommit=True) as conn, conn.cursor() as cur:
                    while not self.stop.is_set():
                        n += 1
                        cur.execute("INSERT INTO rows_ (id) VALUES (%s)", (n,))
                        self.acked.append(n)
            except pymysql.err.MySQLError:
                time.sleep(0.2)  # mysqld is down: retry; the unacknowledged id is simply skipped


def test_mysqld_killed_repeatedly_is_restarted_and_loses_no_committed_row(tmp_path, chaos_rounds):
    rng = random.Random(1234)
    with start_cluster(tmp_path) as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="victim", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database="shop")],
            users=[common_pb2.User(user="app", password="app-pw-123", databases=["shop"])]), metadata=c.md)
        inst = wait_active(c, inst.name)
        ep = inst.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop") as conn:
            conn.cursor().execute("CREATE TABLE rows_ (id INT PRIMARY KEY) ENGINE=InnoDB")
        init_pid = int(subprocess.run(["lxc-info", "-P", str(c.hostd.lxc_path), "-n", f"{c.hostd.prefix}{inst.id}",
                                       "-p", "-H"], capture_output=True, text=True, check=True).stdout.strip())
        writer = Writer(inst)
        writer.start()
        try:
            for _ in range(chaos_rounds):
                time.sleep(rng.uniform(0.5, 2.0))
                pid = mysqld_pid(init_pid)
                assert pid, "mysqld is not running under the agent"
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 60
                while mysqld_pid(init_pid) in (0, pid):  # the agent notices and starts a new one
                    assert time.monotonic() < deadline, "mysqld was not restarted"
                    time.sleep(0.2)
            time.sleep(2)
        finally:
            writer.stop.set()
            writer.join(10)
        inst = wait_active(c, inst.name)
        assert inst.health.restarts >= chaos_rounds
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop") as conn, \
                conn.cursor() as cur:
            cur.execute("SELECT id FROM rows_")
            stored = {r[0] for r in cur.fetchall()}
        lost = set(writer.acked) - stored
        assert writer.acked and not lost, f"{len(lost)} acknowledged rows lost"


def test_hostd_killed_mid_create_converges_to_one_container(tmp_path):
    with start_cluster(tmp_path) as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="bumpy", flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
            metadata=c.md)
        time.sleep(0.3)
        os.killpg(c.hostd.proc.pid, signal.SIGKILL)  # wherever the create is, hostd vanishes
        c.hostd.proc.wait()
        # the same host comes back at the same address with the same state dir
        args = c.hostd.proc.args
        log = open(c.hostd.log_path, "ab")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            done = wait_active(c, inst.name)
            assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE
            assert len(list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*"))) == 1
            assert len(list(c.hostd.storage_path.glob("*.img"))) == 1
            c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
            deadline = time.monotonic() + 120
            while list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*")) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*"))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
            log.close()

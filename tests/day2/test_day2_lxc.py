"""Day-2 operations on a real instance: the server and hostd processes, an LXC container from the template
with the guest agent as PID 1 and MariaDB inside, its data on a loop volume.

- A maintenance window is respected: a RESTART_REQUIRED instance's pending restart does not run outside its
  window (mysqld's PID stays) and runs inside it (a new mysqld, the static value in SHOW GLOBAL VARIABLES).
  The test is a second scheduler with its own clock (the server's is off) so no real weekday is waited for.
- An agent upgrade under a running writer: every acknowledged row is there afterwards, mysqld's PID is the
  same before and after, and the agent reports the new build.

Steps share one instance and are chained with pytest-dependency."""
from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from reddwarf.common import agent_build
from reddwarf.server import db, maintenance
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from reddwarf.v1 import configuration_pb2 as cpb
from reddwarf.v1 import configuration_pb2_grpc as cpb_grpc
from tests.day2.conftest import MAINTENANCE_ENV
from tests.fixtures.cluster import Cluster, start_cluster
from tests.provisioning.test_e2e import wait_status, wait_task

from .builds import build_new_agent_wheel

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]

WINDOW = database_pb2.MaintenanceWindow(weekday=3, start_time="10:00", duration_minutes=60)
INSIDE, OUTSIDE = dt.datetime(2026, 12, 2, 10, 30), dt.datetime(2026, 12, 2, 12, 0)
LOG_BUFFER = 32 * 1024 * 1024


@pytest.fixture(scope="module")
def new_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_new_agent_wheel(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, new_wheel: Path) -> Iterator[Cluster]:
    env = {**MAINTENANCE_ENV, "REDDWARF_AGENT_WHEEL": str(new_wheel)}
    with start_cluster(tmp_path_factory.mktemp("day2lxc"), server_env=env) as c:
        yield c


@pytest.fixture(scope="module")
def created(cluster: Cluster) -> database_pb2.Instance:
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="day2", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       maintenance_window=WINDOW),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="day2-pw-1", databases=["shop"])]), metadata=cluster.md)


@pytest.fixture
def inst(cluster: Cluster, created: database_pb2.Instance) -> database_pb2.Instance:
    return wait_status(cluster, created.name)


def connect(inst: database_pb2.Instance) -> pymysql.Connection:  # type: ignore[type-arg]
    ep = inst.endpoints[0]
    return pymysql.connect(host=ep.host, port=ep.port, user="app", password="day2-pw-1", database="shop",
                           connect_timeout=5, autocommit=True)


def mysqld_pid(iid: str) -> int:
    """mysqld's PID on the host: the mariadbd process in the instance's container's cgroup."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            cgroup = Path(f"/proc/{entry}/cgroup").read_text()
        except OSError:
            continue
        if argv and argv[0].endswith((b"mariadbd", b"mysqld")) and iid in cgroup:
            found.append(int(entry))
    assert len(found) == 1, f"mysqld processes of {iid}: {found}"
    return found[0]


def sessions(c: Cluster):  # type: ignore[no-untyped-def]
    return db.session_factory(db.make_engine(c.server.db_url))


@pytest.mark.dependency(name="active")
def test_instance_becomes_active_with_its_window(cluster: Cluster, created: database_pb2.Instance) -> None:
    got = wait_status(cluster, created.name)
    assert got.maintenance_window == WINDOW
    assert got.agent_version == agent_build.installed_version()


@pytest.mark.dependency(name="window", depends=["active"])
def test_pending_restart_runs_only_inside_the_window(cluster: Cluster, inst: database_pb2.Instance) -> None:
    cfg = cpb_grpc.ConfigurationsStub(cluster.channel)
    group = cfg.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="static", values={"innodb_log_buffer_size": str(LOG_BUFFER)})), metadata=cluster.md)
    cfg.AttachConfiguration(cpb.AttachConfigurationRequest(instance=inst.name, configuration=group.name),
                            metadata=cluster.md)
    assert wait_status(cluster, inst.name, ("RESTART_REQUIRED",)).status == database_pb2.INSTANCE_STATUS_RESTART_REQUIRED
    before = mysqld_pid(inst.id)
    s = sessions(cluster)
    assert maintenance.tick(s, OUTSIDE) == []
    time.sleep(2)
    got = cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=cluster.md)
    assert [(m.kind, m.state) for m in got.pending_maintenance] == [("restart", "pending")]
    assert mysqld_pid(inst.id) == before and not got.task
    assert len(maintenance.tick(s, INSIDE)) == 1
    wait_task(cluster, inst)
    after = wait_status(cluster, inst.name)
    assert after.status == database_pb2.INSTANCE_STATUS_ACTIVE
    assert mysqld_pid(inst.id) != before
    with connect(after) as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES LIKE 'innodb_log_buffer_size'")
        assert int(cur.fetchone()[1]) == LOG_BUFFER
    maintenance.tick(s, INSIDE)
    assert list(cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name),
                                              metadata=cluster.md).pending_maintenance) == []


@pytest.mark.dependency(depends=["active"])
def test_agent_upgrade_under_a_writer_keeps_mysqld_and_every_acknowledged_row(
        cluster: Cluster, inst: database_pb2.Instance, new_wheel: Path) -> None:
    with connect(inst) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS w (id INT PRIMARY KEY)")
    acked: list[int] = []
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        conn = connect(inst)
        try:
            while not stop.is_set():
                n += 1
                try:
                    with conn.cursor() as cur:
                        cur.execute("INSERT INTO w VALUES (%s)", (n,))
                    acked.append(n)
                except pymysql.MySQLError as exc:
                    errors.append(str(exc))
                    conn = connect(inst)
                time.sleep(0.01)
        finally:
            conn.close()

    pid = mysqld_pid(inst.id)
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1)
        with cluster.server.channel(cluster.server.admin_files) as ch:
            database_pb2_grpc.InstancesStub(ch).ScheduleAgentUpgrade(
                database_pb2.ScheduleAgentUpgradeRequest(name=inst.name, apply_now=True))
        task = wait_task(cluster, inst)
        assert task.kind == "upgrade_agent"
        time.sleep(1)
    finally:
        stop.set()
        t.join(30)
    got = wait_status(cluster, inst.name)
    assert got.agent_version == agent_build.wheel_version(new_wheel) != agent_build.installed_version()
    assert mysqld_pid(inst.id) == pid
    assert errors == [] and len(acked) > 50
    with connect(got) as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM w")
        assert set(acked) <= {r[0] for r in cur.fetchall()}
    assert got.health.accepting_connections
    # The upgraded agent still drives mysqld: a command through it works, and a restart stops the adopted
    # mysqld and starts a new one.
    cluster.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=inst.name, database=common_pb2.Database(database="after_upgrade")), metadata=cluster.md)
    cluster.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=inst.name), metadata=cluster.md)
    assert wait_task(cluster, inst).kind == "restart_instance"
    assert mysqld_pid(inst.id) != pid
    with connect(wait_status(cluster, inst.name)) as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM w")
        assert cur.fetchone()[0] >= len(acked)


def test_delete_cleans_up(cluster: Cluster, created: database_pb2.Instance) -> None:
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=created.name), metadata=cluster.md)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if not list(cluster.hostd.lxc_path.glob(f"*{created.id}*")):
            return
        time.sleep(1)
    raise AssertionError("the container is still there")

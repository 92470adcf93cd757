"""Agent upgrade through the public API on a real server and hostd (fake drivers: the guest agent is a real
process, the fake datastore has no mysqld — tests/day2/test_agent_upgrade_lxc.py has the real one): the new
build is queued as maintenance, waits for the window, runs on request, replaces the agent in place (same
PID: it execs) and the agent comes back with its identity and the new version."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reddwarf.common import agent_build
from reddwarf.server import db, maintenance
from reddwarf.v1 import database_pb2, database_pb2_grpc
from tests.day2.conftest import MAINTENANCE_ENV
from tests.fixtures.cluster import Cluster, start_cluster
from tests.functional.test_instance_flows import container_dir, get, pid_alive, wait_active, wait_task

from .builds import build_new_agent_wheel

WINDOW = database_pb2.MaintenanceWindow(weekday=3, start_time="10:00", duration_minutes=60)
OUTSIDE = dt.datetime(2026, 12, 2, 12, 0)  # a Wednesday, after the window


@pytest.fixture(scope="module")
def new_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_new_agent_wheel(tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, new_wheel: Path) -> Iterator[Cluster]:
    env = {**MAINTENANCE_ENV, "REDDWARF_AGENT_WHEEL": str(new_wheel)}
    with start_cluster(tmp_path_factory.mktemp("day2up"), server_env=env, driver="fake") as c:
        yield c


def agent_pid(c: Cluster, iid: str) -> int:
    return int((container_dir(c, iid) / "init.pid").read_text().split()[0])


def test_agent_upgrade_waits_for_the_window_then_replaces_the_agent_in_place(
        cluster: Cluster, new_wheel: Path) -> None:
    old, new = agent_build.installed_version(), agent_build.wheel_version(new_wheel)
    assert old != new
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="up", flavor="tiny", volume=database_pb2.Volume(size_gb=1), maintenance_window=WINDOW)),
        metadata=cluster.md)
    wait_active(cluster, inst.name)
    assert get(cluster, inst.name).agent_version == old
    pid = agent_pid(cluster, inst.id)

    # Tenants cannot upgrade agents; admins queue it as maintenance.
    with pytest.raises(grpc.RpcError) as e:
        cluster.instances.ScheduleAgentUpgrade(database_pb2.ScheduleAgentUpgradeRequest(name=inst.name),
                                               metadata=cluster.md)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with cluster.server.channel(cluster.server.admin_files) as ch:
        queued = database_pb2_grpc.InstancesStub(ch).ScheduleAgentUpgrade(
            database_pb2.ScheduleAgentUpgradeRequest(name=inst.name))
    assert [(m.kind, m.state) for m in queued.pending_maintenance] == [("agent_upgrade", "pending")]

    engine = db.make_engine(cluster.server.db_url)
    try:
        assert maintenance.tick(db.session_factory(engine), OUTSIDE) == []
    finally:
        engine.dispose()
    assert get(cluster, inst.name).agent_version == old

    got = cluster.instances.ApplyPendingMaintenance(
        database_pb2.ApplyPendingMaintenanceRequest(name=inst.name, kinds=["agent_upgrade"]), metadata=cluster.md)
    assert [m.state for m in got.pending_maintenance] == ["running"]
    wait_task(cluster, inst.id, "upgrade_agent")
    after = get(cluster, inst.name)
    assert after.agent_version == new
    # The same process, exec'd into the new build: the container's "PID 1" never went away.
    assert agent_pid(cluster, inst.id) == pid and pid_alive(pid)
    assert f"REDDWARF_AGENT_BUILD={new}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    # It serves commands with its identity (its certificate) as before.
    assert wait_active(cluster, inst.name).status == database_pb2.INSTANCE_STATUS_ACTIVE
    cluster.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=inst.name), metadata=cluster.md)

"""Maintenance windows (server/maintenance.py) through the public API on a real server and hostd (fake
drivers: the guest is a real agent process whose restart is a real restart of its datastore service).

The server's own scheduler is off (maintenance_check_seconds=0); the test runs `maintenance.tick` against the
same state DB with a clock of its own, as a second server would, so it can stand inside and outside the
window without waiting for a weekday. Steps share one instance and are chained with pytest-dependency."""
from __future__ import annotations

import datetime as dt

import grpc
import pytest

from reddwarf.common import agent_build
from reddwarf.server import maintenance
from reddwarf.v1 import configuration_pb2 as cpb
from reddwarf.v1 import configuration_pb2_grpc as cpb_grpc
from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until
from tests.functional.test_instance_flows import agent_actions, get, wait_active, wait_task

RESTART_REQUIRED = database_pb2.INSTANCE_STATUS_RESTART_REQUIRED
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE
# Wednesday 2026-12-02 is a Wednesday: the window is Wednesdays 10:00 UTC for 60 minutes.
WINDOW = database_pb2.MaintenanceWindow(weekday=3, start_time="10:00", duration_minutes=60)
INSIDE = dt.datetime(2026, 12, 2, 10, 30)
BEFORE = dt.datetime(2026, 12, 2, 9, 59)
AFTER = dt.datetime(2026, 12, 2, 11, 0)


@pytest.fixture(scope="module")
def inst(cluster: Cluster) -> database_pb2.Instance:
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="mw", flavor="tiny", volume=database_pb2.Volume(size_gb=1), maintenance_window=WINDOW)),
        metadata=cluster.md)


def restarts(c: Cluster, iid: str) -> int:
    """The fake datastore's restart is a stop and a start, each logged."""
    return sum(1 for a in agent_actions(c, iid) if a == "stop")


def refused(call, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return field_violations(e.value)


def test_window_arithmetic_handles_the_week_boundary() -> None:
    sunday_late = maintenance.Window(7, 23 * 60 + 30, 60)  # Sunday 23:30 .. Monday 00:30
    assert sunday_late.contains(dt.datetime(2026, 12, 7, 0, 15))  # Monday 00:15
    assert not sunday_late.contains(dt.datetime(2026, 12, 7, 0, 30))
    assert sunday_late.next_start(dt.datetime(2026, 12, 7, 1, 0)) == dt.datetime(2026, 12, 13, 23, 30)
    w = maintenance.Window(3, 600, 60)
    assert w.next_start(BEFORE) == dt.datetime(2026, 12, 2, 10, 0)
    assert w.next_start(INSIDE) == dt.datetime(2026, 12, 2, 10, 0)
    assert w.next_start(AFTER) == dt.datetime(2026, 12, 9, 10, 0)


@pytest.mark.dependency(name="active")
def test_instance_created_with_its_window_reports_it(cluster: Cluster, inst: database_pb2.Instance) -> None:
    got = wait_active(cluster, inst.name)
    got = get(cluster, inst.name)
    assert (got.maintenance_window.weekday, got.maintenance_window.start_time,
            got.maintenance_window.duration_minutes) == (3, "10:00", 60)
    assert list(got.pending_maintenance) == []
    # The agent said its version on its hello, and the server recorded it.
    assert got.agent_version == agent_build.installed_version()


@pytest.mark.dependency(depends=["active"])
@pytest.mark.parametrize(("window", "field"), [
    (database_pb2.MaintenanceWindow(weekday=0, start_time="10:00"), "instance.maintenance_window.weekday"),
    (database_pb2.MaintenanceWindow(weekday=8, start_time="10:00"), "instance.maintenance_window.weekday"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="24:00"), "instance.maintenance_window.start_time"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="9:00"), "instance.maintenance_window.start_time"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="10:00; DROP"), "instance.maintenance_window.start_time"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="10:60"), "instance.maintenance_window.start_time"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="10:00", duration_minutes=5),
     "instance.maintenance_window.duration_minutes"),
    (database_pb2.MaintenanceWindow(weekday=2, start_time="10:00", duration_minutes=1441),
     "instance.maintenance_window.duration_minutes"),
])
def test_bad_windows_are_refused_naming_the_field_and_change_nothing(
        cluster: Cluster, inst: database_pb2.Instance, window: database_pb2.MaintenanceWindow, field: str) -> None:
    update = database_pb2.UpdateInstanceRequest(
        instance=database_pb2.Instance(name=inst.name, maintenance_window=window, display_name="renamed"))
    update.update_mask.paths.extend(["maintenance_window", "display_name"])
    assert refused(lambda: cluster.instances.UpdateInstance(update, metadata=cluster.md)) == [field]
    got = get(cluster, inst.name)
    assert got.maintenance_window == WINDOW and got.display_name == "mw"
    # On create too: nothing is made.
    before = len(cluster.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=cluster.md).instances)
    assert refused(lambda: cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="mw-bad", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       maintenance_window=window)), metadata=cluster.md)) == [field]
    after = len(cluster.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=cluster.md).instances)
    assert after == before


@pytest.mark.dependency(name="queued", depends=["active"])
def test_a_restart_required_instance_gets_a_pending_restart_that_waits_for_its_window(
        cluster: Cluster, inst: database_pb2.Instance, sessions) -> None:  # type: ignore[no-untyped-def]
    cfg = cpb_grpc.ConfigurationsStub(cluster.channel)
    group = cfg.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="static", values={"innodb_log_buffer_size": str(32 * 1024 * 1024)})), metadata=cluster.md)
    cfg.AttachConfiguration(cpb.AttachConfigurationRequest(instance=inst.name, configuration=group.name),
                            metadata=cluster.md)
    assert get(cluster, inst.name).status == RESTART_REQUIRED
    before = restarts(cluster, inst.id)
    # Outside the window (just before, just after): queued, shown with its time, never started.
    for outside in (BEFORE, AFTER):
        assert maintenance.tick(sessions, outside) == []
    got = get(cluster, inst.name)
    assert [(m.kind, m.state) for m in got.pending_maintenance] == [("restart", "pending")]
    assert got.pending_maintenance[0].apply_after.ToDatetime().weekday() == 2  # a Wednesday
    assert got.pending_maintenance[0].apply_after.ToDatetime().strftime("%H:%M") == "10:00"
    assert got.status == RESTART_REQUIRED and not got.task
    assert restarts(cluster, inst.id) == before


@pytest.mark.dependency(name="applied", depends=["queued"])
def test_inside_the_window_the_restart_runs_once_even_with_two_schedulers(
        cluster: Cluster, inst: database_pb2.Instance, sessions) -> None:  # type: ignore[no-untyped-def]
    before = restarts(cluster, inst.id)
    first = maintenance.tick(sessions, INSIDE)
    second = maintenance.tick(sessions, INSIDE)  # another server's pass at the same moment
    assert len(first) == 1 and second == []
    wait_task(cluster, inst.id, "restart_instance")
    assert restarts(cluster, inst.id) == before + 1
    got = wait_active(cluster, inst.name)
    assert got.status == ACTIVE
    maintenance.tick(sessions, INSIDE)  # closes the action
    assert list(get(cluster, inst.name).pending_maintenance) == []


@pytest.mark.dependency(depends=["applied"])
def test_apply_pending_runs_it_at_once_outside_the_window(
        cluster: Cluster, inst: database_pb2.Instance, sessions) -> None:  # type: ignore[no-untyped-def]
    # Nothing pending: refused, naming the request's field.
    assert refused(lambda: cluster.instances.ApplyPendingMaintenance(
        database_pb2.ApplyPendingMaintenanceRequest(name=inst.name), metadata=cluster.md),
        grpc.StatusCode.FAILED_PRECONDITION) == ["name"]
    assert refused(lambda: cluster.instances.ApplyPendingMaintenance(
        database_pb2.ApplyPendingMaintenanceRequest(name=inst.name, kinds=["reboot"]), metadata=cluster.md)) \
        == ["kinds"]
    cfg = cpb_grpc.ConfigurationsStub(cluster.channel)
    cfg.DetachConfiguration(cpb.DetachConfigurationRequest(instance=inst.name), metadata=cluster.md)
    assert get(cluster, inst.name).status == RESTART_REQUIRED
    assert maintenance.tick(sessions, AFTER) == []
    assert [m.kind for m in get(cluster, inst.name).pending_maintenance] == ["restart"]
    before = restarts(cluster, inst.id)
    got = cluster.instances.ApplyPendingMaintenance(
        database_pb2.ApplyPendingMaintenanceRequest(name=inst.name), metadata=cluster.md)
    assert [m.state for m in got.pending_maintenance] == ["running"]
    wait_task(cluster, inst.id, "restart_instance")
    assert restarts(cluster, inst.id) == before + 1
    assert wait_active(cluster, inst.name).status == ACTIVE


@pytest.mark.dependency(depends=["active"])
def test_the_window_changes_with_update(cluster: Cluster, inst: database_pb2.Instance) -> None:
    update = database_pb2.UpdateInstanceRequest(instance=database_pb2.Instance(
        name=inst.name, maintenance_window=database_pb2.MaintenanceWindow(weekday=6, start_time="23:45")))
    update.update_mask.paths.append("maintenance_window")
    got = cluster.instances.UpdateInstance(update, metadata=cluster.md)
    assert (got.maintenance_window.weekday, got.maintenance_window.start_time,
            got.maintenance_window.duration_minutes) == (6, "23:45", 60)
    assert get(cluster, inst.name).maintenance_window == got.maintenance_window


def test_an_upgrade_asked_for_the_window_is_checked_now_and_starts_only_in_the_window(
        cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    from reddwarf.v1 import admin_pb2

    up = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="mw-up", flavor="tiny", volume=database_pb2.Volume(size_gb=1), maintenance_window=WINDOW)),
        metadata=cluster.md)
    wait_active(cluster, up.name)
    # Checked when asked: an unknown version is refused at once, and nothing is queued.
    assert refused(lambda: cluster.instances.UpgradeInstance(database_pb2.UpgradeInstanceRequest(
        name=up.name, datastore_version="99.9", in_maintenance_window=True), metadata=cluster.md)) \
        == ["datastore_version"]
    assert list(get(cluster, up.name).pending_maintenance) == []
    queued = cluster.instances.UpgradeInstance(database_pb2.UpgradeInstanceRequest(
        name=up.name, datastore_version="11.8", in_maintenance_window=True), metadata=cluster.md)
    assert [(m.kind, m.state) for m in queued.pending_maintenance] == [("upgrade", "pending")]
    assert queued.pending_maintenance[0].apply_after.ToDatetime().strftime("%a %H:%M") == "Wed 10:00"

    def upgrade_tasks() -> list[str]:
        return [t.id for t in cluster.admin.ListTasks(admin_pb2.ListTasksRequest(resource=up.name)).tasks
                if t.kind == "upgrade_instance"]
    assert maintenance.tick(sessions, BEFORE) == [] and upgrade_tasks() == []
    started = maintenance.tick(sessions, INSIDE)
    assert len(started) == 1 and upgrade_tasks() == started
    # The fake guest takes no backups, so the task ends at its first step; the instance stays on 10.11.
    until(lambda: cluster.admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{started[0]}")).state,
          lambda st: st in (admin_pb2.TASK_STATE_SUCCEEDED, admin_pb2.TASK_STATE_FAILED), timeout=60,
          what="the upgrade task ended", interval=0.2)
    assert get(cluster, up.name).datastore_version == "10.11"
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=up.name), metadata=cluster.md)

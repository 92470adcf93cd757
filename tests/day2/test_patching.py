"""Patching (server/patching.py): PatchDatastoreVersion records a template revision and queues a patch per
instance; the maintenance scheduler moves instances onto it one at a time per datastore version.

A real server and hostd with fake drivers (the move itself, upgrade_instance, is covered on LXC by
tests/day2/test_day2_lxc.py); as in tests/day2/test_maintenance.py the test runs `maintenance.tick` itself
against the state DB with its own clock. The fake guest takes no backups, so each patch task ends at its first
step: enough to see that a second patch starts only once the first has ended."""
from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.states import InstanceStatus, TaskState
from reddwarf.server import db, maintenance, models
from reddwarf.v1 import admin_pb2, database_pb2, host_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until
from tests.functional.test_instance_flows import get, hostd, wait_active
from tests.server.test_instance_parts import add_instance, healthy

WINDOW = database_pb2.MaintenanceWindow(weekday=3, start_time="10:00", duration_minutes=60)
INSIDE = dt.datetime(2026, 12, 2, 10, 30)  # a Wednesday, inside the window
BEFORE = dt.datetime(2026, 12, 2, 9, 0)
ENDED = (admin_pb2.TASK_STATE_SUCCEEDED, admin_pb2.TASK_STATE_FAILED, admin_pb2.TASK_STATE_CANCELLED)


def create(cluster: Cluster, name: str) -> database_pb2.Instance:
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name=name, flavor="tiny", volume=database_pb2.Volume(size_gb=1), maintenance_window=WINDOW)),
        metadata=cluster.md)
    return wait_active(cluster, inst.name)


def patch(cluster: Cluster, version: str, revision: int, **kw: object) -> admin_pb2.PatchDatastoreVersionResponse:
    return cluster.admin.PatchDatastoreVersion(admin_pb2.PatchDatastoreVersionRequest(
        version=version, revision=revision, **kw))  # type: ignore[arg-type]


def revisions(sessions) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return {f"{v.datastore_id} {v.version}": v.template_revision for v in s.scalars(
            select(models.DatastoreVersion))}


def patch_tasks(cluster: Cluster, name: str) -> list[admin_pb2.Task]:
    return [t for t in cluster.admin.ListTasks(admin_pb2.ListTasksRequest(resource=name)).tasks
            if t.kind == "upgrade_instance"]


def test_bad_input_is_refused_naming_the_field_and_changes_nothing(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    before = revisions(sessions)
    for kw, field in (({"version": "99.9", "revision": 1}, "version"),
                      ({"version": "", "revision": 1}, "version"),
                      ({"version": "10.11", "revision": 1, "datastore": "postgres"}, "datastore"),
                      ({"version": "10.11", "revision": 0}, "revision"),
                      ({"version": "10.11", "revision": -3}, "revision"),
                      ({"version": "10.11", "revision": 10_001}, "revision"),
                      ({"version": "10.11'; DROP TABLE instances; --", "revision": 1}, "version")):
        with pytest.raises(grpc.RpcError) as e:
            cluster.admin.PatchDatastoreVersion(admin_pb2.PatchDatastoreVersionRequest(**kw))  # type: ignore[arg-type]
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, kw
        assert field_violations(e.value) == [field], kw
    assert revisions(sessions) == before
    with sessions() as s:
        assert s.scalar(select(models.PendingMaintenance).where(models.PendingMaintenance.kind == "patch")) is None


def test_patches_are_queued_per_instance_and_run_one_at_a_time(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    a, b = create(cluster, "patch-a"), create(cluster, "patch-b")
    res = patch(cluster, "10.11", 2)
    assert (res.datastore, res.version, res.revision) == ("mariadb", "10.11", 2)
    assert sorted(res.instances) == sorted([a.name, b.name])
    assert revisions(sessions)["mariadb 10.11"] == 2
    for inst in (a, b):
        pm = get(cluster, inst.name).pending_maintenance
        assert [(m.kind, m.state) for m in pm] == [("patch", "pending")]
        assert "revision 2" in pm[0].description
    # Not an older or equal revision now.
    with pytest.raises(grpc.RpcError) as e:
        patch(cluster, "10.11", 2)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["revision"]

    assert maintenance.tick(sessions, BEFORE) == []
    first = maintenance.tick(sessions, INSIDE)
    assert len(first) == 1  # two are due; one starts
    started = [i for i in (a, b) if patch_tasks(cluster, i.name)]
    assert len(started) == 1
    other = b if started[0] is a else a
    task = patch_tasks(cluster, started[0].name)[0]
    assert task.id == first[0]
    with sessions() as s:
        t = s.get(models.Task, task.id)
        assert t is not None and (t.params["from"], t.params["to"], t.params["template_revision"]) \
            == ("10.11", "10.11", 2)
    until(lambda: cluster.admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{task.id}")).state,
          lambda st: st in ENDED, timeout=60, what="the first patch ended", interval=0.2)
    second = maintenance.tick(sessions, INSIDE)
    assert len(second) == 1 and [t.id for t in patch_tasks(cluster, other.name)] == second
    until(lambda: cluster.admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{second[0]}")).state,
          lambda st: st in ENDED, timeout=60, what="the second patch ended", interval=0.2)
    # The fake guest takes no backup: both moves stopped before touching anything; the instances stay on
    # the revision they run, so a migration would recreate them from it.
    with sessions() as s:
        for inst in (a, b):
            row = s.get(models.Instance, inst.id)
            assert row is not None and row.template_revision == 0


def test_the_scheduler_holds_a_patch_while_another_of_the_version_runs(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    """Deterministic: a patch task of 10.11 held active in the DB (as a running one on another server)."""
    c = create(cluster, "patch-c")
    patch(cluster, "10.11", 3)
    with sessions() as s, s.begin():
        others = [r.id for r in s.scalars(select(models.Instance).where(
            models.Instance.deleted_at.is_(None), models.Instance.id != c.id))]
        # Leased far ahead by a server that is not there: the task engine leaves it alone.
        holder = models.Task(id=str(uuid.uuid4()), kind="upgrade_instance", resource=f"instances/{others[0]}",
                             state=TaskState.RUNNING, lease_owner="test-patching",
                             lease_expires=dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(hours=1),
                             params={"from": "10.11", "to": "10.11", "template_revision": 3})
        s.add(holder)
    try:
        assert maintenance.tick(sessions, INSIDE) == []
        assert [(m.kind, m.state) for m in get(cluster, c.name).pending_maintenance][0] == ("patch", "pending")
    finally:
        with sessions() as s, s.begin():
            s.execute(models.Task.__table__.update().where(models.Task.id == holder.id).values(state=TaskState.CANCELLED))
    # Released: the next pass starts one patch (of whichever instance is first), still only one.
    assert len(maintenance.tick(sessions, INSIDE)) == 1


def test_new_instances_take_the_versions_current_revision(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    d = create(cluster, "patch-d")
    with sessions() as s:
        row = s.get(models.Instance, d.id)
        assert row is not None and row.template_revision == revisions(sessions)["mariadb 10.11"] == 3
    assert [m.kind for m in get(cluster, d.name).pending_maintenance] == []
    # The container came from that revision's template (hostd names it; the fake driver takes it as is). A
    # create passes no revision of its own, as a migration or evacuation does not: they take the instance's.
    assert hostd(cluster).GetContainer(host_pb2.ContainerRef(id=d.id)).template == "bookworm-r3"
    a = next(i for i in cluster.instances.ListInstances(database_pb2.ListInstancesRequest(),
                                                        metadata=cluster.md).instances if i.display_name == "patch-a")
    assert hostd(cluster).GetContainer(host_pb2.ContainerRef(id=a.id)).template == "fake"



def test_the_cli_patches_a_version_and_refuses_a_revision_not_newer(cluster: Cluster, sessions) -> None:  # type: ignore[no-untyped-def]
    files = cluster.server.admin_files
    env = {"REDDWARF_ENDPOINT": cluster.server.api, "REDDWARF_CA": str(files.ca), "REDDWARF_CERT": str(files.cert),
           "REDDWARF_KEY": str(files.key), "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["admin", "datastore", "patch", "10.11", "--revision", "3"], env=env)
    assert r.exit_code != 0 and "revision" in r.output
    assert revisions(sessions)["mariadb 10.11"] == 3
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "admin", "datastore", "patch", "10.11", "--revision", "4", "--now"],
                           env=env)
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert (out["version"], out["revision"]) == ("10.11", 4) and out["instances"]
    assert revisions(sessions)["mariadb 10.11"] == 4
    with sessions() as s:
        for name in out["instances"]:
            a = s.scalar(select(models.PendingMaintenance).where(
                models.PendingMaintenance.open_key == f"{name.removeprefix('instances/')}:patch"))
            assert a is not None and a.apply_now and a.params["revision"] == 4

# ---------------------------------------------------------------------------- without a server

@pytest.fixture
def session(tmp_path) -> Iterator[Session]:  # type: ignore[no-untyped-def]
    engine = create_engine(f"sqlite:///{tmp_path}/state.db")
    models.Base.metadata.create_all(engine)
    with sessionmaker(bind=engine, expire_on_commit=False)() as s:
        db.seed(s)
        s.add(models.Tenant(id="t1"))
        s.flush()
        yield s
    engine.dispose()


def test_a_patch_onto_a_revision_the_instance_runs_already_is_refused(session: Session) -> None:
    from reddwarf.server.upgrade import submit_upgrade
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    row.template_revision = 2
    for rev in (1, 2):
        with pytest.raises(InvalidArgument) as exc:
            submit_upgrade(session, row, "10.11", rev)
        assert exc.value.violations[0][0] == "revision"
    assert session.scalar(select(models.Task)) is None
    assert submit_upgrade(session, row, "10.11", 3).params["template_revision"] == 3


def test_a_version_upgrade_takes_the_target_versions_current_revision(session: Session) -> None:
    from reddwarf.server.patching import patch_version
    from reddwarf.server.upgrade import submit_upgrade
    row = add_instance(session, "i1", status=InstanceStatus.ACTIVE, **healthy())
    patched = patch_version(session, "", "11.8", 4)
    assert patched.instances == []  # nothing runs 11.8 yet
    assert submit_upgrade(session, row, "11.8").params["template_revision"] == 4

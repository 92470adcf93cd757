"""The event history's recording rules on their own: which methods are changes, what a request looks like
once redacted, which resource a call acted on, status events written in the changing transaction, and
retention pruning on a real state DB (SQLite, migrated by Alembic)."""
from __future__ import annotations

import datetime as dt
import json

import pytest

from reddwarf.common.clock import now
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.states import BackupStatus, HostState, InstanceStatus
from reddwarf.server import audit, db, models
from reddwarf.server.settings import Settings
from reddwarf.v1 import admin_pb2, common_pb2, database_pb2


@pytest.mark.parametrize("method,change", [
    ("/reddwarf.v1.Instances/CreateInstance", True), ("/reddwarf.v1.Users/UpdateUser", True),
    ("/reddwarf.v1.Admin/DrainHost", True), ("/reddwarf.v1.Logs/SaveLog", True),
    ("/reddwarf.v1.Instances/GetInstance", False), ("/reddwarf.v1.Instances/ListInstances", False),
    ("/reddwarf.v1.Instances/WatchInstance", False), ("/reddwarf.v1.Logs/TailLog", False),
    ("/grpc.health.v1.Health/Check", False), ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", False),
])
def test_changes_are_every_method_but_reads(method, change):
    assert audit.is_change(method) is change


def test_secrets_are_redacted_at_any_depth_and_nothing_else_is():
    req = database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="shop", flavor="tiny"),
        users=[common_pb2.User(user="app", password="Hunter2"), common_pb2.User(user="nopw")])
    s = json.loads(audit.summarize(req))
    assert s["users"][0] == {"user": "app", "password": "<redacted>"}
    assert s["users"][1] == {"user": "nopw"} and s["instance"]["display_name"] == "shop"
    update = json.loads(audit.summarize(database_pb2.UpdateUserRequest(name="instances/i/users/a@%", password="pw")))
    assert update["password"] == "<redacted>"
    cert = json.loads(audit.summarize(admin_pb2.IssueCertificateRequest(role="client", id="x", csr_pem="-----BEGIN")))
    assert cert["csr_pem"] == "<redacted>" and "BEGIN" not in json.dumps(cert)
    token = json.loads(audit.summarize(admin_pb2.RevokeTokenRequest(name="tokens/abc")))
    assert token == {"name": "tokens/abc"}


def test_a_huge_request_is_cut():
    big = database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(display_name="x" * 10000))
    assert len(audit.summarize(big)) == audit.SUMMARY_MAX


def test_the_resource_comes_from_the_request_or_else_what_a_create_returned():
    assert audit.resource_of(database_pb2.CreateDatabaseRequest(parent="instances/abc")) == "instances/abc"
    assert audit.resource_of(database_pb2.DeleteUserRequest(name="instances/abc/users/u@%")) == "instances/abc"
    assert audit.resource_of(database_pb2.CreateInstanceRequest(), database_pb2.Instance(name="instances/new")) \
        == "instances/new"
    assert audit.resource_of(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(instance="instances/i"))) \
        == "instances/i"
    assert audit.resource_of(database_pb2.GetLimitsRequest()) == ""


def test_the_request_id_is_the_callers_bounded_or_made_up():
    assert audit.new_request_id((("x-request-id", " abc "),)) == "abc"
    assert len(audit.new_request_id((("x-request-id", "r" * 500),))) == audit.REQUEST_ID_MAX
    assert audit.new_request_id(()).startswith("req-")


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    with factory() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="t1"))
    try:
        yield factory
    finally:
        audit.stop_recording(factory)
        engine.dispose()


def events(sessions) -> list[models.Event]:
    with sessions() as s:
        return list(s.query(models.Event).order_by(models.Event.id))


def test_status_changes_of_instances_backups_and_hosts_are_recorded_with_the_change(sessions):
    audit.record_status_changes(sessions)
    with sessions() as s, s.begin():
        s.add(models.Host(id="h1", address="127.0.0.1:1"))
    with sessions() as s, s.begin():
        s.add(models.Instance(id="i1", tenant_id="t1", display_name="x", flavor_id="tiny", volume_size_gb=1,
                              datastore="mariadb", datastore_version="10.11"))
    db.update_row(sessions, models.Instance, "i1", status=InstanceStatus.ACTIVE)
    db.update_row(sessions, models.Instance, "i1", status=InstanceStatus.ACTIVE, address="10.0.0.2")  # no change
    db.update_row(sessions, models.Host, "h1", state=HostState.DRAINING)
    with sessions() as s, s.begin():
        s.add(models.Backup(id="b1", tenant_id="t1", instance_id="i1", display_name="b"))
    db.update_row(sessions, models.Backup, "b1", status=BackupStatus.COMPLETED)
    with sessions() as s, s.begin():
        s.delete(s.get(models.Backup, "b1"))
    got = [(e.kind, e.tenant_id, e.resource, e.previous_status, e.status) for e in events(sessions)]
    assert got == [
        ("status", "", "hosts/h1", "", "up"), ("status", "t1", "instances/i1", "", "BUILD"),
        ("status", "t1", "instances/i1", "BUILD", "ACTIVE"), ("status", "", "hosts/h1", "up", "draining"),
        ("status", "t1", "backups/b1", "", "NEW"), ("status", "t1", "backups/b1", "NEW", "COMPLETED"),
        ("status", "t1", "backups/b1", "COMPLETED", "DELETED")]


def test_a_change_rolled_back_leaves_no_event(sessions):
    audit.record_status_changes(sessions)
    with pytest.raises(RuntimeError), sessions() as s, s.begin():
        s.add(models.Host(id="h2", address="x"))
        s.flush()
        raise RuntimeError("the transaction fails")
    assert events(sessions) == []


def test_events_older_than_the_retention_are_pruned(sessions):
    with sessions() as s, s.begin():
        for days in (400, 91, 89, 1, 0):
            s.add(models.Event(kind="api", time=now() - dt.timedelta(days=days), method=f"m{days}"))
    assert audit.prune(sessions, 90, batch=1) == 2  # batches of one: the loop goes on until none is left
    assert [e.method for e in events(sessions)] == ["m89", "m1", "m0"]
    assert audit.prune(sessions, 0) == 0  # 0: kept forever
    assert len(events(sessions)) == 3


def test_retention_settings_are_checked():
    with pytest.raises(InvalidArgument) as e:
        Settings(state_dir="/tmp/x", event_retention_days=-1)
    assert e.value.violations[0][0] == "event_retention_days"
    with pytest.raises(InvalidArgument) as e:
        Settings(state_dir="/tmp/x", event_prune_seconds=0)
    assert e.value.violations[0][0] == "event_prune_seconds"

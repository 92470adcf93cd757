"""The pieces behind the Instances service, without a server: the status a user sees (derived from the
task, the stored state and the guest's heartbeat), ownership, quotas and placement arithmetic, sealed
passwords and the create request's validation."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator

import pytest
from cryptography.fernet import InvalidToken
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import InvalidArgument, NotFound, ResourceExhausted
from reddwarf.common.pki import Identity
from reddwarf.common.states import InstanceStatus
from reddwarf.server import models, tasks
from reddwarf.server.auth import Principal
from reddwarf.server.instance_validation import validate_create
from reddwarf.server.instance_views import derived_status, instance_pb, owned_instance
from reddwarf.server.models import utcnow
from reddwarf.server.quotas import check_instance_quota, tenant_allocation
from reddwarf.server.sealing import PasswordSealer
from reddwarf.v1 import common_pb2, database_pb2

EXPIRY = 20.0


@pytest.fixture
def session(tmp_path) -> Iterator[Session]:
    engine = create_engine(f"sqlite:///{tmp_path}/state.db")
    models.Base.metadata.create_all(engine)
    with sessionmaker(bind=engine, expire_on_commit=False)() as s:
        s.add(models.Tenant(id="t1", quota_instances=2, quota_memory_mb=3000, quota_volume_gb=10))
        s.add(models.Tenant(id="t2"))
        s.add(models.Flavor(id="small", display_name="small", memory_mb=1024))
        s.flush()
        yield s
    engine.dispose()


def add_instance(s: Session, iid: str, tenant: str = "t1", **values: object) -> models.Instance:
    row = models.Instance(id=iid, tenant_id=tenant, display_name=iid, flavor_id="small", volume_size_gb=2,
                          datastore="mariadb", datastore_version="10.11", **values)
    s.add(row)
    s.flush()
    return row


def principal(tenant: str, admin: bool = False) -> Principal:
    return Principal(tenant, admin, Identity(role="client", id="c", serial=1))


def healthy(state: str = "SERVICE_STATE_RUNNING", age: float = 0) -> dict[str, object]:
    return {"health": {"serviceState": state}, "health_at": utcnow() - dt.timedelta(seconds=age)}


def test_a_stored_build_error_or_failed_status_is_shown_as_stored(session: Session) -> None:
    for status in (InstanceStatus.BUILD, InstanceStatus.ERROR, InstanceStatus.FAILED):
        row = add_instance(session, f"i-{status}", status=status, **healthy())
        assert derived_status(session, row, EXPIRY) == (status, None)


def test_an_active_instance_is_shutdown_when_its_guest_is_silent_or_its_mysqld_is_down(session: Session) -> None:
    assert derived_status(session, add_instance(session, "fresh", status=InstanceStatus.ACTIVE, **healthy()), EXPIRY)[0] \
        == InstanceStatus.ACTIVE
    assert derived_status(session, add_instance(session, "stale", status=InstanceStatus.ACTIVE, **healthy(age=60)), EXPIRY)[0] \
        == InstanceStatus.SHUTDOWN
    assert derived_status(session, add_instance(session, "never", status=InstanceStatus.ACTIVE), EXPIRY)[0] \
        == InstanceStatus.SHUTDOWN
    crashed = add_instance(session, "crashed", status=InstanceStatus.ACTIVE, **healthy("SERVICE_STATE_CRASHED"))
    assert derived_status(session, crashed, EXPIRY)[0] == InstanceStatus.SHUTDOWN


def test_a_running_task_decides_the_status_and_a_deleted_row_is_deleting(session: Session) -> None:
    row = add_instance(session, "resizing", status=InstanceStatus.ACTIVE, **healthy())
    task = tasks.submit(session, "resize_volume", "instances/resizing")
    session.flush()
    assert derived_status(session, row, EXPIRY) == (InstanceStatus.RESIZE, task)
    restoring = add_instance(session, "restoring", restored_from="b1")
    tasks.submit(session, "create_instance", "instances/restoring")
    session.flush()
    assert derived_status(session, restoring, EXPIRY)[0] == InstanceStatus.RESTORING
    gone = add_instance(session, "gone", status="DELETED", deleted_at=utcnow())
    assert derived_status(session, gone, EXPIRY)[0] == InstanceStatus.DELETING


def test_the_instance_message_carries_the_derived_status_and_a_fault_only_in_error(session: Session) -> None:
    row = add_instance(session, "broken", status=InstanceStatus.ERROR, fault_message="no host", port=3306, address="10.0.0.2")
    pb = instance_pb(session, row, EXPIRY)
    assert pb.status == database_pb2.INSTANCE_STATUS_ERROR and pb.fault.message == "no host"
    assert [(e.host, e.port) for e in pb.endpoints] == [("10.0.0.2", 3306)]
    ok = add_instance(session, "ok", status=InstanceStatus.ACTIVE, fault_message="old fault", **healthy())
    assert not instance_pb(session, ok, EXPIRY).HasField("fault")


def test_another_tenants_instance_is_not_found_but_an_admin_sees_it(session: Session) -> None:
    add_instance(session, "mine")
    assert owned_instance(session, principal("t1"), "instances/mine").id == "mine"
    with pytest.raises(NotFound):
        owned_instance(session, principal("t2"), "instances/mine")
    assert owned_instance(session, principal("admin", admin=True), "mine").id == "mine"
    add_instance(session, "deleted", deleted_at=utcnow())
    with pytest.raises(NotFound):
        owned_instance(session, principal("t1"), "instances/deleted")


def test_quota_counts_live_instances_and_names_the_first_limit_exceeded(session: Session) -> None:
    add_instance(session, "a")
    add_instance(session, "b", deleted_at=utcnow())  # deleted: holds nothing
    used = tenant_allocation(session, "t1")
    assert (used.instances, used.memory_mb, used.volume_gb) == (1, 1024, 2)
    tenant = session.get(models.Tenant, "t1")
    assert tenant is not None
    check_instance_quota(session, tenant, 1024, 8)
    with pytest.raises(ResourceExhausted) as e:
        check_instance_quota(session, tenant, 2048, 2)
    assert e.value.violations == [("instance.flavor", "quota exceeded: memory_mb would be 3072, limit 3000")]
    add_instance(session, "c")
    with pytest.raises(ResourceExhausted) as e:
        check_instance_quota(session, tenant, 1, 1)
    assert e.value.violations[0][0] == "instance"


def test_sealed_passwords_unseal_only_with_the_same_secret() -> None:
    sealer = PasswordSealer(b"s" * 32)
    sealed = sealer.seal("correct horse")
    assert sealed.startswith("sealed:") and "correct horse" not in sealed
    assert sealer.unseal(sealed) == "correct horse"
    with pytest.raises(InvalidToken):
        PasswordSealer(b"t" * 32).unseal(sealed)


def test_a_create_request_granting_a_database_it_does_not_create_is_refused() -> None:
    req = database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="db", flavor="flavors/small"),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="a-long-password-1", databases=["shop", "other"])])
    with pytest.raises(InvalidArgument) as e:
        validate_create(req)
    assert e.value.violations[0][0] == "users[0].databases[1]"
    del req.users[0].databases[1]
    validate_create(req)
    with pytest.raises(InvalidArgument) as e:
        validate_create(database_pb2.CreateInstanceRequest())
    assert [f for f, _ in e.value.violations] == ["instance.display_name", "instance.flavor"]

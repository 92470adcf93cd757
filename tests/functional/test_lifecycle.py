"""An instance's lifecycle controls against the fake hostd: tags and deletion protection at create,
UpdateInstance (rename, protection, tags; every bad field named and nothing changed), tag filters on the
lists, stop and start (the container stopped and started again, SHUTDOWN between, guest calls refused
while stopped), a delete refused by deletion protection, and a final backup that fails (the fake datastore
has none): the instance is not deleted and its fault says why, the FAILED backup keeps its tags.

The steps share one instance and are chained with pytest-dependency."""
from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from reddwarf.common import states
from reddwarf.v1 import database_pb2, database_pb2_grpc, host_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until
from tests.functional.test_instance_flows import agent_actions, get, hostd, wait_active, wait_task

SHUTDOWN = database_pb2.INSTANCE_STATUS_SHUTDOWN


def status(i: database_pb2.Instance) -> str:
    return states.from_pb(states.InstanceStatus, i.status).value


def update(c: Cluster, instance: database_pb2.Instance, *paths: str) -> database_pb2.Instance:
    return c.instances.UpdateInstance(database_pb2.UpdateInstanceRequest(
        instance=instance, update_mask=field_mask_pb2.FieldMask(paths=list(paths))), metadata=c.md)


def refused(call, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> tuple[list[str], str]:
    """The fields a call refused with `code` names, and its message."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return field_violations(e.value), e.value.details()


def listed(c: Cluster, *tags: str) -> set[str]:
    return {i.display_name for i in c.instances.ListInstances(
        database_pb2.ListInstancesRequest(tags=list(tags)), metadata=c.md).instances}


@pytest.fixture(scope="module")
def ledger(cluster: Cluster) -> database_pb2.Instance:
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="ledger", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       tags={"env": "prod", "team": "billing"}, deletion_protection=True)),
        metadata=cluster.md)


@pytest.fixture(scope="module")
def scratch(cluster: Cluster) -> database_pb2.Instance:
    """A second, untagged instance: what the tag filters must leave out."""
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="scratch", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       tags={"env": "dev"})), metadata=cluster.md)


@pytest.mark.dependency(name="created")
def test_tags_and_deletion_protection_are_kept_from_create(cluster, ledger, scratch):
    inst = wait_active(cluster, ledger.name)
    wait_active(cluster, scratch.name)
    assert dict(inst.tags) == {"env": "prod", "team": "billing"} and inst.deletion_protection


def test_a_create_with_a_bad_tag_is_refused_naming_the_field_and_makes_nothing(cluster):
    c = cluster
    before = listed(c)
    for tags in ({"reddwarf:owner": "x"}, {"bad\"key": "x"}, {"k": "v;drop"}, {"k" * 129: "v"},
                 {f"k{n}": "v" for n in range(51)}):
        fields, _ = refused(lambda t=tags: c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="bad-tags", flavor="tiny",
                                           volume=database_pb2.Volume(size_gb=1), tags=t)), metadata=c.md))
        assert fields == ["instance.tags"]
    assert listed(c) == before


@pytest.mark.dependency(depends=["created"])
def test_lists_filter_on_tags(cluster, ledger, scratch):
    c = cluster
    assert listed(c, "env=prod") == {"ledger"}
    assert listed(c, "env") >= {"ledger", "scratch"}
    assert listed(c, "env=prod", "team=billing") == {"ledger"}
    assert listed(c, "env=prod", "team=ops") == set()
    assert listed(c, "nosuchkey") == set()
    fields, _ = refused(lambda: listed(c, "bad\"key=1"))
    assert fields == ["tags[0]"]


@pytest.mark.dependency(name="updated", depends=["created"])
def test_update_renames_and_changes_tags_one_by_one(cluster, ledger):
    c = cluster
    out = update(c, database_pb2.Instance(name=ledger.name, display_name="ledger-2"), "display_name")
    assert out.display_name == "ledger-2" and dict(out.tags) == {"env": "prod", "team": "billing"}
    out = update(c, database_pb2.Instance(name=ledger.id, tags={"owner": "ann"}), "tags.owner", "tags.team")
    assert dict(out.tags) == {"env": "prod", "owner": "ann"}  # owner set, team removed, env untouched
    assert get(c, ledger.name).display_name == "ledger-2" and out.deletion_protection
    out = update(c, database_pb2.Instance(name=ledger.name, tags={"env": "prod", "team": "billing"}), "tags")
    assert dict(out.tags) == {"env": "prod", "team": "billing"}


@pytest.mark.dependency(depends=["updated"])
def test_a_bad_update_is_refused_naming_the_field_and_changes_nothing(cluster, ledger):
    c = cluster
    before = get(c, ledger.name)
    cases = [
        ((database_pb2.Instance(name=ledger.name, display_name="x"),), ["update_mask"]),
        ((database_pb2.Instance(name=ledger.name, display_name="x"), "flavor"), ["update_mask"]),
        ((database_pb2.Instance(name=ledger.name, display_name="x"), "display_name", "display_name"),
         ["update_mask"]),
        ((database_pb2.Instance(name=ledger.name, display_name="  "), "display_name"), ["instance.display_name"]),
        ((database_pb2.Instance(name=ledger.name, display_name="a\nb"), "display_name"),
         ["instance.display_name"]),
        ((database_pb2.Instance(name=ledger.name, display_name="ok", tags={"reddwarf:x": "1"}), "display_name",
          "tags"), ["instance.tags"]),
        ((database_pb2.Instance(name=ledger.name, tags={"k": "v"}), "tags", "tags.k"), ["update_mask"]),
        ((database_pb2.Instance(name=ledger.name), "tags.bad\"key"), ["update_mask"]),
        ((database_pb2.Instance(name=ledger.name, tags={f"k{n}": "v" for n in range(49)}), "tags.k0", "tags.k1",
          *[f"tags.k{n}" for n in range(2, 49)]), ["instance.tags"]),  # 49 + env + team = 51
    ]
    for args, fields in cases:
        got, _ = refused(lambda a=args: update(c, *a))
        assert got == fields, (args, got)
    fields, _ = refused(lambda: update(c, database_pb2.Instance(name="instances/nope", display_name="x"),
                                       "display_name"), grpc.StatusCode.NOT_FOUND)
    assert fields == ["instance.name"]
    other = c.other_tenant_md()
    with pytest.raises(grpc.RpcError) as e:
        c.instances.UpdateInstance(database_pb2.UpdateInstanceRequest(
            instance=database_pb2.Instance(name=ledger.name, display_name="mine"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), metadata=other)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    after = get(c, ledger.name)
    assert (after.display_name, dict(after.tags), after.deletion_protection) == \
        (before.display_name, dict(before.tags), before.deletion_protection)


@pytest.mark.dependency(name="protected", depends=["updated"])
def test_deletion_protection_refuses_a_delete_and_changes_nothing(cluster, ledger):
    c = cluster
    fields, message = refused(lambda: c.instances.DeleteInstance(
        database_pb2.DeleteInstanceRequest(name=ledger.name), metadata=c.md), grpc.StatusCode.FAILED_PRECONDITION)
    assert fields == ["deletion_protection"] and "deletion_protection" in message
    inst = get(c, ledger.name)
    assert status(inst) == "ACTIVE" and not inst.task
    ctr = hostd(c).GetContainer(host_pb2.ContainerRef(id=ledger.id))
    assert ctr.state == host_pb2.CONTAINER_STATE_RUNNING


@pytest.mark.dependency(name="stopped", depends=["created"])
def test_stop_stops_the_datastore_and_the_container_and_shows_shutdown(cluster, ledger):
    c = cluster
    inst = c.instances.StopInstance(database_pb2.StopInstanceRequest(name=ledger.name), metadata=c.md)
    assert status(inst) == "STOPPING"
    wait_task(c, ledger.id, "stop_instance")
    assert get(c, ledger.name).status == SHUTDOWN
    ctr = hostd(c).GetContainer(host_pb2.ContainerRef(id=ledger.id))
    assert ctr.state == host_pb2.CONTAINER_STATE_STOPPED and ctr.init_pid == 0
    assert hostd(c).GetVolume(host_pb2.VolumeRef(id=ledger.id)).size_gb == 1  # the volume stays
    assert "stop" in agent_actions(c, ledger.id)


@pytest.mark.dependency(depends=["stopped"])
def test_a_stopped_instance_refuses_what_needs_a_running_guest(cluster, ledger):
    c = cluster
    bk = database_pb2_grpc.BackupsStub(c.channel)
    calls = [
        lambda: c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=ledger.name), metadata=c.md),
        lambda: c.instances.StopInstance(database_pb2.StopInstanceRequest(name=ledger.name), metadata=c.md),
        lambda: c.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=ledger.name), metadata=c.md),
        lambda: bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
            display_name="b", instance=ledger.name)), metadata=c.md),
    ]
    for call in calls:
        _, message = refused(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert "SHUTDOWN" in message, message
    # hostd does not bring back a container that was stopped on purpose
    assert hostd(c).GetContainer(host_pb2.ContainerRef(id=ledger.id)).state == host_pb2.CONTAINER_STATE_STOPPED
    assert get(c, ledger.name).status == SHUTDOWN


@pytest.mark.dependency(name="started", depends=["stopped"])
def test_start_brings_a_stopped_instance_back_active(cluster, ledger):
    c = cluster
    inst = c.instances.StartInstance(database_pb2.StartInstanceRequest(name=ledger.name), metadata=c.md)
    assert status(inst) == "STARTING"
    wait_task(c, ledger.id, "start_instance")
    inst = wait_active(c, ledger.name)
    assert inst.health.accepting_connections and not inst.HasField("fault")
    assert hostd(c).GetContainer(host_pb2.ContainerRef(id=ledger.id)).state == host_pb2.CONTAINER_STATE_RUNNING
    c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=ledger.name), metadata=c.md)
    _, message = refused(lambda: c.instances.StartInstance(database_pb2.StartInstanceRequest(name=ledger.name),
                                                           metadata=c.md), grpc.StatusCode.FAILED_PRECONDITION)
    assert "ACTIVE" in message


@pytest.mark.dependency(name="final-failed", depends=["started", "protected"])
def test_a_failed_final_backup_deletes_nothing_and_the_fault_says_why(cluster, ledger):
    """The fake datastore cannot back up: the delete's first step fails, the instance stays ACTIVE with
    the fault, its container and volume stay, and the FAILED backup is there with its tags."""
    c = cluster
    update(c, database_pb2.Instance(name=ledger.name, deletion_protection=False), "deletion_protection")
    fields, _ = refused(lambda: c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
        name=ledger.name, final_backup_name=" "), metadata=c.md))
    assert fields == ["final_backup_name"]
    fields, _ = refused(lambda: c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
        name=ledger.name, final_backup_name="last", final_backup_tags={"reddwarf:x": "y"}), metadata=c.md))
    assert fields == ["final_backup_tags"]
    inst = c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
        name=ledger.name, final_backup_name="last", final_backup_tags={"kind": "final"}), metadata=c.md)
    assert status(inst) == "DELETING"
    inst = until(lambda: get(c, ledger.name), lambda i: not i.task, timeout=60, what="delete ended", interval=0.1)
    assert status(inst) == "ACTIVE"
    assert "final backup" in inst.fault.message and "nothing was deleted" in inst.fault.message, inst.fault.message
    assert hostd(c).GetContainer(host_pb2.ContainerRef(id=ledger.id)).state == host_pb2.CONTAINER_STATE_RUNNING
    bk = database_pb2_grpc.BackupsStub(c.channel)
    finals = bk.ListBackups(database_pb2.ListBackupsRequest(tags=["kind=final"]), metadata=c.md).backups
    assert [(b.display_name, b.status, dict(b.tags)) for b in finals] == \
        [("last", database_pb2.BACKUP_STATUS_FAILED, {"kind": "final"})]
    assert "not available" in finals[0].fault.message
    assert not bk.ListBackups(database_pb2.ListBackupsRequest(tags=["kind=other"]), metadata=c.md).backups


@pytest.mark.dependency(depends=["final-failed"])
def test_backup_tags_are_updated_and_bad_ones_refused(cluster):
    c = cluster
    bk = database_pb2_grpc.BackupsStub(c.channel)
    b = bk.ListBackups(database_pb2.ListBackupsRequest(tags=["kind=final"]), metadata=c.md).backups[0]
    out = bk.UpdateBackup(database_pb2.UpdateBackupRequest(
        backup=database_pb2.Backup(name=b.name, display_name="kept", tags={"keep": "yes"}),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "tags.keep"])), metadata=c.md)
    assert out.display_name == "kept" and dict(out.tags) == {"kind": "final", "keep": "yes"}
    with pytest.raises(grpc.RpcError) as e:
        bk.UpdateBackup(database_pb2.UpdateBackupRequest(
            backup=database_pb2.Backup(name=b.name, display_name="x", tags={"keep": "no way;"}),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "tags"])), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["backup.tags"]
    again = bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md)
    assert again.display_name == "kept" and dict(again.tags) == {"kind": "final", "keep": "yes"}


@pytest.mark.dependency(depends=["final-failed"])
def test_the_next_operation_clears_the_fault_and_a_plain_delete_goes_through(cluster, ledger):
    c = cluster
    c.instances.StopInstance(database_pb2.StopInstanceRequest(name=ledger.name), metadata=c.md)
    wait_task(c, ledger.id, "stop_instance")
    inst = get(c, ledger.name)
    assert inst.status == SHUTDOWN and not inst.HasField("fault")
    # a final backup needs a running guest: refused while stopped, nothing made
    _, message = refused(lambda: c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
        name=ledger.name, final_backup_name="too-late"), metadata=c.md), grpc.StatusCode.FAILED_PRECONDITION)
    assert "SHUTDOWN" in message
    bk = database_pb2_grpc.BackupsStub(c.channel)
    assert "too-late" not in {b.display_name for b in bk.ListBackups(
        database_pb2.ListBackupsRequest(), metadata=c.md).backups}
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=ledger.name), metadata=c.md)
    wait_task(c, ledger.id, "delete_instance")
    assert ledger.id not in {v.id for v in hostd(c).ListVolumes(host_pb2.ListVolumesRequest()).volumes}

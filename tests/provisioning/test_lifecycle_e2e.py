"""Stop, start, deletion protection and the final backup on a real instance: an LXC container with MariaDB
on a loop volume. A stopped instance has no running container and no mysqld but keeps its volume; started
again it serves the rows written before the stop. A delete with a final backup takes a COMPLETED backup
(proven by a restore in the sandbox, its checksums covering the table written) and only then deletes the
instance; the backup outlives it.

The steps share one instance and are chained (pytest-dependency); the instance is deleted at the end
whatever happened."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import grpc
import pymysql
import pytest
from google.protobuf import field_mask_pb2

from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until
from tests.provisioning.test_e2e import host_leftovers, wait_status, wait_task

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]

PASSWORD = "ledger-pw-123"


def hostd(c: Cluster) -> host_pb2_grpc.HostAgentStub:
    return host_pb2_grpc.HostAgentStub(c.hostd.channel(c.server.server_files))


def sql(inst: database_pb2.Instance, *statements: str) -> tuple:
    ep = inst.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="ledger",
                         autocommit=True, connect_timeout=5) as conn, conn.cursor() as cur:
        rows: tuple = ()
        for st in statements:
            cur.execute(st)
            rows = cur.fetchall()
        return rows


@pytest.fixture(scope="module")
def ledger(cluster: Cluster) -> Iterator[database_pb2.Instance]:
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="ledger", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       tags={"env": "test"}),
        databases=[common_pb2.Database(database="ledger")],
        users=[common_pb2.User(user="app", password=PASSWORD, databases=["ledger"])]), metadata=cluster.md)
    try:
        yield inst
    finally:  # whatever failed: nothing of it may outlive the module
        with contextlib.suppress(grpc.RpcError):
            cluster.instances.UpdateInstance(database_pb2.UpdateInstanceRequest(
                instance=database_pb2.Instance(name=inst.name, deletion_protection=False),
                update_mask=field_mask_pb2.FieldMask(paths=["deletion_protection"])), metadata=cluster.md)
            cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
        until(lambda: host_leftovers(cluster, inst.id), lambda left: not left, timeout=120, what="cleanup")


@pytest.mark.dependency(name="active")
def test_the_instance_holds_rows(cluster, ledger):
    inst = wait_status(cluster, ledger.name)
    sql(inst, "CREATE TABLE entries (id INT PRIMARY KEY, note VARCHAR(32))",
        "INSERT INTO entries VALUES (1, 'before the stop'), (2, 'kept')")


@pytest.mark.dependency(name="stopped", depends=["active"])
def test_stop_releases_the_container_and_mysqld_and_keeps_the_volume(cluster, ledger):
    c = cluster
    inst = wait_status(c, ledger.name)
    c.instances.StopInstance(database_pb2.StopInstanceRequest(name=ledger.name), metadata=c.md)
    wait_task(c, ledger, timeout=180)
    assert wait_status(c, ledger.name, ("SHUTDOWN",), timeout=5).status == database_pb2.INSTANCE_STATUS_SHUTDOWN
    h = hostd(c)
    ctr = h.GetContainer(host_pb2.ContainerRef(id=ledger.id))
    assert ctr.state == host_pb2.CONTAINER_STATE_STOPPED and ctr.init_pid == 0
    vol = h.GetVolume(host_pb2.VolumeRef(id=ledger.id))
    assert vol.size_gb == 1 and os.path.exists(vol.locator)
    with pytest.raises(pymysql.err.OperationalError):
        sql(inst, "SELECT 1")
    with pytest.raises(grpc.RpcError) as e:
        c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=ledger.name), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "SHUTDOWN" in e.value.details()


@pytest.mark.dependency(name="started", depends=["stopped"])
def test_start_brings_it_back_with_its_rows(cluster, ledger):
    c = cluster
    c.instances.StartInstance(database_pb2.StartInstanceRequest(name=ledger.name), metadata=c.md)
    wait_task(c, ledger, timeout=240)
    inst = wait_status(c, ledger.name)
    assert inst.health.accepting_connections
    assert sql(inst, "SELECT id, note FROM entries ORDER BY id") == ((1, "before the stop"), (2, "kept"))
    sql(inst, "INSERT INTO entries VALUES (3, 'after the start')")


@pytest.mark.dependency(name="final", depends=["started"])
def test_a_delete_with_a_final_backup_backs_up_then_deletes_unless_protected(cluster, ledger):
    c = cluster
    bk = database_pb2_grpc.BackupsStub(c.channel)

    def protect(on: bool) -> None:
        c.instances.UpdateInstance(database_pb2.UpdateInstanceRequest(
            instance=database_pb2.Instance(name=ledger.name, deletion_protection=on),
            update_mask=field_mask_pb2.FieldMask(paths=["deletion_protection"])), metadata=c.md)
    protect(True)
    with pytest.raises(grpc.RpcError) as e:
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
            name=ledger.name, final_backup_name="final"), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert field_violations(e.value) == ["deletion_protection"]
    assert not bk.ListBackups(database_pb2.ListBackupsRequest(instance=ledger.name), metadata=c.md).backups
    protect(False)

    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(
        name=ledger.name, final_backup_name="final", final_backup_tags={"reason": "retired"}), metadata=c.md)

    def gone() -> bool:
        try:
            c.instances.GetInstance(database_pb2.GetInstanceRequest(name=ledger.name), metadata=c.md)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.NOT_FOUND
        return False
    until(gone, bool, timeout=600, what="instance deleted after its final backup", interval=1)
    [b] = bk.ListBackups(database_pb2.ListBackupsRequest(tags=["reason=retired"]), metadata=c.md).backups
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED and b.display_name == "final", b.fault.message
    assert b.instance == ledger.name and b.kind == "full"
    assert "ledger.entries" in {x.table for x in b.checksums}
    assert b.verify_status == database_pb2.VERIFY_STATUS_VERIFIED
    assert not host_leftovers(c, ledger.id)

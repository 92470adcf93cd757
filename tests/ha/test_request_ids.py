"""Creates carry request ids (server/idempotency.py): a retry with the same id returns the first resource, never
a second one, also when the duplicates arrive at once; a new id makes a new one; anything but a UUID is refused
naming request_id. On the real server with the fake drivers (tests/functional's cluster)."""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from reddwarf.v1 import database_pb2, database_pb2_grpc
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("reqid"), driver="fake") as c:
        yield c


def create(c: Cluster, name: str, request_id: str) -> database_pb2.Instance:
    return c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=name, flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        request_id=request_id), metadata=c.md, timeout=30)


def named(c: Cluster, name: str) -> list[database_pb2.Instance]:
    listed = c.instances.ListInstances(database_pb2.ListInstancesRequest(page_size=500), metadata=c.md).instances
    return [i for i in listed if i.display_name == name]


def test_a_retried_create_with_the_same_request_id_returns_the_same_instance(cluster: Cluster) -> None:
    rid = str(uuid.uuid4())
    first = create(cluster, "rid-same", rid)
    again = create(cluster, "rid-same", rid)
    # The id in another spelling (upper case) is the same UUID, so the same request.
    shouted = create(cluster, "rid-same", rid.upper())
    assert first.id == again.id == shouted.id
    assert [i.id for i in named(cluster, "rid-same")] == [first.id]


def test_concurrent_duplicates_make_one_instance(cluster: Cluster) -> None:
    rid = str(uuid.uuid4())
    got: list[str] = []
    failed: list[BaseException] = []
    go = threading.Barrier(6)

    def one() -> None:
        go.wait()
        try:
            got.append(create(cluster, "rid-race", rid).id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failed, failed
    assert len(got) == 6 and len(set(got)) == 1
    assert [i.id for i in named(cluster, "rid-race")] == [got[0]]


def test_a_different_request_id_makes_another_instance(cluster: Cluster) -> None:
    a = create(cluster, "rid-two", str(uuid.uuid4()))
    b = create(cluster, "rid-two", str(uuid.uuid4()))
    assert a.id != b.id
    assert {i.id for i in named(cluster, "rid-two")} == {a.id, b.id}


def test_the_same_request_id_in_another_tenant_is_another_request(cluster: Cluster) -> None:
    rid = str(uuid.uuid4())
    mine = create(cluster, "rid-tenant", rid)
    theirs = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="rid-tenant", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        request_id=rid), metadata=cluster.other_tenant_md(), timeout=30)
    assert mine.id != theirs.id


@pytest.mark.parametrize("bad", ["make-demo", "1234", "x" * 40, "00000000-0000-0000-0000-00000000000g"])
def test_a_request_id_that_is_not_a_uuid_is_invalid_argument_naming_it(cluster: Cluster, bad: str) -> None:
    before = len(named(cluster, "rid-bad"))
    with pytest.raises(grpc.RpcError) as err:
        create(cluster, "rid-bad", bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (err.value.details() or "")
    assert len(named(cluster, "rid-bad")) == before  # nothing made


def test_a_backup_request_id_that_is_not_a_uuid_is_invalid_argument_naming_it(cluster: Cluster) -> None:
    inst = create(cluster, "rid-backup", str(uuid.uuid4()))
    with pytest.raises(grpc.RpcError) as err:
        database_pb2_grpc.BackupsStub(cluster.channel).CreateBackup(database_pb2.CreateBackupRequest(
            backup=database_pb2.Backup(display_name="b", instance=inst.name), request_id="not-a-uuid"),
            metadata=cluster.md, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (err.value.details() or "")


def test_a_retried_create_backup_with_the_same_request_id_returns_the_same_backup(cluster: Cluster) -> None:
    inst = create(cluster, "rid-backed", str(uuid.uuid4()))
    until(lambda: cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=cluster.md),
          lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE, timeout=60, what="the instance ACTIVE")
    backups = database_pb2_grpc.BackupsStub(cluster.channel)
    rid = str(uuid.uuid4())
    request = database_pb2.CreateBackupRequest(backup=database_pb2.Backup(display_name="once", instance=inst.name),
                                               request_id=rid)
    first = backups.CreateBackup(request, metadata=cluster.md, timeout=30)
    # The instance is busy with that backup now: the retry still answers with it, not FAILED_PRECONDITION.
    again = backups.CreateBackup(request, metadata=cluster.md, timeout=30)
    assert first.id == again.id
    listed = backups.ListBackups(database_pb2.ListBackupsRequest(instance=inst.name), metadata=cluster.md).backups
    assert [b.id for b in listed] == [first.id]

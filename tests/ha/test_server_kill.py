"""kill -9 of a control server under load: two real servers on one PostgreSQL state DB, backups in a real
SeaweedFS, one real hostd with LXC, a real MariaDB instance, and several clients at once:

- a writer creating databases on the instance, through either server (a call that meets the dead one is
  sent again to the other; ALREADY_EXISTS on such a retry means the first attempt had landed);
- a reader (GetInstance, ListDatabases) through either server, which may meet only UNAVAILABLE from the
  dead one, nothing else;
- a WatchInstance client on the victim, which resumes on the survivor after the kill;
- a create (with a request id) and a backup submitted to the victim (the server holding the instance's
  agent stream) just before the kill.

Then: every acknowledged database exists; the create retried with its request id on the survivor is the same
instance, and ends ACTIVE (one instance, not two); the backup is COMPLETED or FAILED with a fault, once;
the guest is on the survivor within seconds; the watcher got events from the survivor.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.postgres import available, postgres_server
from tests.fixtures.seaweed import start_seaweed
from tests.fixtures.waiting import until
from tests.ha.twoservers import TwoServers, two_servers

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices"),
              pytest.mark.skipif(not available(), reason="postgresql-15 or the postgres user is missing")]

DONE = (database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_ERROR)


def _s3_env(sw: Any, base: Path) -> dict[str, str]:
    creds = base / "s3-credentials.yaml"
    creds.write_text(f"access_key_id: {sw.access_key}\nsecret_access_key: {sw.secret_key}\n")
    os.chmod(creds, 0o600)
    return {"REDDWARF_BACKUP_STORE": "s3", "REDDWARF_S3_ENDPOINT": sw.endpoint, "REDDWARF_S3_BUCKET": sw.bucket,
            "REDDWARF_S3_PREFIX": "ha/", "REDDWARF_S3_CREDENTIALS_FILE": str(creds),
            # A dead server's task is taken over once its lease lapses: short here, to keep the test short.
            "REDDWARF_TASK_LEASE_SECONDS": "6"}


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[TwoServers]:
    with postgres_server() as pg, start_seaweed(tmp_path / "seaweed") as sw, \
            two_servers(tmp_path, pg, "lxc", _s3_env(sw, tmp_path)) as servers:
        yield servers


class Failover:
    """One client's view of the two servers: a call that meets UNAVAILABLE goes to the other one."""

    def __init__(self, ha: TwoServers) -> None:
        self.channels = [ha.channel(1), ha.channel(2)]
        self.md = ha.c.md
        self.at = 0
        self.unexpected: list[str] = []

    def call(self, service: type, method: str, request: Any, retried_ok: tuple[grpc.StatusCode, ...] = ()
             ) -> Any:
        for attempt in range(6):
            stub = service(self.channels[self.at])
            try:
                return getattr(stub, method)(request, metadata=self.md, timeout=60)
            except grpc.RpcError as err:
                if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.at = 1 - self.at
                    time.sleep(0.2)
                    continue
                if attempt > 0 and err.code() in retried_ok:
                    return None  # the attempt that met the dead server had landed
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise  # refused, nothing changed (the instance is busy with the backup): asked again later
                self.unexpected.append(f"{method}: {err.code().name}: {err.details()}")
                raise
        raise AssertionError(f"{method} failed on both servers")

    def close(self) -> None:
        for ch in self.channels:
            ch.close()


def test_kill_9_of_a_server_loses_and_duplicates_nothing(ha: TwoServers) -> None:
    md = ha.c.md
    ch2 = ha.channel(2)  # creates the first instance; after the kill, the survivor's channel
    inst2 = database_pb2_grpc.InstancesStub(ch2)
    shop = inst2.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="ha-shop", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        request_id=str(uuid.uuid4())), metadata=md)
    got = until(lambda: inst2.GetInstance(database_pb2.GetInstanceRequest(name=shop.name), metadata=md),
                lambda i: i.status in DONE and not i.task, timeout=240, what="ha-shop ACTIVE", interval=0.5)
    assert got.status == database_pb2.INSTANCE_STATUS_ACTIVE, got.fault.message

    stop = threading.Event()
    acked: list[str] = []
    reads = [0]
    refused = [0]
    watch_events: list[tuple[float, str]] = []
    errors: list[str] = []

    def writer() -> None:
        client = Failover(ha)
        try:
            k = 0
            while not stop.is_set():
                name = f"w{k}"
                try:
                    client.call(database_pb2_grpc.DatabasesStub, "CreateDatabase", database_pb2.CreateDatabaseRequest(
                        parent=shop.name, database=common_pb2.Database(database=name)),
                        retried_ok=(grpc.StatusCode.ALREADY_EXISTS,))
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    refused[0] += 1
                    time.sleep(0.5)
                    continue
                acked.append(name)
                k += 1
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(f"writer: {exc}")
        finally:
            errors.extend(client.unexpected)
            client.close()

    def reader() -> None:
        client = Failover(ha)
        client.at = 1
        try:
            while not stop.is_set():
                client.call(database_pb2_grpc.InstancesStub, "GetInstance",
                            database_pb2.GetInstanceRequest(name=shop.name))
                try:
                    client.call(database_pb2_grpc.DatabasesStub, "ListDatabases",
                                database_pb2.ListDatabasesRequest(parent=shop.name))
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                    time.sleep(0.5)  # the guest is busy with the backup
                reads[0] += 1
        except Exception as exc:  # noqa: BLE001
            errors.append(f"reader: {exc}")
        finally:
            errors.extend(client.unexpected)
            client.close()

    # The victim is the server holding the guest's stream (it picked one of the two at random).
    victim = 1 if until(ha.holders, lambda h: shop.id in h, timeout=30, what="stream recorded")[shop.id] == "s1" else 2
    survivor = 3 - victim

    def watcher() -> None:
        # On the victim first; when its stream breaks, the same watch again on the survivor.
        for which in (victim, survivor):
            ch = ha.channel(which)
            try:
                stream = database_pb2_grpc.InstancesStub(ch).WatchInstance(
                    database_pb2.WatchInstanceRequest(name=shop.name), metadata=md, timeout=600)
                for ev in stream:
                    watch_events.append((time.monotonic(), f"s{which}:{ev.change}"))
                    if stop.is_set():
                        stream.cancel()
                        return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.CANCELLED:
                    return
                watch_events.append((time.monotonic(), f"s{which} broke: {err.code().name}"))
            finally:
                ch.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (writer, reader, watcher)]
    for t in threads:
        t.start()
    time.sleep(3)
    # Submitted to the victim just before it dies: a create and a backup.
    chv = ha.channel(victim)
    inst1 = database_pb2_grpc.InstancesStub(chv)
    request_id = str(uuid.uuid4())
    two = inst1.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="ha-two", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        request_id=request_id), metadata=md)
    backup = database_pb2_grpc.BackupsStub(chv).CreateBackup(database_pb2.CreateBackupRequest(
        backup=database_pb2.Backup(display_name="ha-backup", instance=shop.name)), metadata=md)
    time.sleep(1.5)
    shop_id = shop.id
    killed_at = time.monotonic()
    ha.kill(victim)
    chv.close()
    until(ha.holders, lambda h: h.get(shop_id) == f"s{survivor}", timeout=30, what="ha-shop's guest moved",
          interval=0.1)
    moved_in = time.monotonic() - killed_at
    time.sleep(4)  # the clients keep going against the survivor
    ch2.close()
    ch2 = ha.channel(survivor)
    inst2 = database_pb2_grpc.InstancesStub(ch2)
    # The create retried on s2 with its request id: the same instance, not a second one.
    again = inst2.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="ha-two", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        request_id=request_id), metadata=md)
    assert again.id == two.id
    done = until(lambda: inst2.GetInstance(database_pb2.GetInstanceRequest(name=two.name), metadata=md),
                 lambda i: i.status in DONE and not i.task, timeout=240, what="ha-two done", interval=0.5)
    assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE, done.fault.message
    backups2 = database_pb2_grpc.BackupsStub(ch2)
    b = until(lambda: backups2.GetBackup(database_pb2.GetBackupRequest(name=backup.name), metadata=md),
              lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED),
              timeout=300, what="the backup ends", interval=1)
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED or b.fault.message, b
    stop.set()
    for t in threads:
        t.join(60)

    assert not errors, errors
    assert moved_in < 15, moved_in
    listed = {d.database for d in database_pb2_grpc.DatabasesStub(ch2).ListDatabases(
        database_pb2.ListDatabasesRequest(parent=shop.name, page_size=1000), metadata=md).databases}
    assert set(acked) <= listed, sorted(set(acked) - listed)  # no acknowledged write lost
    instances = inst2.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
    assert sorted(i.display_name for i in instances) == ["ha-shop", "ha-two"]  # nothing created twice
    mine = [x for x in backups2.ListBackups(database_pb2.ListBackupsRequest(), metadata=md).backups
            if x.instance == shop.name]
    assert [x.name for x in mine] == [backup.name]
    after = [e for at, e in watch_events if at > killed_at and e.startswith(f"s{survivor}:")]
    assert after, watch_events  # the watcher resumed on the survivor
    print(f"killed s{victim}; guest moved in {moved_in:.1f}s; {len(acked)} writes ({refused[0]} refused while busy), "
          f"{reads[0]} read rounds, "
          f"backup {database_pb2.BackupStatus.Name(b.status)}")
    for name in (shop.name, two.name):
        inst2.DeleteInstance(database_pb2.DeleteInstanceRequest(name=name), metadata=md)
    backups2.DeleteBackup(database_pb2.DeleteBackupRequest(name=backup.name), metadata=md)
    until(lambda: inst2.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances,
          lambda x: not x, timeout=120, what="instances deleted")
    ch2.close()

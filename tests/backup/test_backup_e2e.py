"""Backups through the whole system: an instance in a real container backs up through its agent's stream
into the server's store; verify restores the chain in a scratch mariadbd; a new instance restores from it.
A flipped byte in the store is caught before any datadir is touched.

The steps are chained (pytest-dependency): the tests that use the source instance depend on its create,
and the incremental, its verify and its restore on the full backup before them, so one failure is reported
once and what depends on it is skipped."""
from __future__ import annotations

import os
import subprocess

import grpc
import pymysql
import pytest

from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.waiting import until as wait

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]


@pytest.fixture(scope="module")
def bk(cluster):
    return database_pb2_grpc.BackupsStub(cluster.channel)


@pytest.fixture(scope="module")
def source_created(cluster):
    """The instance the backups are taken of, as CreateInstance answered it (BUILD)."""
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="src", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="app-pw-123", databases=["shop"])]), metadata=cluster.md)


def wait_active(c, name):
    return wait(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md),
                lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE, what="ACTIVE")


@pytest.fixture
def env(cluster, bk, source_created):
    """(cluster, backups stub, the source instance ACTIVE)."""
    return cluster, bk, wait_active(cluster, source_created.name)


@pytest.mark.dependency(name="source")
def test_source_instance_reaches_active(cluster, source_created):
    assert wait_active(cluster, source_created.name).health.accepting_connections


def sql(inst, *stmts):
    ep = inst.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                         autocommit=True) as conn, conn.cursor() as cur:
        out = None
        for st in stmts:
            cur.execute(st)
            out = cur.fetchall()
        return out


def take(c, bk, inst, name, parent=""):
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name=name, instance=inst.name, parent=parent)), metadata=c.md)
    return wait(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
                lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED), what="backup done")


def completed(c, bk, inst, name):
    """A backup that must complete: the test fails with its fault otherwise."""
    b = take(c, bk, inst, name)
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED, b.fault.message
    return b


def verified(c, bk, name):
    """The backup once the VerifyBackup this asks for has ended."""
    bk.VerifyBackup(database_pb2.VerifyBackupRequest(name=name), metadata=c.md)
    return wait(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=name), metadata=c.md),
                lambda x: x.verify_status != database_pb2.VERIFY_STATUS_VERIFYING, what="verify done")


def restored(c, backup_name, display_name):
    """A new instance restored from the backup, once its create has ended (ACTIVE or ERROR)."""
    new = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=display_name, flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        restore_from_backup=backup_name), metadata=c.md)
    return wait(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=new.name), metadata=c.md),
                lambda i: i.status in (database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_ERROR),
                what=f"{display_name} restored")


@pytest.fixture(scope="module")
def full(cluster, bk, source_created):
    """A full backup of the source holding rows 1 and 2 of shop.orders."""
    inst = wait_active(cluster, source_created.name)
    sql(inst, "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(20))",
        "INSERT INTO orders VALUES (1,'tea'),(2,'jam')")
    return take(cluster, bk, inst, "full-1")


@pytest.fixture(scope="module")
def inc(cluster, bk, source_created, full):
    """An incremental on top of `full`, adding row 3."""
    inst = wait_active(cluster, source_created.name)
    sql(inst, "INSERT INTO orders VALUES (3,'scones')")
    return take(cluster, bk, inst, "inc-1", parent=full.name)


@pytest.mark.dependency(name="full", depends=["source"])
def test_full_backup_completes_with_its_checksums(full):
    assert full.status == database_pb2.BACKUP_STATUS_COMPLETED, full.fault.message
    assert full.size_bytes > 0 and len(full.sha256) == 64 and any(t.table.endswith("orders") for t in full.checksums)


@pytest.mark.dependency(name="inc", depends=["full"])
def test_incremental_backup_completes(inc):
    assert inc.status == database_pb2.BACKUP_STATUS_COMPLETED and inc.kind == "incremental", inc.fault.message


@pytest.mark.dependency(depends=["inc"])
def test_verify_restores_the_chain_and_finds_it_whole(cluster, bk, inc):
    v = verified(cluster, bk, inc.name)
    assert v.verify_status == database_pb2.VERIFY_STATUS_VERIFIED, v.verify_detail


@pytest.mark.dependency(depends=["inc"])
def test_a_new_instance_restored_from_the_incremental_holds_every_row(cluster, inc):
    new = restored(cluster, inc.name, "copy")
    assert new.status == database_pb2.INSTANCE_STATUS_ACTIVE, new.fault.message
    assert new.restored_from == inc.id
    assert sql(new, "SELECT id FROM orders ORDER BY id") == ((1,), (2,), (3,))


@pytest.mark.dependency(depends=["inc"])
def test_the_full_cannot_go_while_the_incremental_depends_on_it(cluster, bk, full, inc):
    c = cluster
    with pytest.raises(grpc.RpcError) as e:
        bk.DeleteBackup(database_pb2.DeleteBackupRequest(name=full.name), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.dependency(depends=["source"])
def test_a_flipped_byte_is_caught_by_verify_and_refused_by_restore(env):
    c, bk, inst = env
    b = completed(c, bk, inst, "to-corrupt")
    path = b.location
    assert os.path.exists(path), path
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    v = verified(c, bk, b.name)
    assert v.verify_status == database_pb2.VERIFY_STATUS_MISMATCH and b.sha256 in v.verify_detail
    new = restored(c, b.name, "bad-copy")
    assert new.status == database_pb2.INSTANCE_STATUS_ERROR and "sha" in new.fault.message.lower()
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=new.name), metadata=c.md)


@pytest.mark.dependency(depends=["source"])
def test_backup_of_another_tenants_instance_is_not_found(env):
    c, bk, inst = env
    with pytest.raises(grpc.RpcError) as e:
        bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
            display_name="steal", instance=inst.name)), metadata=c.other_tenant_md())
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.dependency(depends=["source"])
def test_another_tenant_cannot_see_touch_or_restore_a_backup(env):
    c, bk, inst = env
    mine = completed(c, bk, inst, "private")
    other = c.other_tenant_md()
    assert not bk.ListBackups(database_pb2.ListBackupsRequest(), metadata=other).backups
    assert not bk.ListBackups(database_pb2.ListBackupsRequest(instance=inst.name), metadata=other).backups
    calls = [
        lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=mine.name), metadata=other),
        lambda: bk.DeleteBackup(database_pb2.DeleteBackupRequest(name=mine.name), metadata=other),
        lambda: bk.VerifyBackup(database_pb2.VerifyBackupRequest(name=mine.name), metadata=other),
        lambda: c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="thief", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            restore_from_backup=mine.name), metadata=other),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
    still = bk.GetBackup(database_pb2.GetBackupRequest(name=mine.name), metadata=c.md)
    assert still.status == database_pb2.BACKUP_STATUS_COMPLETED and still.verify_status == database_pb2.VERIFY_STATUS_VERIFIED
    assert not c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=other).instances


def test_agent_killed_mid_backup_fails_the_backup_and_stores_nothing(cluster, bk):
    c = cluster
    victim = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="victim", flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
        metadata=c.md)
    victim = wait_active(c, victim.name)
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name="doomed", instance=victim.name)), metadata=c.md)
    name = f"{c.hostd.prefix}{victim.id}"
    pid = subprocess.run(["lxc-info", "-P", str(c.hostd.lxc_path), "-n", name, "-p", "-H"], capture_output=True,
                         text=True, check=True).stdout.strip()
    # kill once the agent has started the backup (its started-command marker, seen through /proc/PID/root)
    results = f"/proc/{pid}/root/var/lib/reddwarf-agent/results"
    wait(lambda: [n for n in os.listdir(results) if n.endswith("backup.running")], bool, timeout=60,
         interval=0.02, what="backup started")
    os.kill(int(pid), 9)  # the agent is PID 1: the guest dies with it
    done = wait(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
                lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED), timeout=120,
                what="backup ended")
    # hostd starts the guest again within seconds; the agent then tells the server the backup was cut off
    # (or, had it stayed away, the server gives up on it): either way FAILED, never a silent re-run
    assert done.status == database_pb2.BACKUP_STATUS_FAILED, done.fault.message
    assert "restarted while running backup" in done.fault.message or "went away" in done.fault.message, \
        done.fault.message
    # and the instance itself comes back on its own, with mysqld
    wait(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=victim.name), metadata=c.md),
         lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE and i.health.accepting_connections, timeout=120,
         what="victim ACTIVE again")
    store = c.server.state_dir / "backups"
    assert not [p for p in store.rglob("*") if b.id in p.name], "a partial backup was left in the store"
    # and it cannot be restored from
    with pytest.raises(grpc.RpcError) as e:
        c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="nope", flavor="tiny"), restore_from_backup=b.name),
            metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

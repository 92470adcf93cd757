"""UpgradeInstance end to end, all real: an instance made on MariaDB 10.11 (Debian 12 template) moves to 11.8
(Debian 13 template) on the same volume, keeping its tables and users; bad requests change nothing.

The tests chain on the shared instance (pytest-dependency): if it is not ACTIVE the rest is skipped."""
from __future__ import annotations

import os
import time

import grpc
import pymysql
import pytest

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.errors import field_violations as fields
from tests.provisioning.test_e2e import wait_status, wait_task

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]
PASSWORD = "s3cret-pw"


def connect(inst, **kw):
    ep = inst.endpoints[0]
    return pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop",
                           connect_timeout=5, **kw)


def upgrade(c, inst, version):
    return c.instances.UpgradeInstance(database_pb2.UpgradeInstanceRequest(name=inst.name, datastore_version=version),
                                       metadata=c.md)


def tasks_of(c, inst):
    return [t.id for t in c.admin.ListTasks(admin_pb2.ListTasksRequest(resource=f"instances/{inst.id}")).tasks]


@pytest.fixture(scope="module")
def shop(cluster):
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="upg", flavor="tiny", volume=database_pb2.Volume(size_gb=1),
                                       datastore="mariadb", datastore_version="10.11"),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password=PASSWORD, databases=["shop"])]), metadata=cluster.md)
    yield inst
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
    wait_task(cluster, inst, timeout=300)


@pytest.mark.dependency(name="upg_active")
def test_the_instance_starts_on_10_11_with_data(cluster, shop) -> None:
    up = wait_status(cluster, shop.name, timeout=600)
    with connect(up) as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        assert cur.fetchone()[0].startswith("10.11.")
        cur.execute("CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(32)) ENGINE=InnoDB")
        cur.executemany("INSERT INTO orders VALUES (%s, %s)", [(i, f"item-{i}") for i in range(500)])
        cur.execute("CREATE TABLE notes (id INT PRIMARY KEY, body TEXT) ENGINE=Aria")
        cur.execute("INSERT INTO notes VALUES (1, 'kept')")
        conn.commit()


@pytest.mark.dependency(depends=["upg_active"])
@pytest.mark.parametrize(("version", "code", "field"), [
    ("12.9", grpc.StatusCode.INVALID_ARGUMENT, "datastore_version"),
    ("", grpc.StatusCode.INVALID_ARGUMENT, "datastore_version"),
    ("10.11", grpc.StatusCode.INVALID_ARGUMENT, "datastore_version"),   # the same version
    ("10.6", grpc.StatusCode.INVALID_ARGUMENT, "datastore_version"),    # not offered (and older)
])
def test_a_bad_upgrade_is_refused_naming_the_field_and_changes_nothing(cluster, shop, version, code, field) -> None:
    before = tasks_of(cluster, shop)
    with pytest.raises(grpc.RpcError) as exc:
        upgrade(cluster, shop, version)
    assert exc.value.code() == code
    assert fields(exc.value) == [field]
    now = cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=shop.name), metadata=cluster.md)
    assert now.datastore_version == "10.11" and tasks_of(cluster, shop) == before
    assert not now.HasField("last_upgrade")


@pytest.mark.dependency(name="upgraded", depends=["upg_active"])
def test_an_upgrade_to_11_8_keeps_tables_and_users(cluster, shop) -> None:
    with connect(wait_status(cluster, shop.name)) as conn, conn.cursor() as cur:
        cur.execute("CHECKSUM TABLE orders, notes")
        sums = cur.fetchall()
    started = upgrade(cluster, shop, "11.8")
    assert started.last_upgrade.outcome == "RUNNING" and started.last_upgrade.to_version == "11.8"
    # Busy with its upgrade: another is refused, nothing changes.
    with pytest.raises(grpc.RpcError) as exc:
        upgrade(cluster, shop, "11.8")
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and fields(exc.value) == ["name"]
    t0 = time.monotonic()
    wait_task(cluster, shop, timeout=900)
    up = wait_status(cluster, shop.name)
    assert up.datastore_version == "11.8"
    rep = up.last_upgrade
    assert (rep.from_version, rep.to_version, rep.outcome) == ("10.11", "11.8", "SUCCEEDED")
    assert 0 < rep.downtime_seconds < time.monotonic() - t0 + 1
    assert rep.backup.startswith("backups/")
    b = database_pb2_grpc.BackupsStub(cluster.channel).GetBackup(database_pb2.GetBackupRequest(name=rep.backup), metadata=cluster.md)
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED and b.datastore_version.startswith("10.11.")
    with connect(up) as conn, conn.cursor() as cur:
        cur.execute("SELECT VERSION()")
        assert cur.fetchone()[0].startswith("11.8.")
        cur.execute("CHECKSUM TABLE orders, notes")
        assert cur.fetchall() == sums
        cur.execute("SELECT COUNT(*) FROM orders")
        assert cur.fetchone()[0] == 500


@pytest.mark.dependency(depends=["upgraded"])
def test_a_downgrade_is_refused(cluster, shop) -> None:
    before = tasks_of(cluster, shop)
    with pytest.raises(grpc.RpcError) as exc:
        upgrade(cluster, shop, "10.11")
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(exc.value) == ["datastore_version"]
    assert "older" in exc.value.details()
    assert tasks_of(cluster, shop) == before

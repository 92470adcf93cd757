"""The real server with backup_store = s3 against a real SeaweedFS: it starts with credentials from a 0600
file and aborts a crashed server's stale upload; bytes the server stores (a saved guest log, through the
fake cluster in seconds) land encrypted in the bucket and read back; a backup that fails leaves nothing there.
With root and LXC (slow): a real MariaDB instance backs up into SeaweedFS, verify finds it whole, a new
instance restores from it, and deleting the backup removes its object."""
from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from reddwarf.server import db
from reddwarf.server.backup_store import S3Settings, S3Store
from reddwarf.server.keys import TenantKeys, ensure_kek
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc, observe_pb2, observe_pb2_grpc
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.seaweed import SeaweedFS, start_seaweed
from tests.fixtures.waiting import until

PREFIX = "e2e/"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("seaweed")) as sw:
        yield sw


def s3_env(sw: SeaweedFS, base: Path) -> dict[str, str]:
    creds = base / "s3-credentials.yaml"
    creds.write_text(f"access_key_id: {sw.access_key}\nsecret_access_key: {sw.secret_key}\n")
    os.chmod(creds, 0o600)
    return {"REDDWARF_BACKUP_STORE": "s3", "REDDWARF_S3_ENDPOINT": sw.endpoint, "REDDWARF_S3_BUCKET": sw.bucket,
            "REDDWARF_S3_PREFIX": PREFIX, "REDDWARF_S3_CREDENTIALS_FILE": str(creds),
            "REDDWARF_S3_STALE_UPLOAD_HOURS": "0"}


def server_store(c: Cluster, sw: SeaweedFS) -> S3Store:
    """The store as the server sees it: its bucket, and its tenants' keys from its state DB."""
    sd = c.server.state_dir
    sessions = db.session_factory(db.make_engine(c.server.db_url))
    keys = TenantKeys(sessions, ensure_kek(str(sd / "backup-kek.key"), sessions))
    return S3Store(S3Settings(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key, prefix=PREFIX), keys)


# ---------------------------------------------------------------------------- fake cluster (seconds)


@pytest.fixture(scope="module")
def fake_cluster(seaweed, tmp_path_factory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("s3cluster")
    # What a server killed mid-upload left behind: the next start aborts it.
    seaweed.client().create_multipart_upload(Bucket=seaweed.bucket, Key=f"{PREFIX}crashed.xbstream.zst.enc")
    with start_cluster(base, server_env=s3_env(seaweed, base), driver="fake") as c:
        yield c


def wait_active(c: Cluster, name: str) -> database_pb2.Instance:
    return until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md),
                 lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE, timeout=90, what="ACTIVE")


def test_the_server_starts_on_s3_and_aborts_the_stale_upload(seaweed, fake_cluster):
    assert seaweed.incomplete_uploads(PREFIX) == []
    log = fake_cluster.server.log()
    assert seaweed.secret_key not in log and "aborted 1 stale multipart uploads" in log


def test_what_the_server_stores_lands_encrypted_in_the_bucket_and_reads_back(seaweed, fake_cluster):
    c = fake_cluster
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="s3log", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
    wait_active(c, inst.name)
    logs = observe_pb2_grpc.LogsStub(c.channel)
    name = f"{inst.name}/logs/general"
    logs.EnableLog(observe_pb2.EnableLogRequest(name=name), metadata=c.md)
    marker = f"s3_marker_{uuid.uuid4().hex[:8]}"
    c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=inst.name, database=common_pb2.Database(database=marker)), metadata=c.md)
    until(lambda: "".join(ch.data for ch in logs.TailLog(observe_pb2.TailLogRequest(name=name, lines=50),
                                                         metadata=c.md)),
          lambda text: marker in text, timeout=30, what="the statement in the general log")
    saved = logs.SaveLog(observe_pb2.SaveLogRequest(name=name), metadata=c.md)
    key = f"{PREFIX}{saved.object_id}.xbstream.zst.enc"
    assert key in seaweed.keys(PREFIX)
    raw = seaweed.client().get_object(Bucket=seaweed.bucket, Key=key)["Body"].read()
    assert marker.encode() not in raw   # ciphertext only in the bucket

    async def read_back() -> bytes:
        return b"".join([chunk async for chunk in server_store(c, seaweed).open_reader(saved.object_id)])
    data = asyncio.run(read_back())
    assert len(data) == saved.size_bytes and marker.encode() in data


def test_a_failed_backup_leaves_nothing_in_the_bucket(seaweed, fake_cluster):
    """The fake datastore cannot back up: the backup ends FAILED and neither an object nor an upload of it
    is in the bucket."""
    c = fake_cluster
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="s3nobk", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
    wait_active(c, inst.name)
    bk = database_pb2_grpc.BackupsStub(c.channel)
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name="nope", instance=inst.name)), metadata=c.md)
    done = until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
                 lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED),
                 timeout=60, what="backup ended", interval=0.2)
    assert done.status == database_pb2.BACKUP_STATUS_FAILED
    assert not [k for k in seaweed.keys(PREFIX) if b.id in k]
    assert not [u for u in seaweed.incomplete_uploads(PREFIX) if b.id in u["Key"]]


# ---------------------------------------------------------------------------- real LXC + MariaDB (slow)


@pytest.fixture(scope="module")
def lxc_cluster(seaweed, tmp_path_factory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("s3lxc")
    with start_cluster(base, server_env=s3_env(seaweed, base)) as c:
        yield c


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")
def test_a_real_backup_goes_to_seaweedfs_verifies_restores_and_deletes(seaweed, lxc_cluster):
    c = lxc_cluster
    bk = database_pb2_grpc.BackupsStub(c.channel)
    src = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="s3src", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="app-pw-123", databases=["shop"])]), metadata=c.md)
    inst = wait_active_long(c, src.name)

    def sql(i: database_pb2.Instance, *stmts: str) -> object:
        ep = i.endpoints[0]
        with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                             autocommit=True) as conn, conn.cursor() as cur:
            out = None
            for st in stmts:
                cur.execute(st)
                out = cur.fetchall()
            return out

    sql(inst, "CREATE TABLE orders (id INT PRIMARY KEY, item VARCHAR(20))", "INSERT INTO orders VALUES (1,'tea')")
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name="s3-full", instance=inst.name)), metadata=c.md)
    b = until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
              lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED),
              timeout=600, what="backup done")
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED, b.fault.message
    key = f"{PREFIX}{b.id}.xbstream.zst.enc"
    assert b.location == f"s3://{seaweed.bucket}/{key}" and key in seaweed.keys(PREFIX)
    bk.VerifyBackup(database_pb2.VerifyBackupRequest(name=b.name), metadata=c.md)
    v = until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
              lambda x: x.verify_status != database_pb2.VERIFY_STATUS_VERIFYING, timeout=600, what="verify done")
    assert v.verify_status == database_pb2.VERIFY_STATUS_VERIFIED, v.verify_detail
    new = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="s3copy", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        restore_from_backup=b.name), metadata=c.md)
    copy = wait_active_long(c, new.name)
    assert sql(copy, "SELECT id, item FROM orders") == ((1, "tea"),)
    bk.DeleteBackup(database_pb2.DeleteBackupRequest(name=b.name), metadata=c.md)
    until(lambda: seaweed.keys(PREFIX), lambda keys: key not in keys, timeout=120, what="the object deleted")
    for i in (copy, inst):
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=i.name), metadata=c.md)


def wait_active_long(c: Cluster, name: str) -> database_pb2.Instance:
    return until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md),
                 lambda i: i.status in (database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_ERROR),
                 timeout=600, what=f"{name} ACTIVE")

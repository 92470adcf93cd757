"""A hostile guest against the real server's AgentGateway, holding a real instance certificate: an upload
past its cap (relative to the instance's volume) is refused with nothing stored, a second upload of a backup
while one runs is refused, and a stored backup is not written again; what is stored is ciphertext. Then the
tenant is deleted: its key and its backups' objects are gone, and its id is never given out again."""
from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa

from reddwarf.common import tls
from reddwarf.server import db, models
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.fixtures.pki import write_issued
from tests.fixtures.server import RunningServer, start_server
from tests.fixtures.waiting import until as wait

MARKER = b"SECRET-TENANT-ROW-4b1d"
# 0.002 x a 1 GB volume and no margin: an upload may carry about 2 MiB.
CAP = int((1 << 30) * 0.002)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with start_server(tmp_path_factory.mktemp("up"), {"REDDWARF_BACKUP_UPLOAD_FACTOR": "0.002",
                                                      "REDDWARF_BACKUP_UPLOAD_MARGIN_MB": "0"}) as s:
        yield s


@pytest.fixture(scope="module")
def world(server, tmp_path_factory):
    """A tenant with an ACTIVE instance (its rows only: no container is needed to speak the agent's
    protocol) and that instance's certificate, as its guest would hold it."""
    tid = f"t-{uuid.uuid4().hex[:8]}"
    with server.channel(server.admin_files) as ch:
        admin_pb2_grpc.AdminStub(ch).CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    iid = str(uuid.uuid4())
    engine = db.make_engine(server.db_url)
    sessions = db.session_factory(engine)
    with sessions() as s, s.begin():
        s.add(models.Instance(id=iid, tenant_id=tid, display_name="guest", status="ACTIVE", flavor_id="tiny",
                              volume_size_gb=1, datastore="mariadb", datastore_version="10.11"))
    files, _ = write_issued(server.ca, tmp_path_factory.mktemp("cert") / "instance", "instance", iid)
    ch = tls.sync_channel(server.agent, files)
    try:
        yield tid, iid, sessions, agent_pb2_grpc.AgentGatewayStub(ch)
    finally:
        ch.close()
        engine.dispose()


def backup_row(sessions, tid: str, iid: str) -> str:
    bid = str(uuid.uuid4())
    with sessions() as s, s.begin():
        s.add(models.Backup(id=bid, tenant_id=tid, instance_id=iid, display_name="b", status="BUILDING"))
    return bid


def chunks(bid: str, data: bytes, sha: str | None = None, hold: threading.Event | None = None,
           step: int = 256 * 1024) -> Iterator[agent_pb2.BackupChunk]:
    for i in range(0, len(data), step):
        yield agent_pb2.BackupChunk(backup_id=bid if i == 0 else "", data=data[i:i + step])
        if hold is not None and i == 0:
            hold.wait(60)
    yield agent_pb2.BackupChunk(sha256=sha or hashlib.sha256(data).hexdigest())


def stored(server: RunningServer, bid: str) -> list[str]:
    return [p.name for p in (server.state_dir / "backups").rglob("*") if bid in p.name]


def test_an_upload_past_its_cap_is_refused_and_nothing_is_stored(server, world):
    tid, iid, sessions, gw = world
    bid = backup_row(sessions, tid, iid)
    data = MARKER * (CAP // len(MARKER) + 1000)
    assert len(data) > CAP
    with pytest.raises(grpc.RpcError) as e:
        gw.UploadBackup(chunks(bid, data), timeout=60)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "cap" in e.value.details()
    assert stored(server, bid) == []
    # within the cap the same guest is served, and what lands on disk is ciphertext
    small = MARKER * 1000
    res = gw.UploadBackup(chunks(bid, small), timeout=60)
    assert res.size_bytes == len(small) and res.sha256 == hashlib.sha256(small).hexdigest()
    path = server.state_dir / "backups" / f"{bid}.xbstream.zst.enc"
    assert path.exists() and MARKER not in path.read_bytes()


def test_a_second_upload_of_a_backup_is_refused_while_one_runs_and_after_it_stored(server, world):
    tid, iid, sessions, gw = world
    bid = backup_row(sessions, tid, iid)
    data = MARKER * 5000
    hold = threading.Event()
    first = gw.UploadBackup.future(chunks(bid, data, hold=hold), timeout=60)
    try:
        wait(lambda: stored(server, bid), bool, timeout=30, interval=0.05, what="first upload under way")
        with pytest.raises(grpc.RpcError) as e:
            gw.UploadBackup(chunks(bid, b"other bytes"), timeout=30)
        assert e.value.code() == grpc.StatusCode.ABORTED, e.value.details()
        assert "already in progress" in e.value.details()
    finally:
        hold.set()
    assert first.result(timeout=60).sha256 == hashlib.sha256(data).hexdigest()
    with pytest.raises(grpc.RpcError) as e:
        gw.UploadBackup(chunks(bid, b"a replacement"), timeout=30)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS, e.value.details()
    path = server.state_dir / "backups" / f"{bid}.xbstream.zst.enc"
    assert MARKER not in path.read_bytes()


def test_deleting_the_tenant_shreds_its_key_and_backups_and_its_id_is_never_reused(server, world):
    tid, iid, sessions, gw = world
    bid = backup_row(sessions, tid, iid)
    gw.UploadBackup(chunks(bid, MARKER * 100), timeout=60)
    with sessions() as s:
        owned = s.scalars(sa.select(models.Backup.id).where(models.Backup.tenant_id == tid)).all()
        assert s.get(models.TenantKey, tid) is not None
    assert owned and all(stored(server, b) for b in owned)
    with sessions() as s, s.begin():  # the instance deleted, as DeleteInstance would leave it
        row = s.get(models.Instance, iid)
        assert row is not None
        row.deleted_at = models.utcnow()
    with server.channel(server.admin_files) as ch:
        admin = admin_pb2_grpc.AdminStub(ch)
        admin.DeleteTenant(admin_pb2.DeleteTenantRequest(name=f"tenants/{tid}"))
        with sessions() as s:
            assert s.get(models.TenantKey, tid) is None
            assert s.scalars(sa.select(models.Backup).where(models.Backup.tenant_id == tid)).all() == []
        assert not [b for b in owned if stored(server, b)]
        with pytest.raises(grpc.RpcError) as e:
            admin.GetTenant(admin_pb2.GetTenantRequest(name=f"tenants/{tid}"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert tid not in [t.id for t in admin.ListTenants(admin_pb2.ListTenantsRequest(page_size=1000)).tenants]
        with pytest.raises(grpc.RpcError) as e:
            admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS and "never reused" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e:
            admin.DeleteTenant(admin_pb2.DeleteTenantRequest(name=f"tenants/{tid}"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # nothing can be stored for the deleted tenant any more, even by a guest still holding a certificate
    late = backup_row(sessions, tid, iid)
    with pytest.raises(grpc.RpcError) as e:
        gw.UploadBackup(chunks(late, b"late"), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert stored(server, late) == []

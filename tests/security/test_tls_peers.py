"""Posing as the server: listeners holding real certificates of this deployment's CA, but of the wrong role or
id, are refused by every TLS client before a byte of a request (token, enrollment token, CRL) reaches them.

Each listener records every call that gets past the handshake; an impostor must see none, while the same
listener with the right certificate sees the call (so the refusal is the certificate's doing)."""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from reddwarf.agent.fake import FakeDriver
from reddwarf.agent.main import AgentConfig, enroll
from reddwarf.agent.stream import AgentStream, CommandRunner, StreamSettings
from reddwarf.client import Client
from reddwarf.client.config import ClientConfig
from reddwarf.client.errors import ClientError
from reddwarf.common import tls
from reddwarf.common.errors import InvalidArgument, RedDwarfError
from reddwarf.common.pki import CertificateAuthority, TlsFiles, needs_renewal, role_dns_names
from reddwarf.v1 import common_pb2, host_pb2

# (role, id) of the certificate a listener presents; "server" is the genuine one.
IMPOSTORS = [("host", "h1"), ("instance", "i1"), ("admin", "ops"), ("client", "cli"), ("gateway", "gw")]


class Recorder(grpc.GenericRpcHandler):
    """Answers nothing (UNIMPLEMENTED) but remembers every call that got through the handshake."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []

    def service(self, details: grpc.HandlerCallDetails) -> None:
        self.seen.append((details.method, {k: v for k, v in details.invocation_metadata or ()
                                           if isinstance(v, str)}))
        return None


@contextlib.asynccontextmanager
async def listener(files: TlsFiles, client_auth: bool = True) -> AsyncIterator[tuple[str, Recorder]]:
    rec = Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((rec,))
    cert, key, ca = files.read()
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(
        cert, key, ca if client_auth else None, require_client_auth=client_auth))
    await server.start()
    try:
        yield f"127.0.0.1:{port}", rec
    finally:
        await server.stop(None)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def ident(ca: CertificateAuthority, tmp_path: Path, role: str, id: str) -> TlsFiles:
    return ca.write_identity(tmp_path / f"{role}-{id}", "cert", role, id)


# -- what certificates name ------------------------------------------------------------------------
def test_certificates_name_their_role_not_localhost(ca: CertificateAuthority) -> None:
    for role, id, names in [("server", "control", ["server.reddwarf", "control.server.reddwarf"]),
                            ("host", "h1", ["h1.host.reddwarf"]), ("instance", "i1", []), ("admin", "a", [])]:
        cert = x509.load_pem_x509_certificate(ca.issue(role, id).cert_pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == names
        assert san.get_values_for_type(x509.IPAddress) == []


@pytest.mark.parametrize("name", ["server.reddwarf", "h2.host.reddwarf", "reddwarf", "*.example.com",
                                  "SERVER.REDDWARF."])
def test_no_certificate_can_be_given_another_peer_s_name(ca: CertificateAuthority, name: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        ca.issue("host", "h1", dns_names=[name])
    assert e.value.violations[0][0] == "dns_names"


def test_peer_names() -> None:
    assert tls.peer_name(tls.SERVER_PEER) == "server.reddwarf"
    assert tls.peer_name(tls.host_peer("h1")) == "h1.host.reddwarf"
    assert tls.peer_name("server/control") == "control.server.reddwarf"
    for bad in ("instance/i1", "host/*", "host/", "admin/x", "host/a\n"):
        with pytest.raises(InvalidArgument):
            tls.peer_name(bad)
    assert role_dns_names("host", "h1")[-1] == tls.peer_name("host/h1")


# -- clients that expect the server ----------------------------------------------------------------
@pytest.mark.parametrize("role,id", [*IMPOSTORS, ("server", "control")])
async def test_sdk_talks_only_to_the_server(ca, tmp_path, role, id) -> None:
    client_files = ident(ca, tmp_path, "client", "cli")
    async with listener(ident(ca, tmp_path, role, id)) as (address, rec):
        sdk = Client(ClientConfig(endpoint=address, ca=str(client_files.ca), cert=str(client_files.cert),
                                  key=str(client_files.key), token="tenant-secret", timeout=5))
        with pytest.raises(ClientError) as e:
            await asyncio.to_thread(sdk.list_flavors)
        sdk.close()
    if role == "server":
        assert e.value.code_name == "UNIMPLEMENTED"
        assert rec.seen and rec.seen[0][1].get("authorization") == "Bearer tenant-secret"
    else:
        assert e.value.code_name == "UNAVAILABLE"
        assert rec.seen == []  # the token never left the client


def test_sdk_server_name_may_only_pin_a_server(ca, tmp_path) -> None:
    f = ident(ca, tmp_path, "client", "cli")
    for name in ("h1.host.reddwarf", "localhost"):
        with pytest.raises(InvalidArgument):
            Client(ClientConfig(endpoint="127.0.0.1:1", ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                                server_name=name))


@pytest.mark.parametrize("role,id", [*IMPOSTORS, ("server", "control")])
async def test_channels_expecting_the_server_refuse_other_roles(ca, tmp_path, role, id) -> None:
    """The factory every server-dialling process uses (gateway, agent stream, demo) with its default."""
    async with listener(ident(ca, tmp_path, role, id)) as (address, rec), \
            tls.aio_channel(address, ident(ca, tmp_path, "gateway", "gw")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await ch.unary_unary("/reddwarf.v1.Catalog/ListFlavors")(b"", timeout=5)
    expected = grpc.StatusCode.UNIMPLEMENTED if role == "server" else grpc.StatusCode.UNAVAILABLE
    assert e.value.code() == expected
    assert bool(rec.seen) == (role == "server")


@pytest.mark.parametrize("role,id", [("host", "h1"), ("instance", "i2"), ("server", "control")])
async def test_agent_stream_dials_only_the_server(ca, tmp_path, role, id) -> None:
    async def health() -> common_pb2.GuestHealth:
        return common_pb2.GuestHealth()

    settings = StreamSettings(server_address="", instance_id="i1", tls=ident(ca, tmp_path, "instance", "i1"),
                              state_dir=str(tmp_path / "agent"), backoff_initial=0.1, backoff_max=0.2)
    async with listener(ident(ca, tmp_path, role, id)) as (address, rec):
        stream = AgentStream(StreamSettings(**{**settings.__dict__, "server_address": address}),
                             CommandRunner(FakeDriver(str(tmp_path / "fake"))), health)
        task = asyncio.create_task(stream.run_forever())
        for _ in range(30):
            await asyncio.sleep(0.1)
            if rec.seen:
                break
        stream.stop()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
    assert [m for m, _ in rec.seen][:1] == (["/reddwarf.v1.AgentGateway/Connect"] if role == "server" else [])


@pytest.mark.parametrize("role,id", [("host", "h1"), ("instance", "i2"), ("server", "control")])
async def test_agent_enrollment_sends_its_token_only_to_the_server(ca, tmp_path, role, id) -> None:
    async with listener(ident(ca, tmp_path, role, id), client_auth=False) as (address, rec):
        cfg = AgentConfig(server_address=address, ca_pem_path=str(ca.dir / "ca.pem"), instance_id="i1",
                          enrollment_token="one-time-secret", state_dir=str(tmp_path / "agent"))
        with pytest.raises((TimeoutError, SystemExit)):
            await asyncio.wait_for(enroll(cfg), timeout=3)
    if role == "server":
        assert rec.seen and rec.seen[0][0] == "/reddwarf.v1.Enrollment/Enroll"
    else:
        assert rec.seen == []


# -- the server dialling one host --------------------------------------------------------------------
async def host_pool(ca: CertificateAuthority, tmp_path: Path, address: str, host_id: str = "h1"):  # type: ignore[no-untyped-def]
    from reddwarf.server import db, models
    from reddwarf.server.app import App
    from reddwarf.server.hosts import HostPool
    from reddwarf.server.settings import Settings
    settings = Settings(state_dir=str(tmp_path / "server"))
    Path(settings.state_dir).mkdir()
    db.upgrade(settings.db_url)
    engine = db.make_engine(settings.db_url)
    sessions = db.session_factory(engine)
    with sessions() as s, s.begin():
        s.add(models.Host(id=host_id, address=address))
    app = App(settings=settings, engine=engine, sessions=sessions, ca=ca,
              tls=ident(ca, tmp_path, "server", "control"))
    return HostPool(app)


@pytest.mark.parametrize("role,id", [("host", "h2"), ("server", "control"), ("instance", "h1"), ("host", "h1")])
async def test_server_s_hostd_client_expects_exactly_that_host(ca, tmp_path, role, id) -> None:
    async with listener(ident(ca, tmp_path, role, id)) as (address, rec):
        pool = await host_pool(ca, tmp_path, address)
        with pytest.raises(RedDwarfError) as e:
            await pool.client("h1").GetCapacity(host_pb2.GetCapacityRequest(), timeout=5)
        await pool.close()
    if (role, id) == ("host", "h1"):
        # Through the handshake: the first thing the host hears is the CRL.
        assert rec.seen[0][0] == "/reddwarf.v1.HostAgent/PushRevocations"
        assert e.value.code != grpc.StatusCode.UNAVAILABLE
    else:
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert rec.seen == []


# -- renewal ---------------------------------------------------------------------------------------
def test_renewal_is_due_in_the_last_third_of_a_lifetime(ca) -> None:
    now = dt.datetime.now(dt.UTC)
    fresh = ca.issue("server", "control", days=90).cert_pem
    assert not needs_renewal(fresh)
    old = ca.issue("server", "control", days=90, not_before=now - dt.timedelta(days=70)).cert_pem
    assert needs_renewal(old)
    year = ca.issue("server", "control", days=365, not_before=now - dt.timedelta(days=300)).cert_pem
    assert not needs_renewal(year)  # 65 days left: renewal starts 30 days before
    assert needs_renewal(year, now + dt.timedelta(days=40))


def test_server_certificate_renewed_at_start_and_recorded(ca, tmp_path) -> None:
    from reddwarf.server import db, main, models
    from reddwarf.server.settings import Settings
    settings = Settings(state_dir=str(tmp_path / "server"), server_cert_days=90)
    Path(settings.state_dir).mkdir()
    db.upgrade(settings.db_url)
    sessions = db.session_factory(db.make_engine(settings.db_url))
    assert main.renew_server_certificate(ca, sessions, settings)          # none yet: issued
    assert not main.renew_server_certificate(ca, sessions, settings)      # still fresh: kept
    cert = settings.server_tls_dir / "server.pem"
    # One in the last third of its life is replaced at the next start (and by the periodic pass).
    due = ca.issue("server", "control", days=90,
                   not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=80))
    cert.write_bytes(due.cert_pem)
    (settings.server_tls_dir / "server.key").write_bytes(due.key_pem)
    assert main.renew_server_certificate(ca, sessions, settings)
    assert not needs_renewal(cert.read_bytes())
    with sessions() as s:
        assert s.query(models.Certificate).filter_by(role="server").count() == 2


def _served_serial(address: str, client: TlsFiles) -> int:
    ctx = ssl.create_default_context(cafile=str(client.ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    ctx.set_alpn_protocols(["h2"])
    ctx.check_hostname = False
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as s:
        der = s.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der).serial_number


async def test_renewed_certificate_is_served_without_a_restart(ca, tmp_path) -> None:
    files = ident(ca, tmp_path, "server", "control")
    server = grpc.aio.server()
    port = server.add_secure_port("127.0.0.1:0", tls.reloading_server_credentials(files))
    await server.start()
    try:
        client = ident(ca, tmp_path, "client", "cli")
        address = f"127.0.0.1:{port}"
        first = await asyncio.to_thread(_served_serial, address, client)
        assert first == x509.load_pem_x509_certificate(files.cert.read_bytes()).serial_number
        issued = ca.renew_identity(files, "server", "control",
                                   now=dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
        assert issued is not None
        assert await asyncio.to_thread(_served_serial, address, client) == issued.serial != first
    finally:
        await server.stop(None)


# -- a failed create gives back its certificate -------------------------------------------------------
async def test_failed_create_revokes_the_instance_certificate_it_issued(ca, tmp_path) -> None:
    from types import SimpleNamespace

    from reddwarf.common.pki import make_key_and_csr
    from reddwarf.server import db, models
    from reddwarf.server.enrollment import Enrollment
    from reddwarf.server.instance_tasks import InstanceTasks

    pool = await host_pool(ca, tmp_path, "127.0.0.1:1")
    app = pool.app
    with app.sessions() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="t1", display_name="t1"))
        s.flush()
        flavor = s.query(models.Flavor).first()
        assert flavor is not None
        s.add(models.Instance(id="i-failed", tenant_id="t1", display_name="x", flavor_id=flavor.id,
                              volume_size_gb=1, datastore="mariadb", datastore_version="10.11"))
    enrollment = Enrollment(app, b"k" * 32)
    unused = SimpleNamespace()
    registry = SimpleNamespace(disconnect=lambda iid: None)
    instances = InstanceTasks(app, pool, registry, unused, enrollment, unused, unused, unused, unused)  # type: ignore[arg-type]
    _key, csr = make_key_and_csr("x")
    cert_pem, _ = enrollment.sign_csr(csr, "i-failed")
    serial = x509.load_pem_x509_certificate(cert_pem).serial_number
    await instances.compensate_create(SimpleNamespace(resource_id="i-failed", resource="instances/i-failed"))
    from reddwarf.common.pki import revoked_in_crl
    assert serial in revoked_in_crl(ca.crl_pem(), ca.cert_pem)
    with app.sessions() as s:
        row = s.get(models.Certificate, format(serial, "x"))
        assert row is not None and row.revoked_at is not None

"""The CA and mTLS helpers, exercised over a real loopback gRPC server (the standard health service)."""
from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from reddwarf.common import tls
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import CertificateAuthority, identity_from_cert, make_key_and_csr


def test_issued_certificate_carries_role_and_id(pki):
    ident = identity_from_cert(pki.files("instance", "inst-1").cert.read_bytes())
    assert (ident.role, ident.id) == ("instance", "inst-1")
    assert ident.serial > 0


def test_sign_csr_ignores_the_identity_the_requester_claims(pki):
    _key_pem, csr_pem = make_key_and_csr("spiffe://reddwarf/admin/root")
    issued = pki.ca.sign_csr(csr_pem, "instance", "abc")
    assert issued.key_pem == b""
    assert identity_from_cert(issued.cert_pem).uri == "spiffe://reddwarf/instance/abc"


@pytest.mark.parametrize("role,id,field", [("wizard", "x", "role"), ("host", "a/b", "id"),
                                           ("host", "", "id"), ("host", "x" * 200, "id")])
def test_bad_role_or_id_refused_naming_the_field(pki, role, id, field):
    with pytest.raises(InvalidArgument) as e:
        pki.ca.issue(role, id)
    assert e.value.violations[0][0] == field


def test_garbage_csr_refused(pki):
    with pytest.raises(InvalidArgument) as e:
        pki.ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n", "instance", "x")
    assert e.value.violations[0][0] == "csr_pem"


def test_init_refuses_to_overwrite_an_existing_ca(pki):
    with pytest.raises(InvalidArgument):
        CertificateAuthority.init(pki.ca.dir)
    assert CertificateAuthority.ensure(pki.ca.dir).cert_pem == pki.ca.cert_pem
    assert oct((pki.ca.dir / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_revocation_list_follows_the_crl_file(tmp_path):
    ca = CertificateAuthority.init(tmp_path / "ca")
    issued = ca.issue("host", "h1")
    rl = tls.RevocationList(tmp_path / "ca" / "crl.pem", ca.cert_pem)
    assert not rl.is_revoked(issued.serial)
    ca.revoke(issued.serial)
    assert rl.is_revoked(issued.serial)


def test_crl_signed_by_another_ca_refused(tmp_path):
    ours = CertificateAuthority.init(tmp_path / "ours")
    theirs = CertificateAuthority.init(tmp_path / "theirs")
    rl = tls.RevocationList(theirs.dir / "crl.pem", ours.cert_pem)
    assert rl.current() is None
    assert rl.is_revoked(1)  # no CRL of ours: fails closed
    with pytest.raises(InvalidArgument):
        rl.install(theirs.crl_pem())


@pytest.fixture
async def health_server(pki):
    seen: list = []

    class Health(health.aio.HealthServicer):
        async def Check(self, request, context):
            seen.append(tls.peer_identity(context))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    cert, key, ca = pki.files("server", "control").read()
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(cert, key, ca))
    await server.start()
    yield f"127.0.0.1:{port}", seen
    await server.stop(None)


async def _check(address, creds_or_files):
    async with tls.aio_channel(address, creds_or_files) as ch:
        return await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)


async def test_mtls_peer_identity_comes_from_the_verified_certificate(pki, health_server):
    address, seen = health_server
    await _check(address, pki.files("admin", "ops"))
    assert (seen[-1].role, seen[-1].id) == ("admin", "ops")


@pytest.mark.parametrize("kind", ["no client cert", "foreign CA", "expired", "plaintext"])
async def test_mtls_refuses_untrusted_callers(pki, health_server, kind):
    address, seen = health_server
    before = len(seen)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        if kind == "plaintext":
            async with grpc.aio.insecure_channel(address) as ch:
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        elif kind == "no client cert":
            await _check(address, tls.channel_credentials(pki.ca.cert_pem))
        elif kind == "foreign CA":
            await _check(address, pki.foreign_files("admin", "mallory"))
        else:
            await _check(address, pki.expired_files("admin", "old"))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(seen) == before  # the servicer never ran


def test_concurrent_revocations_lose_no_serial_and_leave_no_temporary_file(tmp_path):
    # Deletes revoke from worker threads at the same time; each used to read, add and rewrite
    # revoked.json through one fixed temporary name, so one rename failed and a serial could be lost.
    from concurrent.futures import ThreadPoolExecutor

    ca = CertificateAuthority.init(tmp_path / "ca")
    serials = list(range(1000, 1040))
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(ca.revoke, serials))
    assert sorted(ca.revoked_serials()) == serials
    rl = tls.RevocationList(ca.dir / "crl.pem", ca.cert_pem)
    assert all(rl.is_revoked(s) for s in serials)
    assert not [p.name for p in ca.dir.iterdir() if p.name.endswith(".tmp")]

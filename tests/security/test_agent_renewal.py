"""Guest agent certificate renewal against the REAL server process: the agent (a real agent process with the
fake datastore driver) makes a new key, sends only a CSR over mTLS with its current certificate, and the
server signs for the caller's own instance id; the stream reconnects with the new certificate. What may not
renew: a revoked instance certificate, any other role, a guest renewing in a loop."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reddwarf.agent.main import check_renewed, install_renewed, recover_renewal, renewal_due
from reddwarf.common import tls
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import (
    CertificateAuthority,
    TlsFiles,
    identity_from_cert,
    make_key_and_csr,
    write_atomic,
)
from reddwarf.server.agents import RENEWALS_PER_DAY
from reddwarf.server.auth import serial_hex
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc
from tests.fixtures.server import RunningServer
from tests.fixtures.waiting import until

DAY = dt.timedelta(days=1)


def _files(ca: CertificateAuthority, directory: Path, role: str, id: str, left: dt.timedelta | None = None
           ) -> tuple[TlsFiles, int]:
    """(role, id) issued into directory/agent.{pem,key} (0600); with `left`, a one-day certificate that
    has only that much of its life left."""
    not_before = None if left is None else dt.datetime.now(dt.UTC) - (DAY - left)
    issued = ca.issue(role, id, days=1 if left is not None else 365, not_before=not_before)
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "agent.pem", directory / "agent.key", directory / "ca.pem")
    write_atomic(files.key, issued.key_pem, 0o600)
    write_atomic(files.cert, issued.cert_pem, 0o600)
    write_atomic(files.ca, ca.cert_pem)
    return files, issued.serial


def _revoke(server: RunningServer, cert_pem: bytes) -> None:
    """Records a certificate issued outside the API (as enrollment would have), then revokes it through
    the admin API."""
    ident = identity_from_cert(cert_pem)
    con = sqlite3.connect(server.state_dir / "state.db")
    con.execute("INSERT INTO certificates (serial, identity, role, subject_id, not_after, revoke_reason, created_at)"
                " VALUES (?, ?, ?, ?, ?, '', ?)", (serial_hex(ident.serial), ident.uri, ident.role, ident.id,
                                                   dt.datetime.now() + DAY, dt.datetime.now()))
    con.commit()
    con.close()
    with server.channel(server.admin_files) as ch:
        admin_pb2_grpc.AdminStub(ch).RevokeCertificate(
            admin_pb2.RevokeCertificateRequest(serial=serial_hex(ident.serial), reason="test"), timeout=10)


def _renew(server: RunningServer, files: TlsFiles, csr_pem: bytes) -> bytes:
    with tls.sync_channel(server.agent, files) as ch:
        resp = agent_pb2_grpc.AgentGatewayStub(ch).RenewCertificate(
            agent_pb2.RenewCertificateRequest(csr_pem=csr_pem.decode()), timeout=15)
    return resp.certificate_pem.encode()


def _public(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class Agent:
    def __init__(self, server: RunningServer, state: Path, iid: str) -> None:
        self.state, self.iid = state, iid
        cfg = {"server_address": server.agent, "ca_pem_path": str(server.server_files.ca), "instance_id": iid,
               "heartbeat_seconds": 1, "state_dir": str(state), "driver": "fake", "renew_check_seconds": 1}
        (state / "agent.json").write_text(json.dumps(cfg))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.state / "agent.log", "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "reddwarf.agent.main", "--config",
                                          str(self.state / "agent.json")], stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def log(self) -> str:
        path = self.state / "agent.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def events(self, event: str) -> int:
        return sum(1 for line in self.log().splitlines() if f" event={event} " in line + " ")

    def serial(self) -> int:
        return identity_from_cert((self.state / "agent.pem").read_bytes()).serial


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    started: list[Agent] = []
    yield started
    for a in started:
        a.stop()


def test_an_agent_near_expiry_renews_before_it_dials_and_keeps_working_when_the_old_one_is_revoked(
        server, tmp_path, agents) -> None:
    iid = f"i-{uuid.uuid4().hex[:8]}"
    old_files, old_serial = _files(server.ca, tmp_path / "agent", "instance", iid, left=dt.timedelta(hours=2))
    old_pem = old_files.cert.read_bytes()
    assert renewal_due(old_pem, 1 / 3)
    agent = Agent(server, tmp_path / "agent", iid)
    agents.append(agent)
    agent.start()
    until(agent.serial, lambda s: s != old_serial, timeout=30, what="a renewed certificate")
    until(lambda: agent.events("connected"), lambda n: n >= 1, timeout=30, what="the stream up")

    new_pem = old_files.cert.read_bytes()
    ident = identity_from_cert(new_pem)
    assert (ident.role, ident.id) == ("instance", iid)
    assert _public(new_pem) != _public(old_pem)  # a new key, made in the guest
    assert tls.key_matches(new_pem, old_files.key.read_bytes())
    assert oct(old_files.key.stat().st_mode & 0o777) == "0o600"
    assert oct(old_files.cert.stat().st_mode & 0o777) == "0o600"
    assert not renewal_due(new_pem, 1 / 3)
    assert not list(agent.state.glob("*.new"))
    # Recorded like enrollment's, so deleting the instance revokes it too.
    con = sqlite3.connect(server.state_dir / "state.db")
    row = con.execute("SELECT identity, role, subject_id, revoked_at FROM certificates WHERE serial = ?",
                      (serial_hex(ident.serial),)).fetchone()
    con.close()
    assert row == (f"spiffe://reddwarf/instance/{iid}", "instance", iid, None)
    assert agent.events('"certificate renewed"') == 1  # once: the fresh one is not due

    # With the old certificate revoked, the agent (restarted on its state dir) still joins: its stream
    # runs on the new certificate.
    _revoke(server, old_pem)
    agent.stop()
    before = agent.events("connected")
    agent.start()
    until(lambda: agent.events("connected"), lambda n: n > before, timeout=30, what="the stream up again")
    assert agent.serial() == ident.serial


def test_a_running_agent_renews_when_due_and_reconnects_its_stream(server, tmp_path, agents) -> None:
    iid = f"i-{uuid.uuid4().hex[:8]}"
    # Due in about 8 s: the agent dials with the old certificate first, then renews on a periodic check.
    files, old_serial = _files(server.ca, tmp_path / "agent", "instance", iid,
                               left=DAY / 3 + dt.timedelta(seconds=8))
    agent = Agent(server, tmp_path / "agent", iid)
    agents.append(agent)
    agent.start()
    until(lambda: agent.events("connected"), lambda n: n >= 1, timeout=30, what="the stream up")
    assert agent.serial() == old_serial
    until(agent.serial, lambda s: s != old_serial, timeout=40, what="a renewed certificate")
    log = until(agent.log, lambda text: "event=\"reconnecting with the renewed certificate\"" in text
                and text.rsplit("reconnecting with the renewed certificate", 1)[1].count(" event=connected ") >= 1,
                timeout=30, what="the stream reconnected after the renewal")
    assert "event=\"stream lost\"" not in log.rsplit("certificate renewed", 1)[1]
    assert identity_from_cert(files.cert.read_bytes()).id == iid


def test_the_certificate_names_the_caller_whatever_the_csr_says(server, tmp_path) -> None:
    files, _ = _files(server.ca, tmp_path / "a", "instance", "inst-a")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "instance/inst-b")]))
           .add_extension(x509.SubjectAlternativeName([
               x509.UniformResourceIdentifier("spiffe://reddwarf/instance/inst-b"), x509.DNSName("server.reddwarf")]),
               critical=False)
           .sign(key, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)
    cert = _renew(server, files, csr)
    ident = identity_from_cert(cert)
    assert (ident.role, ident.id) == ("instance", "inst-a")
    parsed = x509.load_pem_x509_certificate(cert)
    san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == []
    assert _public(cert) == key.public_key().public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    # The old certificate still works (it lapses on its own): a second request is answered too.
    assert identity_from_cert(_renew(server, files, make_key_and_csr("x")[1])).id == "inst-a"


def test_a_revoked_instance_certificate_cannot_renew(server, tmp_path) -> None:
    files, _ = _files(server.ca, tmp_path / "gone", "instance", "inst-gone")
    _revoke(server, files.cert.read_bytes())
    with pytest.raises(grpc.RpcError) as e:
        _renew(server, files, make_key_and_csr("instance/inst-gone")[1])
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role", ["host", "server", "admin", "client", "gateway"])
def test_only_instance_certificates_may_renew_here(server, tmp_path, role) -> None:
    files, _ = _files(server.ca, tmp_path / role, role, f"{role}-1")
    with pytest.raises(grpc.RpcError) as e:
        _renew(server, files, make_key_and_csr(f"instance/{role}-1")[1])
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_bad_csrs_and_renewing_in_a_loop_are_refused(server, tmp_path) -> None:
    files, _ = _files(server.ca, tmp_path / "loop", "instance", "inst-loop")
    for bad in (b"", b"-----BEGIN CERTIFICATE REQUEST-----\nnope\n-----END CERTIFICATE REQUEST-----\n"):
        with pytest.raises(grpc.RpcError) as e:
            _renew(server, files, bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    issued = 1  # the broken PEM above counted: the cap is on attempts that reach the signer
    while issued < RENEWALS_PER_DAY:
        _renew(server, files, make_key_and_csr("x")[1])
        issued += 1
    with pytest.raises(grpc.RpcError) as e:
        _renew(server, files, make_key_and_csr("x")[1])
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- the agent's side, in process --------------------------------------------------------------------------

def test_the_agent_installs_only_a_certificate_for_itself_on_its_new_key(pki, tmp_path) -> None:
    files, _ = _files(pki.ca, tmp_path / "a", "instance", "i-me")
    key, csr = make_key_and_csr("instance/i-me")
    good = pki.ca.sign_csr(csr, "instance", "i-me").cert_pem
    check_renewed(files, "i-me", key, good)
    bad = {"another instance": pki.ca.sign_csr(csr, "instance", "i-other").cert_pem,
           "another role": pki.ca.sign_csr(csr, "host", "i-me").cert_pem,
           "another key": pki.ca.issue("instance", "i-me").cert_pem,
           "another CA": pki.foreign.sign_csr(csr, "instance", "i-me").cert_pem,
           "not PEM": b"junk"}
    for what, pem in bad.items():
        with pytest.raises(InvalidArgument):
            check_renewed(files, "i-me", key, pem)
            pytest.fail(f"{what} was accepted")


def test_an_install_cut_off_by_a_crash_is_finished_or_discarded(pki, tmp_path) -> None:
    files, _ = _files(pki.ca, tmp_path / "a", "instance", "i-c")
    old = files.cert.read_bytes(), files.key.read_bytes()
    key, csr = make_key_and_csr("instance/i-c")
    cert = pki.ca.sign_csr(csr, "instance", "i-c").cert_pem
    key_new, cert_new = files.key.with_name("agent.key.new"), files.cert.with_name("agent.pem.new")

    # Only the new key was written: the certificate never came, the old pair stays.
    write_atomic(key_new, key, 0o600)
    recover_renewal(files)
    assert (files.cert.read_bytes(), files.key.read_bytes()) == old and not key_new.exists()

    # Both written, the key renamed, then the crash: the install is finished.
    write_atomic(key_new, key, 0o600)
    write_atomic(cert_new, cert, 0o600)
    os.replace(key_new, files.key)
    recover_renewal(files)
    assert (files.cert.read_bytes(), files.key.read_bytes()) == (cert, key)
    assert not cert_new.exists()

    # A clean install leaves nothing behind.
    key2, csr2 = make_key_and_csr("instance/i-c")
    cert2 = pki.ca.sign_csr(csr2, "instance", "i-c").cert_pem
    install_renewed(files, key2, cert2)
    assert (files.cert.read_bytes(), files.key.read_bytes()) == (cert2, key2)
    assert sorted(p.name for p in files.cert.parent.iterdir()) == ["agent.key", "agent.pem", "ca.pem"]


async def test_a_caller_revoked_while_its_renewal_is_signed_gets_nothing_that_lives(pki, tmp_path) -> None:
    """The instance is deleted (its certificates revoked) between the check of the caller and the record
    of the new certificate: the new one is revoked too and the call refused. In process: a real grpc.aio
    server with mTLS holding AgentGatewayServicer, the deletion injected into the signer."""
    from reddwarf.common.tls import server_credentials
    from reddwarf.server.agents import AgentGatewayServicer, AgentRegistry
    from tests.fixtures.mariadb import free_port

    revoked: set[int] = set()
    caller, caller_serial = _files(pki.ca, tmp_path / "race", "instance", "i-race")
    issued: list[int] = []

    def sign(csr: bytes, iid: str) -> tuple[bytes, bytes]:
        revoked.add(caller_serial)  # the delete lands here
        out = pki.ca.sign_csr(csr, "instance", iid)
        issued.append(out.serial)
        return out.cert_pem, pki.ca.cert_pem

    def revoke_serial(serial: int, reason: str) -> None:
        revoked.add(serial)

    registry = AgentRegistry(is_revoked=lambda serial: serial in revoked)
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(
        AgentGatewayServicer(registry, None, sign, revoke_serial), server)
    port = free_port()
    cert, key, ca = pki.files("server", "control").read()
    server.add_secure_port(f"127.0.0.1:{port}", server_credentials(cert, key, ca))
    await server.start()
    try:
        async with tls.aio_channel(f"127.0.0.1:{port}", caller) as ch:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await agent_pb2_grpc.AgentGatewayStub(ch).RenewCertificate(
                    agent_pb2.RenewCertificateRequest(csr_pem=make_key_and_csr("x")[1].decode()), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert issued and issued[0] in revoked
    finally:
        await server.stop(None)

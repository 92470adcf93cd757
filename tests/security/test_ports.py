"""Every gRPC port of a running system, attacked: plaintext, another CA, expired and revoked certificates,
and certificates of the wrong role. (The public/admin API's token rules are in tests/server.)"""
from __future__ import annotations

import datetime as dt
import os

import grpc
import pytest

from reddwarf.common import tls
from reddwarf.common.pki import TlsFiles, make_key_and_csr
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.cluster import start_cluster
from tests.fixtures.pki import write_issued
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: hostd")]


@pytest.fixture(scope="module")
def c(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("sec")) as cl:
        yield cl


def files(c, tmp_path, role, id, expired=False, revoked=False) -> TlsFiles:
    f, serial = write_issued(c.server.ca, tmp_path / f"{role}-{id}-{expired}-{revoked}", role, id, expired)
    if revoked:
        # Issued outside the API (as a stolen CA key would): record it, then revoke it through the API.
        import sqlite3

        from reddwarf.server.auth import serial_hex
        con = sqlite3.connect(c.server.state_dir / "state.db")
        con.execute("INSERT INTO certificates (serial, identity, role, subject_id, not_after, revoke_reason, created_at)"
                    " VALUES (?, ?, ?, ?, ?, '', ?)", (serial_hex(serial), f"spiffe://reddwarf/{role}/{id}",
                                                       role, id, dt.datetime.now() + dt.timedelta(days=365),
                                                       dt.datetime.now()))
        con.commit()
        con.close()
        c.admin.RevokeCertificate(admin_pb2.RevokeCertificateRequest(serial=serial_hex(serial), reason="test"))
    return f


def call_hostd(address, creds_or_files, host_id=None):
    peer = tls.host_peer(host_id) if host_id else tls.SERVER_PEER
    ch = tls.sync_channel(address, creds_or_files, peer) if creds_or_files is not None \
        else grpc.insecure_channel(address)
    with ch:
        return host_pb2_grpc.HostAgentStub(ch).GetCapacity(host_pb2.GetCapacityRequest(), timeout=10)


def call_agent(address, creds_or_files, claim="x"):
    def msgs():
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=claim))
    ch = tls.sync_channel(address, creds_or_files) if creds_or_files is not None else grpc.insecure_channel(address)
    with ch:
        for _ in agent_pb2_grpc.AgentGatewayStub(ch).Connect(msgs(), timeout=10):
            return


@pytest.mark.parametrize("port", ["hostd", "agent"])
@pytest.mark.parametrize("attack", ["plaintext", "foreign", "expired"])
def test_untrusted_transport_is_refused_before_any_handler(c, pki, tmp_path, port, attack):
    address = c.hostd.address if port == "hostd" else c.server.agent
    role = "server" if port == "hostd" else "instance"
    creds = {"plaintext": None, "foreign": pki.foreign_files(role, "x"),
             "expired": None if attack != "expired" else files(c, tmp_path, role, "x", expired=True)}[attack]
    fn = (lambda a, f: call_hostd(a, f, c.hostd.host_id)) if port == "hostd" else call_agent
    with pytest.raises(grpc.RpcError) as e:
        fn(address, creds)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_revoked_server_certificate_is_refused_by_hostd_through_the_crl(c, tmp_path):
    good = files(c, tmp_path, "server", "rogue")
    assert call_hostd(c.hostd.address, good, c.hostd.host_id).host_id
    bad = files(c, tmp_path, "server", "rogue2", revoked=True)

    def attempt() -> grpc.StatusCode:
        try:
            call_hostd(c.hostd.address, bad, c.hostd.host_id)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()
    # The hostd was started without --crl-path: only the server's push (on the revocation) tells it.
    assert until(attempt, lambda code: code != grpc.StatusCode.OK, timeout=30,
                 what="hostd refusing the revoked certificate") == grpc.StatusCode.UNAUTHENTICATED


def test_revoked_instance_certificate_cannot_open_the_agent_stream(c, tmp_path):
    bad = files(c, tmp_path, "instance", "gone", revoked=True)
    with pytest.raises(grpc.RpcError) as e:
        call_agent(c.server.agent, bad, claim="gone")
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("role", ["admin", "client", "host", "gateway"])
def test_only_instances_may_open_agent_streams(c, tmp_path, role):
    with pytest.raises(grpc.RpcError) as e:
        call_agent(c.server.agent, files(c, tmp_path, role, "y"), claim="y")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("role", ["instance", "host", "admin"])
def test_only_the_server_may_drive_hostd(c, tmp_path, role):
    with pytest.raises(grpc.RpcError) as e:
        call_hostd(c.hostd.address, files(c, tmp_path, role, "z"), c.hostd.host_id)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_host_certificate_cannot_call_the_admin_api(c, tmp_path):
    with c.server.channel(files(c, tmp_path, "host", "h")) as ch, pytest.raises(grpc.RpcError) as e:
        admin_pb2_grpc.AdminStub(ch).ListTenants(admin_pb2.ListTenantsRequest(), metadata=c.server.metadata())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_enrollment_needs_tls_and_a_real_token(c):
    _, csr = make_key_and_csr("x")
    req = agent_pb2.EnrollRequest(instance_id="i-1", enrollment_token="guess", csr_pem=csr.decode())
    with grpc.insecure_channel(c.server.enroll) as ch, pytest.raises(grpc.RpcError) as e:
        agent_pb2_grpc.EnrollmentStub(ch).Enroll(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    creds = tls.channel_credentials(c.server.ca.cert_pem)
    with grpc.secure_channel(c.server.enroll, creds, options=tls.channel_options(c.server.enroll)) as ch, \
            pytest.raises(grpc.RpcError) as e:
        agent_pb2_grpc.EnrollmentStub(ch).Enroll(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED

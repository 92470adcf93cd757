"""Host certificate renewal against a real hostd: the server asks, hostd makes the key, the server signs for
the host id it registered, hostd checks and serves the new certificate without a restart."""
from __future__ import annotations

import datetime as dt
import os

import grpc
import pytest
from cryptography import x509

from reddwarf.common.pki import (
    CertificateAuthority,
    TlsFiles,
    identity_from_cert,
    needs_renewal,
    write_atomic,
)
from reddwarf.v1 import host_pb2, host_pb2_grpc
from tests.fixtures.hostd import start_hostd
from tests.security.test_tls_peers import _served_serial, host_pool, ident

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="hostd needs root")]


async def test_server_renews_a_host_certificate_that_is_due(tmp_path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    due = ca.issue("host", "hren", days=90, not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=70))
    host = TlsFiles(tmp_path / "host" / "host.pem", tmp_path / "host" / "host.key", tmp_path / "host" / "ca.pem")
    host.cert.parent.mkdir()
    write_atomic(host.key, due.key_pem, 0o600)
    write_atomic(host.cert, due.cert_pem)
    write_atomic(host.ca, ca.cert_pem)
    with start_hostd(tmp_path / "hostd", host, host_id="hren", crl_path=ca.dir / "crl.pem") as h:
        pool = await host_pool(ca, tmp_path, h.address, host_id="hren")
        server_files = pool.app.tls
        assert _served_serial(h.address, server_files) == due.serial
        assert await pool.renew_certificate("hren")
        served = _served_serial(h.address, server_files)
        assert served != due.serial
        assert identity_from_cert(host.cert.read_bytes()).serial == served
        assert not needs_renewal(host.cert.read_bytes())
        assert (await pool.client("hren").GetCapacity(host_pb2.GetCapacityRequest())).host_id == "hren"
        assert not await pool.renew_certificate("hren")  # fresh now: nothing to do
        await pool.close()

        # What hostd refuses to install: another host's certificate, one for a key it did not make, one
        # from another CA. The served certificate stays.
        other_ca = CertificateAuthority.init(tmp_path / "other")
        with h.channel(ident(ca, tmp_path, "server", "control2")) as ch:
            stub = host_pb2_grpc.HostAgentStub(ch)
            csr = stub.RequestCertificateRenewal(host_pb2.CertificateRenewalRequest(force=True)).csr_pem.encode()
            for bad in (ca.sign_csr(csr, "host", "someone-else").cert_pem, ca.issue("host", "hren").cert_pem,
                        other_ca.sign_csr(csr, "host", "hren").cert_pem):
                with pytest.raises(grpc.RpcError) as e:
                    stub.InstallCertificate(host_pb2.InstallCertificateRequest(certificate_pem=bad.decode()))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _served_serial(h.address, server_files) == served
            # Only the server may ask at all.
        with h.channel(ident(ca, tmp_path, "instance", "i1")) as ch, pytest.raises(grpc.RpcError) as e:
            host_pb2_grpc.HostAgentStub(ch).RequestCertificateRenewal(host_pb2.CertificateRenewalRequest())
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert x509.load_pem_x509_certificate(host.cert.read_bytes()).serial_number == served

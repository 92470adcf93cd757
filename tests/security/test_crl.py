"""The CA's revocation list on a host: pushed by the server, checked by hostd, and failing closed. The unit
part drives RevocationList directly; the slow part a real hostd process."""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import grpc
import pytest

from reddwarf.common import tls
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, Unauthenticated
from reddwarf.common.pki import CertificateAuthority, Identity, load_crl
from reddwarf.v1 import host_pb2, host_pb2_grpc
from tests.fixtures.errors import field_violations
from tests.fixtures.hostd import start_hostd


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


def who(serial: int) -> Identity:
    return Identity("server", "control", serial)


def test_no_crl_fails_closed(ca, tmp_path) -> None:
    rl = tls.RevocationList(tmp_path / "host" / "crl.pem", ca.cert_pem)
    with pytest.raises(FailedPrecondition) as e:
        rl.check(who(1))
    assert e.value.violations[0][0] == "crl"
    assert rl.is_revoked(1)


def test_pushed_crl_is_kept_and_honoured(ca, tmp_path) -> None:
    rl = tls.RevocationList(tmp_path / "host" / "crl.pem", ca.cert_pem)
    bad = ca.issue("server", "rogue").serial
    rl.install(ca.crl_pem())
    rl.check(who(bad))
    ca.revoke(bad)
    rl.check(who(bad))  # not pushed yet: the host cannot know
    rl.install(ca.crl_pem())
    with pytest.raises(Unauthenticated):
        rl.check(who(bad))
    # A restarted hostd reads what was pushed.
    again = tls.RevocationList(tmp_path / "host" / "crl.pem", ca.cert_pem)
    with pytest.raises(Unauthenticated):
        again.check(who(bad))


def test_older_crl_cannot_undo_a_revocation(ca, tmp_path) -> None:
    rl = tls.RevocationList(tmp_path / "host" / "crl.pem", ca.cert_pem)
    before = ca.crl_pem()
    bad = ca.issue("server", "rogue").serial
    ca.revoke(bad)
    rl.install(ca.crl_pem())
    with pytest.raises(InvalidArgument) as e:
        rl.install(before)
    assert e.value.violations[0][0] == "crl"
    with pytest.raises(Unauthenticated):
        rl.check(who(bad))


def test_forged_or_lapsed_crl_refused(ca, tmp_path) -> None:
    other = CertificateAuthority.init(tmp_path / "other")
    rl = tls.RevocationList(tmp_path / "host" / "crl.pem", ca.cert_pem)
    with pytest.raises(InvalidArgument):
        rl.install(other.crl_pem())
    with pytest.raises(InvalidArgument):
        rl.install(b"-----BEGIN X509 CRL-----\nnope\n-----END X509 CRL-----\n")
    rl.install(ca.crl_pem())
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=8)
    assert rl.current() is not None and rl.current(later) is None  # a lapsed list is no list
    with pytest.raises(InvalidArgument):
        load_crl(ca.crl_pem(), ca.cert_pem, now=later)


def test_ca_re_signs_its_crl_before_it_lapses(ca) -> None:
    first = load_crl(ca.crl_pem(), ca.cert_pem)
    assert not ca.refresh_crl()
    assert ca.refresh_crl(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=5))
    second = load_crl(ca.crl_pem(), ca.cert_pem)
    assert second.number > first.number


def test_every_new_crl_is_announced(ca) -> None:
    heard: list[int] = []
    ca.crl_listeners.append(lambda: heard.append(1))
    ca.revoke(ca.issue("instance", "i1").serial)
    assert heard == [1]


# -- a real hostd ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="hostd needs root (LXC, loop devices, mounts)")
def test_hostd_refuses_everything_without_a_crl_and_honours_a_pushed_one(ca, tmp_path) -> None:
    host = ca.write_identity(tmp_path / "host", "host", "host", "hcrl")
    control = ca.write_identity(tmp_path / "control", "server", "server", "control")
    rogue = ca.write_identity(tmp_path / "rogue", "server", "server", "rogue")
    instance = ca.write_identity(tmp_path / "inst", "instance", "instance", "i1")

    def call(h, files, req=None):  # type: ignore[no-untyped-def]
        with h.channel(files) as ch:
            stub = host_pb2_grpc.HostAgentStub(ch)
            if req is None:
                return stub.GetCapacity(host_pb2.GetCapacityRequest(), timeout=10)
            return stub.PushRevocations(req, timeout=10)

    with start_hostd(tmp_path / "hostd", host, host_id="hcrl") as h:
        for files in (control, rogue):
            with pytest.raises(grpc.RpcError) as e:
                call(h, files)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert field_violations(e.value) == ["crl"]
        # Only the server may push, even while there is none.
        with pytest.raises(grpc.RpcError) as e:
            call(h, instance, host_pb2.PushRevocationsRequest(crl_pem=ca.crl_pem().decode()))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        old = ca.crl_pem()
        assert call(h, control, host_pb2.PushRevocationsRequest(crl_pem=old.decode())).revoked == 0
        assert call(h, rogue).host_id == "hcrl"

        ca.revoke(int(rogue_serial(rogue)))
        assert call(h, control, host_pb2.PushRevocationsRequest(crl_pem=ca.crl_pem().decode())).revoked == 1
        with pytest.raises(grpc.RpcError) as e:
            call(h, rogue)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # The revoked server cannot push the old list back to un-revoke itself, nor can anyone else.
        for files in (rogue, control):
            with pytest.raises(grpc.RpcError) as e:
                call(h, files, host_pb2.PushRevocationsRequest(crl_pem=old.decode()))
            assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT)
        assert call(h, control).host_id == "hcrl"

    # Restarted, it still holds the pushed list: the revoked certificate stays refused.
    (tmp_path / "hostd" / "hostd.log").unlink()  # the fixture waits for a fresh "ready" line
    with start_hostd(tmp_path / "hostd", host, host_id="hcrl") as h:
        with pytest.raises(grpc.RpcError) as e:
            call(h, rogue)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert call(h, control).host_id == "hcrl"


def rogue_serial(files) -> int:  # type: ignore[no-untyped-def]
    from reddwarf.common.pki import identity_from_cert
    return identity_from_cert(files.cert.read_bytes()).serial

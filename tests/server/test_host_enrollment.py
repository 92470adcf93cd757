"""Admin.EnrollHost against a REAL OpenSSH sshd in a network namespace of its own (tests/fixtures/sshhost.py):
the server logs in with paramiko, checks the pinned host key, installs hostd from the wheelhouse into a
venv there, has the host make its key and CSR, starts hostd under its supervisor (no systemd here) and
registers the host once hostd answers over mTLS. Every bad input gets its status, a message naming the
cause, nothing registered and nothing left on the host."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.common import tls
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.errors import field_violations
from tests.fixtures.server import start_server
from tests.fixtures.sshhost import have_sshd, keygen, namespace_pids, ssh_host

pytestmark = [pytest.mark.root, pytest.mark.skipif(not have_sshd(), reason="needs root and openssh-server "
                                                   "(make apt installs it)")]
REPO = Path(__file__).resolve().parents[2]
# Cached across runs (keyed by the sources' digest inside): only the first run builds and fetches wheels.
WHEELHOUSE = REPO / "build" / "test-wheelhouse"
HOSTD_CONFIG = {"container_driver": "fake", "volume_driver": "fake", "state_dir": "{install_dir}/state",
                "lxc_path": "{install_dir}/lxc", "storage_path": "{install_dir}/volumes"}


def enroll_server(tmp: Path, ready_timeout: float):  # type: ignore[no-untyped-def]
    cfg = tmp / "hostd-template.json"
    cfg.write_text(json.dumps(HOSTD_CONFIG))
    env = {"REDDWARF_ENROLL_WHEELHOUSE": str(WHEELHOUSE),
           "REDDWARF_ENROLL_INSTALL_DIR": str(tmp / "hosts" / "{host}"),
           "REDDWARF_ENROLL_HOSTD_CONFIG": str(cfg), "REDDWARF_ENROLL_READY_TIMEOUT_SECONDS": str(ready_timeout),
           "REDDWARF_ENROLL_CONNECT_TIMEOUT_SECONDS": "5", "REDDWARF_CAPACITY_REFRESH_SECONDS": "3600"}
    return start_server(tmp, env)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # Long enough for a fresh venv's hostd to start on a loaded machine.
    with enroll_server(tmp_path_factory.mktemp("enroll"), ready_timeout=30) as s:
        yield s


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory):
    """For the hostd that never answers: the whole wait is the ready timeout, so a short one (a server start
    costs a few seconds; waiting out 30 s cost 25 more)."""
    with enroll_server(tmp_path_factory.mktemp("enroll-short"), ready_timeout=4) as s:
        yield s


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with ssh_host(tmp_path_factory.mktemp("sshhost")) as h:
        yield h


def install_dir(server, host_id: str) -> Path:
    return server.state_dir.parent / "hosts" / host_id


def admin(server):
    return admin_pb2_grpc.AdminStub(server.channel(server.admin_files))


def enroll(server, host_id, target, host_key, **kw):
    return admin(server).EnrollHost(admin_pb2.EnrollHostRequest(id=host_id, ssh_target=target, host_key=host_key,
                                                                **kw), timeout=600)


def assert_not_registered(server, host_id):
    with pytest.raises(grpc.RpcError) as e:
        admin(server).GetHost(admin_pb2.GetHostRequest(name=f"hosts/{host_id}"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not install_dir(server, host_id).exists()


def cli_env(server):
    f = server.admin_files
    return {"REDDWARF_ENDPOINT": server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
            "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": server.admin_token, "REDDWARF_CONFIG": "/nonexistent"}


def invoke(server, *args):
    cli.State.factory = None
    return CliRunner().invoke(cli.app, list(args), env=cli_env(server))


def _hostd_cmdlines(netns: str) -> dict[int, str]:
    cmds = {}
    for pid in namespace_pids(netns):
        try:
            cmds[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            pass
    return {p: c for p, c in cmds.items() if "reddwarf.hostd.main serve" in c}


def hostd_processes(netns: str) -> list[str]:
    return list(_hostd_cmdlines(netns).values())


def hostd_pids(netns: str) -> list[int]:
    return list(_hostd_cmdlines(netns))


# -- the happy path ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.dependency()
def test_enroll_installs_starts_and_registers_the_host(server, host):
    r = invoke(server, "--json", "admin", "host", "enroll", "edge-1", "--ssh", f"root@{host.address}",
               "--port", str(host.port), "--identity", str(host.client_key), "--host-key", host.host_key,
               "--hostd-port", "7443")
    assert r.exit_code == 0, r.output + "\n" + server.log()[-3000:]
    shown = json.loads(r.output)
    assert shown["id"] == "edge-1" and shown["address"] == f"{host.address}:7443"
    assert shown["state"] == "HOST_STATE_UP" and shown["container_driver"] == "fake"
    assert int(shown["capacity"]["memory_mb_total"]) > 0 and shown["capacity"]["cpus"] > 0

    # hostd really runs inside the host's namespace, supervised, and answers us as exactly host/edge-1.
    assert len(hostd_processes(host.netns)) == 1
    root = install_dir(server, "edge-1")
    assert (root / "hostd.pid").exists()
    with tls.sync_channel(f"{host.address}:7443", server.server_files, tls.host_peer("edge-1")) as ch:
        cap = host_pb2_grpc.HostAgentStub(ch).GetCapacity(host_pb2.GetCapacityRequest(), timeout=10)
    assert cap.memory_mb_total > 0

    # The private key was made on the host and stayed there: the certificate is for that key, and the key is
    # readable by its owner only. The server never saw it (only the CSR went over SSH).
    key = serialization.load_pem_private_key((root / "tls/hostd.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((root / "tls/hostd.pem").read_bytes())
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*der) == cert.public_key().public_bytes(*der)
    assert (root / "tls/hostd.key").stat().st_mode & 0o077 == 0
    assert not list(server.state_dir.rglob("hostd.key"))

    listed = invoke(server, "--json", "admin", "host", "list")
    assert listed.exit_code == 0, listed.output
    assert [h["id"] for h in json.loads(listed.output)] == ["edge-1"]
    shown = invoke(server, "admin", "host", "show", "edge-1")
    assert shown.exit_code == 0 and "fake" in shown.output and "UP" in shown.output


@pytest.mark.slow
@pytest.mark.dependency(depends=["test_enroll_installs_starts_and_registers_the_host"])
def test_reenrolling_is_idempotent(server, host):
    root = install_dir(server, "edge-1")
    venv_python = (root / "venv/bin/python").stat()
    before = admin(server).ListHosts(admin_pb2.ListHostsRequest()).hosts
    h = enroll(server, "edge-1", host.target, host.host_key, ssh_private_key=host.client_key.read_bytes(),
               hostd_port=7443)
    assert h.state == admin_pb2.HOST_STATE_UP and h.address == f"{host.address}:7443"
    after = admin(server).ListHosts(admin_pb2.ListHostsRequest()).hosts
    assert [x.id for x in after] == [x.id for x in before] == ["edge-1"]
    # The same wheels were installed already: pip did not run again (the venv is the very same one) ...
    assert (root / "venv/bin/python").stat().st_ino == venv_python.st_ino
    # ... and one hostd runs, restarted with the new certificate.
    assert len(hostd_processes(host.netns)) == 1


@pytest.mark.slow
@pytest.mark.dependency(depends=["test_enroll_installs_starts_and_registers_the_host"])
def test_the_supervisor_restarts_a_hostd_that_dies(server, host):
    [old] = [p for p in namespace_pids(host.netns) if p in hostd_pids(host.netns)]
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with tls.sync_channel(f"{host.address}:7443", server.server_files, tls.host_peer("edge-1")) as ch:
                host_pb2_grpc.HostAgentStub(ch).GetCapacity(host_pb2.GetCapacityRequest(), timeout=5)
            break
        except grpc.RpcError:
            assert time.monotonic() < deadline, (install_dir(server, "edge-1") / "hostd.log").read_text()[-2000:]
            time.sleep(0.3)
    assert old not in hostd_pids(host.netns) and len(hostd_pids(host.netns)) == 1


@pytest.mark.slow
@pytest.mark.dependency(depends=["test_enroll_installs_starts_and_registers_the_host"])
def test_a_name_registered_at_another_address_is_refused_and_nothing_changes(server, host):
    before = admin(server).GetHost(admin_pb2.GetHostRequest(name="hosts/edge-1"))
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "edge-1", host.target, host.host_key, ssh_private_key=host.client_key.read_bytes(),
               hostd_port=7444)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "registered at" in e.value.details() and "id" in field_violations(e.value)
    assert admin(server).GetHost(admin_pb2.GetHostRequest(name="hosts/edge-1")) == before
    assert len(hostd_processes(host.netns)) == 1


@pytest.mark.slow
def test_a_hostd_that_never_answers_is_rolled_back(impatient_server, host):
    """Everything installs, but hostd cannot listen (sshd holds its port): after the wait nothing is
    registered, the supervisor and hostd are gone, the install directory is removed, the certificate revoked."""
    server = impatient_server
    hid = f"dud-{uuid.uuid4().hex[:4]}"
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, hid, host.target, host.host_key, ssh_private_key=host.client_key.read_bytes(),
               hostd_port=host.port)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.value.details()
    assert "did not answer" in e.value.details()
    assert_not_registered(server, hid)
    assert not [c for c in hostd_processes(host.netns) if f"/{hid}/" in c]
    certs = admin(server).ListCertificates(admin_pb2.ListCertificatesRequest(page_size=1000)).certificates
    mine = [c for c in certs if c.identity == f"spiffe://reddwarf/host/{hid}"]
    assert mine and all(c.revoked for c in mine)


# -- bad input: each refused with its cause, nothing registered, nothing left on the host -------------------
def test_a_host_key_that_does_not_match_is_refused_before_anything_is_sent(server, host, tmp_path):
    other = keygen(tmp_path / "other_host_key")
    logins = host.log().count("Accepted publickey")
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "mismatch", host.target, other, ssh_private_key=host.client_key.read_bytes())
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "does not match" in e.value.details() and host.host_key in e.value.details()
    assert "host_key" in field_violations(e.value)
    assert_not_registered(server, "mismatch")
    # The handshake ended at the host key: we never even tried to authenticate.
    assert host.log().count("Accepted publickey") == logins


def test_the_fingerprint_of_any_of_the_hosts_keys_is_accepted(server, tmp_path):
    """paramiko negotiates one host key per handshake (ed25519 first); given the fingerprint of the host's RSA
    key, the server asks for that kind: the host key check passes and the login is what fails here."""
    keygen(tmp_path / "stranger")
    with ssh_host(tmp_path, rsa_host_key=True) as h:
        with pytest.raises(grpc.RpcError) as e:
            enroll(server, "rsahost", h.target, h.rsa_host_key, ssh_private_key=(tmp_path / "stranger").read_bytes())
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
        assert "refused the key" in e.value.details()
    assert_not_registered(server, "rsahost")


def test_a_key_the_host_does_not_accept_is_refused(server, host, tmp_path):
    keygen(tmp_path / "stranger")
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "wrongkey", host.target, host.host_key, ssh_private_key=(tmp_path / "stranger").read_bytes())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "refused the key" in e.value.details() and "ssh_private_key" in field_violations(e.value)
    assert_not_registered(server, "wrongkey")


def test_a_wrong_key_passphrase_is_refused(server, host, tmp_path):
    keygen(tmp_path / "locked", passphrase="right horse")
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "wrongpass", host.target, host.host_key, ssh_private_key=(tmp_path / "locked").read_bytes(),
               ssh_password="wrong horse")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "passphrase" in e.value.details() and "ssh_password" in field_violations(e.value)
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "wrongpass", host.target, host.host_key, ssh_private_key=(tmp_path / "locked").read_bytes())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "encrypted" in e.value.details()
    assert_not_registered(server, "wrongpass")


def test_a_wrong_password_is_refused(server, tmp_path):
    with ssh_host(tmp_path, password_auth=True) as h:
        with pytest.raises(grpc.RpcError) as e:
            enroll(server, "wrongpw", h.target, h.host_key, ssh_password=f"not-it-{uuid.uuid4().hex}")
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "refused the password" in e.value.details() and "ssh_password" in field_violations(e.value)
    assert_not_registered(server, "wrongpw")


def test_an_unreachable_host_is_reported_as_such(server, host):
    # The host's address, a port nothing listens on: the namespace answers with a reset.
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "nobody", f"root@{host.address}:{host.port + 1}", host.host_key,
               ssh_private_key=host.client_key.read_bytes())
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in e.value.details() and "refused" in e.value.details().lower()
    assert "ssh_target" in field_violations(e.value)
    # An address on the host's bridge that nobody has: no answer at all, within the connect timeout.
    with pytest.raises(grpc.RpcError) as e:
        enroll(server, "nobody", f"root@{host.silent}:22", host.host_key, ssh_private_key=host.client_key.read_bytes())
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "unreachable" in e.value.details()
    assert_not_registered(server, "nobody")


def test_a_host_without_python_is_refused(server, tmp_path):
    with ssh_host(tmp_path, path="/nonexistent") as h:
        with pytest.raises(grpc.RpcError) as e:
            enroll(server, "nopython", h.target, h.host_key, ssh_private_key=h.client_key.read_bytes())
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "no python3" in e.value.details() and "ssh_target" in field_violations(e.value)
    assert_not_registered(server, "nopython")


@pytest.mark.parametrize(("field", "kw"), [
    ("id", {"id": "Bad_Name"}),
    ("ssh_target", {"ssh_target": "10.0.0.1"}),
    ("ssh_target", {"ssh_target": "root@host;rm -rf /"}),
    ("host_key", {"host_key": "MD5:aa:bb"}),
    ("ssh_private_key", {"ssh_private_key": b""}),
    ("ssh_private_key", {"ssh_private_key": b"not a key"}),
    ("ssh_key_path", {"ssh_private_key": b"", "ssh_key_path": "relative/key"}),
    ("hostd_port", {"hostd_port": 70000}),
])
def test_malformed_requests_name_the_field(server, field, kw):
    req = {"id": "malformed", "ssh_target": "root@192.0.2.1", "host_key": "SHA256:" + "A" * 43,
           "ssh_private_key": b"x", **kw}
    with pytest.raises(grpc.RpcError) as e:
        admin(server).EnrollHost(admin_pb2.EnrollHostRequest(**req), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert field in field_violations(e.value)
    assert_not_registered(server, "malformed")


def test_the_cli_takes_no_ssh_password_on_the_command_line(server, host):
    r = invoke(server, "admin", "host", "enroll", "x", "--ssh", f"root@{host.address}", "--host-key", host.host_key,
               "--ssh-password", "hunter2")
    text = " ".join(r.output.replace("│", " ").split())
    assert r.exit_code != 0 and "not taken on the command line" in text


def test_hostd_csr_keeps_the_key_on_the_host(tmp_path):
    """`reddwarf-hostd csr` makes the key once (0600) and signs a CSR with it; a second call reuses it."""
    key = tmp_path / "tls" / "hostd.key"
    argv = [sys.executable, "-m", "reddwarf.hostd.main", "csr", "--key-path", str(key), "--host-id", "h1"]
    first = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    k1 = key.read_bytes()
    second = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    assert key.read_bytes() == k1 and key.stat().st_mode & 0o777 == 0o600
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    pub = serialization.load_pem_private_key(k1, None).public_key().public_bytes(*der)
    for pem in (first, second):
        assert x509.load_pem_x509_csr(pem.encode()).public_key().public_bytes(*der) == pub



class RecordingRemote:
    """Stands in for the SSH session where the real thing cannot exist here: these machines do not run
    systemd as PID 1, so the unit branch of the start step is checked against the commands it sends."""

    def __init__(self, systemd: bool) -> None:
        self.systemd = systemd
        self.commands: list[list[str]] = []
        self.files: dict[str, bytes] = {}

    def run(self, argv, timeout=0):
        self.commands.append(argv)
        return (0 if self.systemd or argv[:2] != ["test", "-d"] else 1), "", ""

    def check(self, argv, what, timeout=0):
        self.commands.append(argv)
        return ""

    def write(self, path, data, mode=0o644):
        self.files[path] = data


@pytest.mark.parametrize("systemd", [True, False])
def test_hostd_starts_under_systemd_where_the_host_has_it_and_supervised_otherwise(systemd):
    from reddwarf.server.host_enrollment import HostEnroller, Layout, Request, Target
    r = Request("edge-9", Target("root", "10.0.0.9", 22), "SHA256:" + "A" * 43, 7443, b"", "", "")
    layout = Layout("/opt/reddwarf dir")
    remote = RecordingRemote(systemd)
    HostEnroller._start(object.__new__(HostEnroller), remote, r, layout)
    if systemd:
        unit = remote.files["/etc/systemd/system/reddwarf-hostd-edge-9.service"].decode()
        assert "ExecStart='/opt/reddwarf dir/venv/bin/reddwarf-hostd' serve --config '/opt/reddwarf dir/hostd.json'" \
            in unit
        assert "Restart=always" in unit and "KillMode=process" in unit and "WantedBy=multi-user.target" in unit
        assert remote.commands[1:] == [["systemctl", "daemon-reload"],
                                       ["systemctl", "enable", "reddwarf-hostd-edge-9.service"],
                                       ["systemctl", "restart", "reddwarf-hostd-edge-9.service"]]
    else:
        assert not remote.files
        assert remote.commands[1] == [layout.hostd, "supervise", "--config", layout.config, "--pid-file", layout.pid,
                                      "--log-file", layout.log]

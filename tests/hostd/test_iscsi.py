"""iSCSI target side against a REAL tgtd on 127.0.0.1 (free portal port, own control port), discovery checked
with libiscsi's iscsi-ls. The kernel initiator (iscsi_tcp) does not exist on this host, so the login test
checks the iscsiadm commands through a recording runner and the real login is skipped."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
from reddwarf.common.runner import Result
from reddwarf.hostd.iscsi import (
    Chap,
    Initiator,
    Locator,
    TargetHost,
    discover_with_iscsi_ls,
    kernel_has_iscsi_tcp,
)
from tests.fixtures.mariadb import free_port

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd needs root"),
    pytest.mark.skipif(shutil.which("tgtd") is None or shutil.which("iscsi-ls") is None,
                       reason="tgt / libiscsi-bin not installed"),
]
INITIATOR = "iqn.2024-01.reddwarf.test:init"


@pytest.fixture(scope="module")
def tgt(tmp_path_factory):
    """A tgtd of our own: its portal on a free loopback port, its management socket on an unused control
    port; stopped and its socket files removed afterwards."""
    portal_port = free_port()
    control = None
    for _ in range(50):
        c = random.randint(20000, 29999)
        if not os.path.exists(f"/var/run/tgtd/socket.{c}"):
            control = c
            break
    assert control is not None
    log = tmp_path_factory.mktemp("tgtd") / "tgtd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["tgtd", "-f", "-C", str(control), "--iscsi", f"portal=127.0.0.1:{portal_port}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        host = TargetHost(f"127.0.0.1:{portal_port}", control)
        while True:
            try:
                host.targets()
                break
            except Exception:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("tgtd did not start: " + log.read_text()) from None
                time.sleep(0.2)
        yield host
    finally:
        # tgtd ignores SIGTERM; it leaves on a management "delete system" (SIGKILL as the last resort)
        subprocess.run(["tgtadm", "-C", str(control), "--op", "delete", "--mode", "system"],
                       capture_output=True, timeout=30)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for suffix in ("", ".lock"):
            path = f"/var/run/tgtd/socket.{control}{suffix}"
            if os.path.exists(path):
                os.unlink(path)


@pytest.fixture
def backing(tmp_path) -> Path:
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    return path


def iqn() -> str:
    return f"iqn.2024-01.reddwarf.test:{uuid.uuid4().hex[:12]}"


def test_exported_volume_is_discoverable_with_its_lun(tgt, backing):
    name = iqn()
    loc = tgt.export(name, str(backing))
    try:
        assert loc == Locator(tgt.portal, name, 1)
        assert Locator.parse(str(loc)) == loc
        found = {d.iqn: d for d in discover_with_iscsi_ls(tgt.portal, INITIATOR)}
        assert name in found and found[name].luns == (1,)
        target = tgt.find(name)
        assert target is not None and target.luns[0].backing_path == str(backing)
        assert target.luns[0].size_bytes == 67_000_000 and target.acl == ("ALL",)
    finally:
        tgt.unexport(name)


def test_export_is_idempotent_and_refuses_another_backing_file(tgt, backing, tmp_path):
    name = iqn()
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    try:
        first = tgt.export(name, str(backing))
        assert tgt.export(name, str(backing)) == first
        assert [t.iqn for t in tgt.targets()].count(name) == 1
        with pytest.raises(FailedPrecondition):
            tgt.export(name, str(other))
    finally:
        tgt.unexport(name)


def test_unexport_removes_the_target_but_keeps_the_data(tgt, backing, tmp_path):
    name, keep = iqn(), iqn()
    # iscsi-ls fails on a portal without any target, so a second one stays exported while we look
    (tmp_path / "keep.img").write_bytes(b"\0" * 1024 * 1024)
    tgt.export(keep, str(tmp_path / "keep.img"))
    try:
        tgt.export(name, str(backing))
        assert tgt.unexport(name) is True
        assert tgt.find(name) is None
        assert keep in {d.iqn for d in discover_with_iscsi_ls(tgt.portal, INITIATOR)}
        assert name not in {d.iqn for d in discover_with_iscsi_ls(tgt.portal, INITIATOR)}
    finally:
        tgt.unexport(keep)
    assert backing.stat().st_size == 64 * 1024 * 1024
    assert tgt.unexport(name) is False


def test_bad_iqn_locator_and_missing_backing_file_are_refused(tgt, tmp_path):
    with pytest.raises(InvalidArgument) as exc:
        tgt.export("not an iqn; rm -rf /", str(tmp_path))
    assert exc.value.violations[0][0] == "iqn"
    with pytest.raises(FailedPrecondition):
        tgt.export(iqn(), str(tmp_path / "absent.img"))
    for bad in ("iscsi://127.0.0.1/iqn.2024-01.x:y/1", "file:///x", "iscsi://127.0.0.1:3260/bad/1"):
        with pytest.raises(InvalidArgument):
            Locator.parse(bad)


def test_initiator_commands_for_login_and_logout():
    calls: list[list[str]] = []

    def rec(argv, **_kw):
        calls.append(list(argv))
        return Result(tuple(argv), 15 if "--login" in argv else 21 if "--logout" in argv else 0, "", "", 0.0)

    loc = Locator("10.0.0.5:3260", "iqn.2024-01.reddwarf:vol1", 1)
    ini = Initiator(rec)
    assert ini.login(loc) == "/dev/disk/by-path/ip-10.0.0.5:3260-iscsi-iqn.2024-01.reddwarf:vol1-lun-1"
    ini.logout(loc)  # 15 (session exists) and 21 (no session) count as done: login/logout are idempotent
    assert calls == [
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", "10.0.0.5:3260"],
        ["iscsiadm", "-m", "node", "-T", "iqn.2024-01.reddwarf:vol1", "-p", "10.0.0.5:3260", "--login"],
        ["iscsiadm", "-m", "node", "-T", "iqn.2024-01.reddwarf:vol1", "-p", "10.0.0.5:3260", "--logout"],
    ]


def test_kernel_initiator_logs_in_as_this_host_with_chap_kept_out_of_the_runner(monkeypatch):
    calls: list[list[str]] = []
    direct: list[list[str]] = []

    def rec(argv, **_kw):
        calls.append(list(argv))
        return Result(tuple(argv), 0, "", "", 0.0)

    def direct_run(argv, **_kw):
        direct.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, b"", b"")

    monkeypatch.setattr("reddwarf.hostd.iscsi.subprocess.run", direct_run)
    loc = Locator("10.0.0.5:3260", "iqn.2024-01.reddwarf:vol.v1", 1)
    ini = Initiator(rec)
    me = "iqn.2024-01.reddwarf:host.h-a"
    iface = Initiator.iface_for(me)
    ini.login(loc, me, Chap("rd-v1", "s3cret-s3cret-x"))
    ini.logout(loc, me)
    node = ["iscsiadm", "-m", "node", "-T", loc.iqn, "-p", loc.portal, "-I", iface]
    assert calls == [
        ["iscsiadm", "-m", "iface", "-I", iface, "--op", "new"],
        ["iscsiadm", "-m", "iface", "-I", iface, "--op", "update", "-n", "iface.initiatorname", "-v", me],
        ["iscsiadm", "-m", "discovery", "-t", "sendtargets", "-p", loc.portal, "-I", iface],
        [*node, "--op", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP"],
        [*node, "--op", "update", "-n", "node.session.auth.username", "-v", "rd-v1"],
        [*node, "--login"],
        [*node, "--logout"],
        [*node, "--op", "delete"],  # the node record holds the secret: it goes with the session
    ]
    # The secret went to iscsiadm directly, never through the runner (whose log and errors carry argv).
    assert direct == [[*node, "--op", "update", "-n", "node.session.auth.password", "-v", "s3cret-s3cret-x"]]
    assert "s3cret" not in repr(Chap("rd-v1", "s3cret-s3cret-x"))


@pytest.mark.parametrize("code,error,field", [(24, PermissionDenied, "chap"), (19, PermissionDenied, "locator"),
                                               (8, Unavailable, "locator"), (5, FailedPrecondition, "locator")])
def test_kernel_login_failures_say_what_refused_it(code, error, field):
    def rec(argv, **_kw):
        return Result(tuple(argv), code if "--login" in argv else 0, "", "iscsiadm: login failed", 0.0)

    with pytest.raises(error) as exc:
        Initiator(rec).login(Locator("10.0.0.5:3260", "iqn.2024-01.reddwarf:vol.v1", 1))
    assert exc.value.violations[0][0] == field and "10.0.0.5:3260" in exc.value.message


@pytest.mark.skipif(not kernel_has_iscsi_tcp(),
                    reason="the kernel initiator cannot run here: this kernel has no iscsi_tcp module (the SAN "
                           "tests use the user-space initiator, qemu-storage-daemon, instead; the open-iscsi "
                           "commands are checked by the recording-runner tests above)")
def test_initiator_logs_in_and_sees_the_lun_as_a_block_device(tgt, backing):
    name = iqn()
    loc = tgt.export(name, str(backing))
    ini = Initiator()
    try:
        dev = ini.login(loc)
        deadline = time.monotonic() + 10
        while not os.path.exists(dev) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert os.path.exists(dev)
    finally:
        ini.logout(loc)
        tgt.unexport(name)

"""SAN volumes over iSCSI between separate hosts: a SAN node (hostd in storage mode, its own REAL tgtd) and two
compute hosts (hostd with the iscsi volume driver), each in its own network namespace on a bridge this module
makes; the test, as the control server, reaches each hostd over mTLS at its namespace's address, and the hosts
reach the SAN node only at its portal there. The initiator is the REAL user-space one (qemu-storage-daemon
with libiscsi, its LUN a FUSE file behind a loop device): this kernel has no iscsi_tcp, so the open-iscsi path
is covered by its command test in test_iscsi.py and its live test is skipped there with that reason.

Compute hosts run the fake container driver: these tests are about volumes, not containers."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reddwarf.common.errors import PermissionDenied
from reddwarf.hostd import qsd
from reddwarf.hostd.iscsi import Chap, Locator, TargetHost
from reddwarf.v1 import host_pb2, host_pb2_grpc
from tests.fixtures.errors import field_violations as fields
from tests.fixtures.hostd import RunningHostd, start_hostd
from tests.fixtures.netns import HostNetwork, host_network
from tests.fixtures.server import stop_process
from tests.fixtures.waiting import until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
GIB = 1024**3


@pytest.fixture(scope="module")
def net() -> Iterator[HostNetwork]:
    with host_network(["san", "a", "b"]) as n:
        yield n


class Fleet:
    """The three hostds, their stubs, and how to restart one."""

    def __init__(self, net: HostNetwork, root: Path, pki, control_port: int) -> None:
        self.net, self.root, self.pki, self.control_port = net, root, pki, control_port
        self.procs: dict[str, RunningHostd] = {}
        self.stacks: dict[str, object] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.retired: dict[str, list[object]] = {}

    def args(self, name: str) -> tuple[str, ...]:
        if name == "san":
            return ("--mode", "storage", "--iscsi-portal", f"{self.net['san'].address}:3260",
                    "--iscsi-control-port", str(self.control_port), "--container-driver", "fake")
        return ("--container-driver", "fake", "--volume-driver", "iscsi", "--iscsi-initiator", "userspace")

    def start(self, name: str) -> None:
        cm = start_hostd(self.root / name, self.pki.files("host", f"h-{name}"), host_id=f"h-{name}",
                         crl_path=self.pki.ca.dir / "crl.pem", extra_args=self.args(name),
                         listen_host=self.net[name].address, wrap=tuple(self.net[name].argv([])))
        self.procs[name] = cm.__enter__()
        self.stacks[name] = cm
        self.channels[name] = self.procs[name].channel(self.pki.files("server", "control"))

    def stop(self, name: str) -> None:
        self.channels.pop(name).close()
        self.stacks.pop(name).__exit__(None, None, None)  # type: ignore[attr-defined]
        for old in self.retired.pop(name, []):
            old.__exit__(None, None, None)  # type: ignore[attr-defined]

    def restart(self, name: str) -> None:
        """Only the hostd process stops (SIGTERM), as in an upgrade: start_hostd's teardown, which also
        clears mounts and loop devices after a crash, runs when the module is done."""
        self.channels.pop(name).close()
        stop_process(self.procs[name].proc)
        self.retired.setdefault(name, []).append(self.stacks.pop(name))
        log = self.root / name / "hostd.log"  # start_hostd appends and waits for "ready": a fresh log
        log.rename(log.with_suffix(f".{uuid.uuid4().hex[:6]}.log"))
        self.start(name)

    def stub(self, name: str) -> host_pb2_grpc.HostAgentStub:
        return host_pb2_grpc.HostAgentStub(self.channels[name])

    def iqn(self, name: str) -> str:
        return self.stub(name).GetCapacity(host_pb2.GetCapacityRequest(), timeout=30).initiator_iqn


@pytest.fixture(scope="module")
def fleet(net, pki, tmp_path_factory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("san")
    f = Fleet(net, root, pki, 20000 + secrets.randbelow(10000))
    try:
        for name in ("san", "a", "b"):
            f.start(name)
        yield f
    finally:
        for name in ("a", "b"):
            if name in f.stacks:
                _logout_all(f.root / name)
                f.stop(name)
        if "san" in f.stacks:
            f.stop("san")
        # Decommission: every target removed, tgtd stopped (a plain hostd stop keeps it running).
        subprocess.run([sys.executable, "-m", "reddwarf.hostd.main", "stop-target", "--host-id", "h-san",
                        "--state-dir", str(root / "san" / "state"), "--iscsi-control-port", str(f.control_port),
                        "--iscsi-portal", f"{net['san'].address}:3260"], check=False, timeout=60)


def _logout_all(root: Path) -> None:
    """Whatever a failed test left of a compute host's sessions."""
    run_dir = root / "state" / "iscsi"
    if run_dir.is_dir():
        ini = qsd.UserspaceInitiator(str(run_dir))
        for vid in os.listdir(run_dir):
            subprocess.run(["umount", "-l", str(root / "state" / "mnt" / vid)], capture_output=True)
            out = subprocess.run(["losetup", "-j", ini.device_path(vid), "-O", "NAME", "-n"],
                                 capture_output=True, text=True).stdout.split()
            for dev in out:
                subprocess.run(["losetup", "-d", dev], capture_output=True)
            ini.logout(vid)


def chap(user: str, secret: str | None = None) -> host_pb2.ChapCredentials:
    return host_pb2.ChapCredentials(user=user, secret=secret or secrets.token_urlsafe(12))


def mount_of(fleet: Fleet, name: str, vid: str) -> Path:
    return fleet.root / name / "state" / "mnt" / vid


def qsd_pids(fleet: Fleet, name: str) -> list[int]:
    run_dir = fleet.root / name / "state" / "iscsi"
    ini = qsd.UserspaceInitiator(str(run_dir))
    return [ini.pid(v) for v in ini.sessions()] if run_dir.is_dir() else []


def san_target(fleet: Fleet, vid: str):
    t = TargetHost(f"{fleet.net['san'].address}:3260", fleet.control_port)
    return t.find(f"iqn.2024-01.reddwarf:vol.{vid}")


VID = f"v{uuid.uuid4().hex[:8]}"
SECRET = chap("rd-" + VID)


def test_hosts_report_their_mode_initiator_and_portal(fleet, net):
    san = fleet.stub("san").GetCapacity(host_pb2.GetCapacityRequest(), timeout=30)
    assert (san.mode, san.volume_driver, san.container_driver) == ("storage", "iscsi", "none")
    assert san.iscsi_portal == f"{net['san'].address}:3260" and not san.initiator_iqn
    a, b = fleet.iqn("a"), fleet.iqn("b")
    assert a == "iqn.2024-01.reddwarf:host.h-a" and b == "iqn.2024-01.reddwarf:host.h-b"


def test_a_volume_written_on_one_host_is_read_on_another(fleet):
    san = fleet.stub("san")
    vol = san.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=VID, size_gb=1)), timeout=120)
    assert vol.locator == f"iscsi://{fleet.net['san'].address}:3260/iqn.2024-01.reddwarf:vol.{VID}/1"
    target = san_target(fleet, VID)
    assert target is not None and target.acl == ()  # made closed: nobody admitted yet
    san.ExportVolume(host_pb2.ExportVolumeRequest(id=VID, initiator_iqn=fleet.iqn("a"), chap=SECRET), timeout=60)
    on_a = fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(id=VID, locator=vol.locator, chap=SECRET),
                                       timeout=120)
    assert on_a.device.startswith("/dev/loop") and on_a.size_gb == 1 and on_a.driver == "iscsi"
    (mount_of(fleet, "a", VID) / "probe").write_text("written on a")
    os.sync()
    # The secret is nowhere on host A's disk: qemu read it from a file that is gone.
    assert not list((fleet.root / "a" / "state" / "iscsi" / VID).glob("*secret*"))
    assert SECRET.secret not in (fleet.root / "a" / "state" / "state.json").read_text()
    # The move: A lets go (logs out), the SAN admits B only, B logs in.
    fleet.stub("a").DeleteVolume(host_pb2.DeleteVolumeRequest(id=VID, keep_data=True), timeout=60)
    assert qsd_pids(fleet, "a") == [] and not mount_of(fleet, "a", VID).exists()
    san.ExportVolume(host_pb2.ExportVolumeRequest(id=VID, initiator_iqn=fleet.iqn("b"), chap=SECRET), timeout=60)
    on_b = fleet.stub("b").AdoptVolume(host_pb2.AdoptVolumeRequest(id=VID, locator=vol.locator, chap=SECRET),
                                       timeout=120)
    assert on_b.device.startswith("/dev/loop")
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"
    target = san_target(fleet, VID)
    assert target.acl == (fleet.iqn("b"),) and [s.initiator for s in target.sessions] == [fleet.iqn("b")]
    # Reconciliation sees every session and LUN as tracked.
    for name in ("b", "san"):
        listed = fleet.stub(name).ListVolumes(host_pb2.ListVolumesRequest(), timeout=30)
        assert [v.id for v in listed.volumes] == [VID] and list(listed.unmanaged) == []


def test_the_former_host_is_refused_after_the_move(fleet):
    loc = fleet.stub("san").GetVolume(host_pb2.VolumeRef(id=VID), timeout=30).locator
    # A re-attach (only_if_tracked) of a volume A no longer tracks is NOT_FOUND before any login.
    with pytest.raises(grpc.RpcError) as e:
        fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(id=VID, locator=loc, chap=SECRET,
                                                                only_if_tracked=True), timeout=60)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and fields(e.value) == ["id"]
    with pytest.raises(grpc.RpcError) as e:
        fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(id=VID, locator=loc, chap=SECRET), timeout=120)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED, e.value.details()
    assert "iqn.2024-01.reddwarf:host.h-a" in e.value.details()
    # Nothing kept on A: no record, no session, no mount.
    vols = fleet.stub("a").ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes
    assert [v.id for v in vols] == [] and qsd_pids(fleet, "a") == []
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"  # B undisturbed


def test_a_wrong_chap_secret_is_refused_and_changes_nothing(fleet):
    vid = f"w{uuid.uuid4().hex[:8]}"
    san = fleet.stub("san")
    vol = san.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)), timeout=120)
    good = chap("rd-" + vid)
    san.ExportVolume(host_pb2.ExportVolumeRequest(id=vid, initiator_iqn=fleet.iqn("a"), chap=good), timeout=60)
    try:
        with pytest.raises(grpc.RpcError) as e:
            fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(
                id=vid, locator=vol.locator, chap=chap(good.user, "not-the-secret-at-all")), timeout=120)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert fields(e.value) == ["chap"] and "not-the-secret" not in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(id=vid, locator=vol.locator), timeout=60)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(e.value) == ["chap"]
        assert fleet.stub("a").ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes == []
        assert qsd_pids(fleet, "a") == []
    finally:
        san.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid), timeout=60)


def test_bad_export_requests_are_refused(fleet):
    san = fleet.stub("san")
    for req, field in [
        (host_pb2.ExportVolumeRequest(id=VID, initiator_iqn="not an iqn", chap=chap("u")), "initiator_iqn"),
        (host_pb2.ExportVolumeRequest(id=VID, initiator_iqn=fleet.iqn("a")), "chap"),
        (host_pb2.ExportVolumeRequest(id=VID, initiator_iqn=fleet.iqn("a"), chap=chap("u", "short")), "chap"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            san.ExportVolume(req, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(e.value) == [field]
    assert san_target(fleet, VID).acl == (fleet.iqn("b"),)  # unchanged
    with pytest.raises(grpc.RpcError) as e:  # a compute host exports nothing
        fleet.stub("a").ExportVolume(host_pb2.ExportVolumeRequest(id=VID), timeout=30)
    assert e.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


def test_grow_reaches_the_filesystem_on_the_compute_host(fleet):
    fleet.stub("san").ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=VID, size_gb=2), timeout=120)
    assert os.path.getsize(fleet.root / "san" / "volumes" / f"{VID}.lun") == 2 * GIB
    vol = fleet.stub("b").ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=VID, size_gb=2), timeout=300)
    assert vol.size_gb == 2 and vol.fs_bytes_total > 1.5 * GIB  # online, or offline where the kernel refuses
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"


def test_a_restarted_compute_hostd_keeps_its_session(fleet):
    before = qsd_pids(fleet, "b")
    assert len(before) == 1
    fleet.restart("b")
    vol = fleet.stub("b").GetVolume(host_pb2.VolumeRef(id=VID), timeout=30)
    assert vol.device.startswith("/dev/loop") and vol.fs_bytes_total > 0
    assert qsd_pids(fleet, "b") == before
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"


def test_a_san_node_whose_tgtd_died_exports_its_luns_again_at_hostd_start(fleet):
    pid = int((fleet.root / "san" / "state" / "tgtd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    until(lambda: os.path.exists(f"/proc/{pid}/stat") and "(tgtd) Z" not in open(f"/proc/{pid}/stat").read(),
          lambda alive: not alive, timeout=10, what="tgtd gone", interval=0.1)
    fleet.restart("san")
    t = san_target(fleet, VID)
    assert t is not None and t.acl == (fleet.iqn("b"),) and t.accounts == (SECRET.user,)
    # B's session, cut with the old tgtd, comes back by itself.
    until(lambda: san_target(fleet, VID).sessions, lambda s: [x.initiator for x in s] == [fleet.iqn("b")],
          timeout=60, what="B's session back", interval=0.5)
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"


def test_san_node_down_during_attach_is_unavailable_and_changes_nothing(fleet, net):
    san = fleet.stub("san")
    vid = f"d{uuid.uuid4().hex[:8]}"
    vol = san.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)), timeout=120)
    secret = chap("rd-" + vid)
    san.ExportVolume(host_pb2.ExportVolumeRequest(id=vid, initiator_iqn=fleet.iqn("a"), chap=secret), timeout=60)
    net.isolate("san")
    try:
        with pytest.raises(grpc.RpcError) as e:
            fleet.stub("a").AdoptVolume(host_pb2.AdoptVolumeRequest(id=vid, locator=vol.locator, chap=secret),
                                        timeout=120)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert f"{net['san'].address}:3260" in e.value.details()
        assert fleet.stub("a").ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes == []
        assert qsd_pids(fleet, "a") == []
    finally:
        net.reconnect("san")
    san.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid), timeout=60)


def test_fencing_cuts_the_session_and_refuses_every_initiator(fleet, tmp_path):
    san = fleet.stub("san")
    loc = san.GetVolume(host_pb2.VolumeRef(id=VID), timeout=30).locator
    assert [s.initiator for s in san_target(fleet, VID).sessions] == [fleet.iqn("b")]
    fenced = san.ExportVolume(host_pb2.ExportVolumeRequest(id=VID), timeout=60)  # nobody admitted
    assert fenced.initiator_iqn == ""
    t = san_target(fleet, VID)
    assert t.acl == () and t.sessions == () and t.accounts == ()  # B's live session cut, its account gone
    # A half-alive B that logs in again (its qsd restarted) is refused, with the right secret.
    probe = qsd.UserspaceInitiator(str(tmp_path / "probe"))
    with pytest.raises(PermissionDenied):
        probe.login("probe", Locator.parse(loc), fleet.iqn("b"), Chap(SECRET.user, SECRET.secret))
    assert probe.sessions() == []
    # Admitted again, B's running session reconnects by itself and reads its data.
    san.ExportVolume(host_pb2.ExportVolumeRequest(id=VID, initiator_iqn=fleet.iqn("b"), chap=SECRET), timeout=60)
    until(lambda: san_target(fleet, VID).sessions, lambda s: [x.initiator for x in s] == [fleet.iqn("b")],
          timeout=60, what="B's session back", interval=0.5)
    assert (mount_of(fleet, "b", VID) / "probe").read_text() == "written on a"


def test_delete_leaves_nothing_behind(fleet):
    b_root = fleet.root / "b"
    fleet.stub("b").DeleteVolume(host_pb2.DeleteVolumeRequest(id=VID, keep_data=True), timeout=60)
    fleet.stub("san").DeleteVolume(host_pb2.DeleteVolumeRequest(id=VID), timeout=60)
    assert san_target(fleet, VID) is None
    t = TargetHost(f"{fleet.net['san'].address}:3260", fleet.control_port)
    assert t.targets() == []  # no target, no CHAP account left on the SAN node
    assert not (fleet.root / "san" / "volumes" / f"{VID}.lun").exists()
    assert qsd_pids(fleet, "b") == [] and not (b_root / "state" / "iscsi" / VID).exists()
    with open("/proc/mounts") as f:
        assert [line for line in f if str(fleet.root) in line] == []  # no FUSE export, no volume mount
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(fleet.root) not in loops

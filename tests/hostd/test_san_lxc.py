"""A REAL LXC container whose datadir is an iSCSI LUN: the SAN node (storage-mode hostd, its own tgtd) and the
compute host (hostd with LXC and the iscsi volume driver, user-space initiator) each in their own network
namespace on a bridge this module makes. The container (unprivileged, host networking in the compute host's
namespace) writes through its bind-mounted datadir; the volume grows while it is in use; delete leaves
nothing."""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import grpc
import pytest

from reddwarf.hostd import idmap, qsd
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc
from tests.fixtures.hostd import RunningHostd, start_hostd
from tests.fixtures.netns import HostNetwork, host_network

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="LXC, tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
SLEEPER = "/bin/sleep 3600"  # PID 1 stand-in: the volume is under test, not the guest agent
GIB = 1024**3


@pytest.fixture(scope="module")
def hosts(pki, tmp_path_factory) -> Iterator[tuple[HostNetwork, RunningHostd, RunningHostd, int]]:
    root = tmp_path_factory.mktemp("sanlxc")
    control = 20000 + secrets.randbelow(10000)
    with host_network(["san", "a"]) as net:
        portal = f"{net['san'].address}:3260"
        try:
            with start_hostd(root / "san", pki.files("host", "h-lsan"), host_id="h-lsan",
                             crl_path=pki.ca.dir / "crl.pem", listen_host=net["san"].address,
                             wrap=tuple(net["san"].argv([])),
                             extra_args=("--mode", "storage", "--iscsi-portal", portal,
                                         "--iscsi-control-port", str(control))) as san, \
                    start_hostd(root / "a", pki.files("host", "h-la"), host_id="h-la",
                                crl_path=pki.ca.dir / "crl.pem", listen_host=net["a"].address,
                                wrap=tuple(net["a"].argv([])), agent_init_cmd=SLEEPER,
                                extra_args=("--volume-driver", "iscsi", "--iscsi-initiator", "userspace")) as a:
                yield net, san, a, control
        finally:
            run_dir = root / "a" / "state" / "iscsi"
            if run_dir.is_dir():
                ini = qsd.UserspaceInitiator(str(run_dir))
                for vid in os.listdir(run_dir):
                    ini.logout(vid)
            subprocess.run([sys.executable, "-m", "reddwarf.hostd.main", "stop-target", "--host-id", "h-lsan",
                            "--state-dir", str(root / "san" / "state"), "--iscsi-control-port", str(control),
                            "--iscsi-portal", portal], check=False, timeout=60)


def sh(stub: host_pb2_grpc.HostAgentStub, cid: str, script: str) -> host_pb2.ExecResponse:
    return stub.Exec(host_pb2.ExecRequest(id=cid, argv=["/bin/sh", "-c", script], timeout_seconds=60), timeout=90)


def test_an_lxc_container_runs_on_a_lun_and_it_grows_in_use(hosts, pki):
    net, san_h, a_h, _ = hosts
    server = pki.files("server", "control")
    with san_h.channel(server) as sc, a_h.channel(server) as ac:
        san, a = host_pb2_grpc.HostAgentStub(sc), host_pb2_grpc.HostAgentStub(ac)
        cid = f"c{uuid.uuid4().hex[:8]}"
        chap = host_pb2.ChapCredentials(user=f"rd-{cid}", secret=secrets.token_urlsafe(18))
        vol = san.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=cid, size_gb=1)),
                               timeout=120)
        iqn = a.GetCapacity(host_pb2.GetCapacityRequest(), timeout=30).initiator_iqn
        san.ExportVolume(host_pb2.ExportVolumeRequest(id=cid, initiator_iqn=iqn, chap=chap), timeout=60)
        a.AdoptVolume(host_pb2.AdoptVolumeRequest(id=cid, locator=vol.locator, chap=chap), timeout=120)
        spec = host_pb2.Container(
            id=cid, volume_id=cid, network_mode=host_pb2.NETWORK_MODE_HOST,
            limits=common_pb2.Limits(memory_mb=128, cpu_shares=512, max_processes=64, io_weight=200),
            bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem=pki.ca.cert_pem.decode(),
                                              enrollment_token="tok-" + cid, instance_id=cid))
        a.CreateContainer(host_pb2.CreateContainerRequest(container=spec), timeout=600)
        c = a.StartContainer(host_pb2.ContainerRef(id=cid), timeout=300)
        assert c.state == host_pb2.CONTAINER_STATE_RUNNING
        r = sh(a, cid, "echo on-the-lun > /var/lib/mysql/marker && sync && stat -c %u /var/lib/mysql/marker")
        assert r.exit_code == 0, r.stderr
        assert r.stdout.strip() == b"0"  # root inside ...
        host_file = a_h.root / "state" / "mnt" / cid / "marker"
        # ... and outside, the base of the container's own id range (hostd/idmap.py): nobody on the host.
        assert host_file.read_text() == "on-the-lun\n" and idmap.is_isolated(host_file.stat().st_uid)
        # Grown while the container runs (offline around a restart where this kernel refuses online grow).
        san.ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=cid, size_gb=2), timeout=120)
        grown = a.ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=cid, size_gb=2), timeout=600)
        assert grown.fs_bytes_total > 1.5 * GIB
        df = sh(a, cid, "df -k /var/lib/mysql | tail -1").stdout.split()
        assert int(df[1]) * 1024 > 1.5 * GIB
        assert sh(a, cid, "cat /var/lib/mysql/marker").stdout.strip() == b"on-the-lun"
        # A volume in use cannot be let go.
        with pytest.raises(grpc.RpcError) as e:
            a.DeleteVolume(host_pb2.DeleteVolumeRequest(id=cid, keep_data=True), timeout=60)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        a.DeleteContainer(host_pb2.ContainerRef(id=cid), timeout=300)
        a.DeleteVolume(host_pb2.DeleteVolumeRequest(id=cid, keep_data=True), timeout=60)
        san.DeleteVolume(host_pb2.DeleteVolumeRequest(id=cid), timeout=60)
        assert san.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes == []
    assert not list(a_h.lxc_path.glob(f"{a_h.prefix}*"))
    assert str(a_h.root) not in open("/proc/mounts").read()
    assert str(a_h.root) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert qsd.UserspaceInitiator(str(a_h.root / "state" / "iscsi")).sessions() == []

"""An instance whose data volume is a SAN LUN, through the server's public API: the real server, a SAN node
(hostd in storage mode with its own REAL tgtd) and a compute host (hostd with the iscsi volume driver and the
REAL user-space initiator, qemu-storage-daemon), each host in its own network namespace on a bridge this
module makes. The server listens for agents on the bridge's address; the compute host's guest agents (the fake
container driver runs them as plain processes in its namespace, with the fake datastore writing to the
iSCSI-backed datadir) reach it only there.

Proves: the scheduler never places a container on the SAN node, the volume is made there and admitted to the
compute host's initiator only, instance show names the host and the volume driver (gRPC and Trove JSON), and
delete leaves no LUN, session, FUSE export, mount or loop device."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest
from starlette.requests import Request
from typer.testing import CliRunner

from reddwarf.client import cli, trove
from reddwarf.hostd import qsd
from reddwarf.hostd.iscsi import TargetHost
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.cluster import host_files
from tests.fixtures.hostd import RunningHostd, start_hostd
from tests.fixtures.mariadb import free_port
from tests.fixtures.netns import HostNetwork, host_network
from tests.fixtures.server import RunningServer, start_server, stop_process
from tests.fixtures.waiting import until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE


class San:
    def __init__(self, net: HostNetwork, server: RunningServer, san: RunningHostd, compute: RunningHostd,
                 control_port: int, md: tuple[tuple[str, str], ...]) -> None:
        self.net, self.server, self.san, self.compute = net, server, san, compute
        self.control_port, self.md = control_port, md
        self.channel = server.channel()

    @property
    def instances(self) -> database_pb2_grpc.InstancesStub:
        return database_pb2_grpc.InstancesStub(self.channel)

    def target(self) -> TargetHost:
        return TargetHost(f"{self.net['san'].address}:3260", self.control_port)


@pytest.fixture(scope="module")
def san(tmp_path_factory) -> Iterator[San]:
    root = tmp_path_factory.mktemp("saninst")
    control_port = 20000 + free_port() % 10000
    with host_network(["san", "a"]) as net:
        # No capacity refresh during the module: a stopped SAN node stays UP in the scheduler's eyes, so the
        # create reaches it (a node already seen DOWN is refused at scheduling instead).
        env = {"REDDWARF_CAPACITY_REFRESH_SECONDS": "3600", "REDDWARF_SAN_REATTACH_SECONDS": "1",
               "REDDWARF_AGENT_LISTEN": f"{net.gateway}:{free_port()}",
               "REDDWARF_ENROLL_LISTEN": f"{net.gateway}:{free_port()}"}
        with start_server(root, extra_env=env) as server:
            try:
                with start_hostd(root / "san", host_files(server.ca, root / "san-tls", "h-san"), host_id="h-san",
                                 listen_host=net["san"].address, wrap=tuple(net["san"].argv([])),
                                 extra_args=("--mode", "storage", "--iscsi-portal", f"{net['san'].address}:3260",
                                             "--iscsi-control-port", str(control_port))) as sanh, \
                        start_hostd(root / "a", host_files(server.ca, root / "a-tls", "h-a"), host_id="h-a",
                                    listen_host=net["a"].address, wrap=tuple(net["a"].argv([])), driver="fake",
                                    volume_driver="iscsi", extra_args=("--iscsi-initiator", "userspace")) as a:
                    admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
                    for h in (sanh, a):
                        admin.RegisterHost(admin_pb2.RegisterHostRequest(
                            host=admin_pb2.Host(id=h.host_id, address=h.address)))
                    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id="sanco")))
                    token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant="tenants/sanco")).secret
                    yield San(net, server, sanh, a, control_port, (("authorization", f"Bearer {token}"),))
            finally:
                run_dir = root / "a" / "state" / "iscsi"  # sessions a failed test left
                if run_dir.is_dir():
                    ini = qsd.UserspaceInitiator(str(run_dir))
                    for vid in os.listdir(run_dir):
                        ini.logout(vid)
                subprocess.run([sys.executable, "-m", "reddwarf.hostd.main", "stop-target", "--host-id", "h-san",
                                "--state-dir", str(root / "san" / "state"), "--iscsi-control-port",
                                str(control_port), "--iscsi-portal", f"{net['san'].address}:3260"],
                               check=False, timeout=60)


def get(s: San, name: str) -> database_pb2.Instance:
    return s.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=s.md)


def test_an_instance_on_an_iscsi_host_keeps_its_data_on_the_san_node(san):
    inst = san.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="lun-db", flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
        metadata=san.md)
    inst = until(lambda: get(san, inst.name),
                 lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR) and not i.task,
                 timeout=120, what="ACTIVE", interval=0.2)
    assert inst.status == ACTIVE, inst.fault.message
    # Placed on the compute host, never on the SAN node; the volume named by its driver.
    assert inst.host == "hosts/h-a" and inst.volume.driver == "iscsi"
    target = san.target().find(f"iqn.2024-01.reddwarf:vol.{inst.id}")
    assert target is not None and target.acl == ("iqn.2024-01.reddwarf:host.h-a",)
    assert [s.initiator for s in target.sessions] == ["iqn.2024-01.reddwarf:host.h-a"]
    assert (san.san.root / "volumes" / f"{inst.id}.lun").exists()
    # The guest's datadir is the LUN: the fake datastore's files are on the iSCSI-backed mount.
    mnt = san.compute.root / "state" / "mnt" / inst.id
    assert os.path.ismount(mnt) and any(mnt.iterdir())
    # Trove JSON names them too.
    request = Request({"type": "http", "scheme": "http", "server": ("gw", 80), "path": "/", "headers": [],
                       "path_params": {"tenant": "sanco"}})
    body = trove.instance(inst, request)
    assert body["host"] == "h-a" and body["volume"]["type"] == "iscsi"
    # And the CLI's instance show.
    f = san.server.client_files
    env = {"REDDWARF_ENDPOINT": san.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": san.md[0][1].split(" ", 1)[1],
           "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "instance", "show", "lun-db"], env=env)
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["host"] == "hosts/h-a" and shown["volume"]["driver"] == "iscsi"
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["instance", "show", "lun-db"], env=env, terminal_width=200)
    rows = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in r.output.splitlines()
            if line.count("│") >= 3}
    assert rows.get("host") == "h-a" and rows.get("volume driver") == "iscsi", r.output


    # The compute host loses its session (as in a reboot: the initiator and its mounts gone, hostd's record
    # kept, no CHAP secret on the host): the server attaches the volume again with the volume's account.
    run_dir = san.compute.root / "state" / "iscsi"
    ini = qsd.UserspaceInitiator(str(run_dir))
    pid, fuse_file = ini.pid(inst.id), ini.device_path(inst.id)
    loop_dev = subprocess.run(["losetup", "-j", fuse_file, "-O", "NAME", "-n"], capture_output=True,
                              text=True).stdout.split()
    os.kill(pid, signal.SIGKILL)
    for argv in (["umount", "-l", str(mnt)], *(["losetup", "-d", d] for d in loop_dev),
                 ["umount", "-l", fuse_file]):
        subprocess.run(argv, capture_output=True, timeout=30)
    compute = host_pb2_grpc.HostAgentStub(san.compute.channel(san.server.server_files))
    assert compute.GetVolume(host_pb2.VolumeRef(id=inst.id), timeout=30).device == ""
    vol = until(lambda: compute.GetVolume(host_pb2.VolumeRef(id=inst.id), timeout=30), lambda v: v.device,
                timeout=60, what="the volume attached again", interval=0.5)
    assert vol.device.startswith("/dev/loop") and ini.pid(inst.id) not in (0, pid)
    assert os.path.ismount(mnt) and any(mnt.iterdir())  # the same data, back

    san.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=san.md)
    # hostd unexports the LUN, then unlinks its file: the wait is for both (the target list alone is empty
    # a moment before the file is gone).
    lun = san.san.root / "volumes" / f"{inst.id}.lun"
    until(lambda: (san.target().targets(), lun.exists()), lambda t: t == ([], False), timeout=120,
          what="the LUN and its file gone", interval=0.2)
    assert not run_dir.exists() or qsd.UserspaceInitiator(str(run_dir)).sessions() == []
    with open("/proc/mounts") as f:
        assert [line for line in f if str(san.compute.root) in line and "lun.raw" in line] == []
    assert str(san.compute.root / "state" / "iscsi") not in subprocess.run(
        ["losetup", "-a"], capture_output=True, text=True).stdout


def test_a_san_node_down_during_create_is_unavailable_naming_it_and_leaves_nothing(san):
    """Last in the module: the SAN node's hostd is stopped for good."""
    stop_process(san.san.proc)
    inst = san.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="no-san", flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
        metadata=san.md)
    inst = until(lambda: get(san, inst.name),
                 lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR) and not i.task,
                 timeout=120, what="ERROR", interval=0.5)
    assert inst.status == database_pb2.INSTANCE_STATUS_ERROR
    assert "SAN node h-san is unavailable" in inst.fault.message, inst.fault.message
    # Nothing on the compute host: no volume, no session, no container.
    compute = host_pb2_grpc.HostAgentStub(san.compute.channel(san.server.server_files))
    assert compute.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes == []
    assert compute.ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers == []
    run_dir = san.compute.root / "state" / "iscsi"
    assert not run_dir.exists() or qsd.UserspaceInitiator(str(run_dir)).sessions() == []

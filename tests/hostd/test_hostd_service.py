"""hostd as the control server sees it: the real process over mTLS, real LXC containers from the
template, cgroup v1 limits, loop volumes."""
from __future__ import annotations

import os
import subprocess
import time
import uuid

import grpc
import pytest

from reddwarf.hostd.cgroups import disk_of
from reddwarf.hostd.settings import Settings
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc
from tests.fixtures.errors import field_violations as fields
from tests.fixtures.hostd import start_hostd
from tests.fixtures.waiting import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="hostd needs root (LXC, loop devices, mounts)")
SLEEPER = "/bin/sleep 3600"  # PID 1 stand-in: these tests exercise the host, not the guest agent


@pytest.fixture(scope="module")
def hostd(tmp_path_factory, pki):
    root = tmp_path_factory.mktemp("hostd")
    with start_hostd(root, pki.files("host", "h-test"), host_id="h-test", agent_init_cmd=SLEEPER,
                     crl_path=pki.ca.dir / "crl.pem") as h:
        yield h


@pytest.fixture(scope="module")
def stub(hostd, pki):
    with hostd.channel(pki.files("server", "control")) as ch:
        yield host_pb2_grpc.HostAgentStub(ch)


def bootstrap(pki, iid: str) -> host_pb2.AgentBootstrap:
    return host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem=pki.ca.cert_pem.decode(),
                                   enrollment_token="tok-" + iid, instance_id=iid, heartbeat_seconds=5)


def limits(memory_mb=128, procs=64) -> common_pb2.Limits:
    return common_pb2.Limits(memory_mb=memory_mb, cpu_shares=512, max_processes=procs, io_weight=200)


def sh(stub, cid: str, script: str, timeout: int = 60) -> host_pb2.ExecResponse:
    return stub.Exec(host_pb2.ExecRequest(id=cid, argv=["/bin/sh", "-c", script], timeout_seconds=timeout))


@pytest.mark.parametrize("role", ["instance", "host", "admin", "client"])
def test_only_the_control_server_may_call(hostd, pki, role):
    with hostd.channel(pki.files(role, "x")) as ch, pytest.raises(grpc.RpcError) as e:
        host_pb2_grpc.HostAgentStub(ch).GetCapacity(host_pb2.GetCapacityRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_certificate_from_another_ca_cannot_connect(hostd, pki):
    with hostd.channel(pki.foreign_files("server", "control")) as ch, pytest.raises(grpc.RpcError) as e:
        host_pb2_grpc.HostAgentStub(ch).GetCapacity(host_pb2.GetCapacityRequest(), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_capacity_reports_this_host(stub, hostd):
    cap = stub.GetCapacity(host_pb2.GetCapacityRequest())
    assert cap.host_id == hostd.host_id
    assert cap.memory_mb_total > 1024 and cap.cpus >= 1 and cap.storage_gb_free > 0
    assert cap.container_driver == "lxc" and cap.volume_driver == "loop"


def test_unknown_container_is_reported_unmanaged_and_never_destroyed(stub, hostd):
    # a container with hostd's prefix that hostd was never asked for (e.g. left by a crashed create)
    name = f"{hostd.prefix}stray{uuid.uuid4().hex[:6]}"
    tpl_path = Settings().template_lxc_path  # the fixture's hostd uses the default template lxcpath
    tpl = next(p for p in sorted(os.listdir(tpl_path)) if p.startswith("rdtpl-"))
    subprocess.run(["lxc-copy", "-P", tpl_path, "-n", tpl, "-p", str(hostd.lxc_path),
                    "-N", name, "-s", "-B", "overlayfs"], check=True, capture_output=True, timeout=60)
    try:
        listed = stub.ListContainers(host_pb2.ListContainersRequest())
        assert name[len(hostd.prefix):] in listed.unmanaged
        assert name[len(hostd.prefix):] not in [c.id for c in listed.containers]
        assert (hostd.lxc_path / name / "config").exists()
    finally:
        subprocess.run(["lxc-destroy", "-P", str(hostd.lxc_path), "-n", name, "-f"], capture_output=True,
                       timeout=60)


@pytest.mark.parametrize("container,field", [
    (dict(id="Bad_ID"), "container.id"),
    (dict(id="ok", limits=common_pb2.Limits(memory_mb=1, cpu_shares=512, max_processes=64)),
     "container.limits.memory_mb"),
    (dict(id="ok", limits=common_pb2.Limits(memory_mb=128, cpu_shares=512, max_processes=1)),
     "container.limits.max_processes"),
    (dict(id="ok", datadir="../../etc"), "container.datadir"),
    (dict(id="ok", volume_id="nope"), "container.volume_id"),
])
def test_bad_container_requests_are_refused_naming_the_field(stub, pki, container, field):
    c = host_pb2.Container(limits=limits(), bootstrap=bootstrap(pki, "i1"))
    c.MergeFrom(host_pb2.Container(**container))
    if "limits" in container:
        c.limits.CopyFrom(container["limits"])
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateContainer(host_pb2.CreateContainerRequest(container=c))
    assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert field in fields(e.value)
    assert not stub.ListContainers(host_pb2.ListContainersRequest()).containers


def test_volume_bigger_than_the_storage_is_refused(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id="huge", size_gb=16000)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fields(e.value) == ["volume.size_gb"]
    assert not stub.ListVolumes(host_pb2.ListVolumesRequest()).volumes


@pytest.mark.slow
def test_container_lifecycle_limits_and_volume(stub, pki, hostd):
    cid = f"c{uuid.uuid4().hex[:8]}"
    vid = f"v{cid}"
    vol = stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)))
    assert vol.state == host_pb2.VOLUME_STATE_AVAILABLE and vol.fs_bytes_total > 0
    assert os.stat(vol.locator).st_mode & 0o777 == 0o600  # a tenant's data is nobody else's to read
    # idempotent by id; other parameters conflict
    assert stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1))).id == vid
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=2)))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS

    spec = host_pb2.Container(id=cid, limits=limits(memory_mb=64, procs=40), bootstrap=bootstrap(pki, cid),
                              volume_id=vid, network_mode=host_pb2.NETWORK_MODE_HOST)
    c = stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec))
    assert c.state == host_pb2.CONTAINER_STATE_STOPPED and c.port > 0 and c.address == "127.0.0.1"
    assert stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec)).port == c.port
    other = host_pb2.Container()
    other.CopyFrom(spec)
    other.limits.memory_mb = 96
    with pytest.raises(grpc.RpcError) as e:
        stub.CreateContainer(host_pb2.CreateContainerRequest(container=other))
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # FirstBoot: the bootstrap is in the container, 0600
    c = stub.StartContainer(host_pb2.ContainerRef(id=cid))
    assert c.state == host_pb2.CONTAINER_STATE_RUNNING and c.init_pid > 0
    r = sh(stub, cid, "stat -c %a /etc/reddwarf/agent.json; grep -c tok- /etc/reddwarf/agent.json; "
                      "ls /opt/reddwarf/lib/reddwarf")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.decode().split()
    assert lines[0] == "600" and lines[1] == "1" and "common" in lines

    # the volume is the datadir
    assert sh(stub, cid, "echo kept > /var/lib/mysql/marker && sync").exit_code == 0
    # memory beancounter: a process past the limit makes failcnt rise
    before = {b.resource: b for b in stub.GetUsage(host_pb2.ContainerRef(id=cid)).beancounters}["memory"]
    assert before.limit == 64 * 1024 * 1024
    sh(stub, cid, "/opt/reddwarf/venv/bin/python -c 'b=[bytearray(1<<20) for _ in range(256)]'")
    after = {b.resource: b for b in stub.GetUsage(host_pb2.ContainerRef(id=cid)).beancounters}["memory"]
    assert after.failcnt > before.failcnt
    # numproc: forking past max_processes fails inside, the host is fine
    r = sh(stub, cid, "for i in $(seq 60); do sleep 5 & done; wait", timeout=30)
    procs = {b.resource: b for b in stub.GetUsage(host_pb2.ContainerRef(id=cid)).beancounters}["numproc"]
    assert procs.failcnt > 0 or r.exit_code != 0 or b"fork" in r.stderr.lower()
    assert open(f"/sys/fs/cgroup/pids/lxc.payload.{hostd.prefix}{cid}/pids.max").read().strip() == "40"
    assert procs.limit == 40
    # live resize of limits: the cgroup changes without a restart
    pid = c.init_pid
    stub.SetLimits(host_pb2.SetLimitsRequest(id=cid, limits=limits(memory_mb=96, procs=40)))
    cg = f"/sys/fs/cgroup/memory/lxc.payload.{hostd.prefix}{cid}/memory.limit_in_bytes"
    assert int(open(cg).read()) == 96 * 1024 * 1024
    assert stub.GetContainer(host_pb2.ContainerRef(id=cid)).init_pid == pid

    # delete + recreate on the same volume keeps the data
    stub.DeleteContainer(host_pb2.ContainerRef(id=cid))
    assert not os.path.exists(f"{hostd.lxc_path}/{hostd.prefix}{cid}")
    assert not os.path.exists(f"/sys/fs/cgroup/memory/lxc.payload.{hostd.prefix}{cid}")
    spec2 = host_pb2.Container()
    spec2.CopyFrom(spec)
    spec2.bootstrap.enrollment_token = "tok-second"
    stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec2))
    stub.StartContainer(host_pb2.ContainerRef(id=cid))
    assert sh(stub, cid, "cat /var/lib/mysql/marker").stdout.strip() == b"kept"
    # online grow
    total = stub.GetVolume(host_pb2.VolumeRef(id=vid)).fs_bytes_total
    grown = stub.ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=vid, size_gb=2))
    assert grown.fs_bytes_total > total * 1.5
    df = sh(stub, cid, "df -k /var/lib/mysql | tail -1").stdout.split()
    assert int(df[1]) * 1024 > total * 1.5
    with pytest.raises(grpc.RpcError) as e:
        stub.ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=vid, size_gb=1))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # a volume in use cannot be deleted
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    stub.DeleteContainer(host_pb2.ContainerRef(id=cid))
    stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    # nothing left: no container, no volume file, no loop device, no mount
    assert not list(hostd.lxc_path.glob(f"{hostd.prefix}*"))
    assert not list(hostd.storage_path.glob("*.img"))
    assert str(hostd.root) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert str(hostd.root) not in open("/proc/mounts").read()


@pytest.mark.slow
def test_volume_moves_to_another_hostd_with_its_data(tmp_path, pki, stub, hostd):
    vid = f"m{uuid.uuid4().hex[:8]}"
    stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)))
    mnt = hostd.root / "state" / "mnt" / vid
    (mnt / "table.ibd").write_text("rows")
    locator = stub.GetVolume(host_pb2.VolumeRef(id=vid)).locator
    stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid, keep_data=True))  # detach from host A
    assert os.path.exists(locator)
    try:
        with start_hostd(tmp_path / "b", pki.files("host", "h-b"), host_id="h-b", storage_path=hostd.storage_path,
                         agent_init_cmd=SLEEPER, crl_path=pki.ca.dir / "crl.pem") as b, b.channel(pki.files("server", "control")) as ch:
            sb = host_pb2_grpc.HostAgentStub(ch)
            assert locator in sb.ListVolumes(host_pb2.ListVolumesRequest()).unmanaged  # reported, not destroyed
            v = sb.AdoptVolume(host_pb2.AdoptVolumeRequest(id=vid, locator=locator))
            assert v.fs_bytes_total > 0
            assert (tmp_path / "b" / "state" / "mnt" / vid / "table.ibd").read_text() == "rows"
            sb.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))
        assert not os.path.exists(locator)
    finally:
        if os.path.exists(locator):
            os.unlink(locator)


@pytest.mark.slow
def test_a_container_that_dies_is_started_again_but_a_stopped_one_stays_stopped(stub, pki, hostd):
    cid = f"r{uuid.uuid4().hex[:8]}"
    vid = f"v{cid}"
    stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=vid, size_gb=1)))
    capped = limits()
    capped.io_iops, capped.io_bytes_per_sec = 2000, 64 << 20
    spec = host_pb2.Container(id=cid, limits=capped, bootstrap=bootstrap(pki, cid), volume_id=vid,
                              network_mode=host_pb2.NETWORK_MODE_HOST)
    try:
        stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec))
        # a create cut off before FirstBoot (hostd killed inside it) is redone by the retry, not kept half-made
        cdir = hostd.lxc_path / f"{hostd.prefix}{cid}"
        (cdir / "reddwarf-created").unlink()
        for f in cdir.glob("*/*/etc/reddwarf/agent.json"):
            f.unlink()
        stub.CreateContainer(host_pb2.CreateContainerRequest(container=spec))
        assert (cdir / "reddwarf-created").exists() and list(cdir.glob("*/*/etc/reddwarf/agent.json"))
        time.sleep(3)  # created, never started: the restart policy leaves it alone
        assert stub.GetContainer(host_pb2.ContainerRef(id=cid)).state == host_pb2.CONTAINER_STATE_STOPPED
        first = stub.StartContainer(host_pb2.ContainerRef(id=cid))
        # IO caps hold on the volume's loop device and on the disk under the root filesystem
        with open(f"/sys/fs/cgroup/blkio/lxc.payload.{hostd.prefix}{cid}/blkio.throttle.write_bps_device") as f:
            rules = f.read().split("\n")
        root_disk = disk_of(str(hostd.lxc_path))
        assert f"{root_disk} {64 << 20}" in rules, rules
        assert len([r for r in rules if r.endswith(f" {64 << 20}")]) == 2, rules
        assert sh(stub, cid, "echo kept > /var/lib/mysql/marker && sync").exit_code == 0
        os.kill(first.init_pid, 9)  # PID 1 (the agent, here a stand-in) dies: the container stops
        again = until(lambda: stub.GetContainer(host_pb2.ContainerRef(id=cid)),
                      lambda c: c.state == host_pb2.CONTAINER_STATE_RUNNING and c.init_pid not in (0, first.init_pid),
                      timeout=30, what="container started again")
        assert sh(stub, cid, "cat /var/lib/mysql/marker").stdout.strip() == b"kept"  # with its volume
        stub.StopContainer(host_pb2.StopContainerRequest(id=cid, timeout_seconds=0))
        time.sleep(5)  # more than two revive periods
        assert stub.GetContainer(host_pb2.ContainerRef(id=cid)).state == host_pb2.CONTAINER_STATE_STOPPED
        assert again.init_pid > 0
    finally:
        stub.DeleteContainer(host_pb2.ContainerRef(id=cid))
        stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))

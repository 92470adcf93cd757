"""Reading another volume: root in one tenant's container tries every way we know into a neighbour's data
volume (block and loop devices, mknod, mount, /proc/<pid>/root, nsenter, /sys, hostd's state paths, the
data file by any path, open_by_handle_at) and each is refused.

Both containers are real unprivileged LXC containers on a hostd of the test's own with loop volumes, each
in an id range of its own (hostd/idmap.py), so even a path to the victim's files would meet files of
another uid. The test proves the first wall: no path, device or namespace of the victim is reachable
from the attacker at all. The attack script is tests/security/volume_attacks.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from reddwarf.v1 import common_pb2, host_pb2
from tests.hostd.test_isolation import SLEEPER, bridged_hostd, run_in

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]
ATTACKS = os.path.join(os.path.dirname(__file__), "volume_attacks.py")


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory: Any, pki: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """An attacker's and a victim's container on one host, each with its own data volume."""
    with bridged_hostd(tmp_path_factory.mktemp("nvol"), pki) as (h, stub, _bridge, _cidr):
        ids = [f"nv-att-{uuid.uuid4().hex[:6]}", f"nv-vic-{uuid.uuid4().hex[:6]}"]
        made, vols = [], []
        try:
            for cid in ids:
                stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=cid, size_gb=1)))
                vols.append(cid)
                made.append(cid)
                stub.CreateContainer(host_pb2.CreateContainerRequest(container=host_pb2.Container(
                    id=cid, network_mode=host_pb2.NETWORK_MODE_BRIDGE, volume_id=cid,
                    limits=common_pb2.Limits(memory_mb=256, cpu_shares=512, max_processes=256),
                    bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:9", ca_pem=pki.ca.cert_pem.decode(),
                                                      enrollment_token="tok", instance_id=cid,
                                                      heartbeat_seconds=5))))
                stub.StartContainer(host_pb2.ContainerRef(id=cid))
            attacker, victim = (stub.GetContainer(host_pb2.ContainerRef(id=c)) for c in ids)
            yield h, stub, attacker, victim
        finally:
            for cid in made:
                stub.DeleteContainer(host_pb2.ContainerRef(id=cid))
            for vid in vols:
                stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=vid))


def _loop_of(image: str) -> str:
    out = subprocess.run(["losetup", "-j", image, "-O", "NAME", "-n"], capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0]


def _dev(path: str, block_device: bool = False) -> str:
    st = os.stat(path)
    dev = st.st_rdev if block_device else st.st_dev
    return f"{os.major(dev)}:{os.minor(dev)}"


def test_root_in_a_container_cannot_read_a_neighbours_volume_by_any_path(two_tenants: Any) -> None:
    h, stub, attacker, victim = two_tenants
    assert SLEEPER  # the containers' PID 1 is a sleeper: the attack is on the container, not the agent
    tag = uuid.uuid4().hex
    marker, own_marker, secret = f"neighbour-secret-{tag}", f"own-secret-{tag}", f"SECRET-{tag}"
    r = run_in(stub, victim.id, f"echo {secret} > /var/lib/mysql/{marker}")
    assert r.exit_code == 0, r.stderr
    r = run_in(stub, attacker.id, f"echo mine > /var/lib/mysql/{own_marker}")
    assert r.exit_code == 0, r.stderr
    mnt = str(h.root / "state" / "mnt" / victim.volume_id)
    # The second wall: the victim's files belong to a uid outside the attacker's range.
    with open(f"/proc/{attacker.init_pid}/uid_map") as f:
        attacker_base = int(f.read().split()[1])
    owner = os.stat(os.path.join(mnt, marker)).st_uid
    assert not attacker_base <= owner < attacker_base + 65536, (attacker_base, owner)
    image = str(h.storage_path / f"{victim.volume_id}.img")
    # Teeth: from the host the victim's secret is right there, at each path the attacker will try.
    with open(os.path.join(mnt, marker)) as f:
        assert f.read().strip() == secret
    loop = _loop_of(image)
    victim_dir = str(h.lxc_path / (h.prefix + victim.id))
    look = {"marker": marker, "own_marker": own_marker, "secret": secret, "loop": loop,
            "loop_dev": _dev(loop, block_device=True), "root_dev": _dev("/"), "image": image, "mnt": mnt,
            "state": str(h.root / "state"), "victim_dir": victim_dir, "victim_pid": victim.init_pid,
            "volume_id": victim.volume_id}
    with open(ATTACKS) as f:
        script = f.read()
    res = stub.Exec(host_pb2.ExecRequest(id=attacker.id, argv=["python3", "-c", script, json.dumps(look)],
                                         timeout_seconds=120))
    assert res.exit_code == 0, res.stderr.decode()[-2000:]
    out = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert out.pop("own marker found") == "yes", "the attacker's search finds its own volume's file"
    got_through = {k: v for k, v in out.items() if not v.startswith("refused")}
    assert got_through == {}, json.dumps(out, indent=1)
    assert len(out) >= 20, out
    # And the victim's data is untouched.
    with open(os.path.join(mnt, marker)) as f:
        assert f.read().strip() == secret

"""A hostile guest gets nothing: real unprivileged LXC containers on hostd's bridge, attacked from inside
as their root. Root in a container is not root on the host (id map, no device nodes, no modules, a host
file stays the host's), the cgroup-v1 release_agent escape is closed, and a neighbour can neither reach
another tenant's mysqld port nor take it, nor reach the host beyond what hostd published for it."""
from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from reddwarf.hostd import idmap
from reddwarf.hostd.lxc import DROP_CAPS, apparmor_enabled
from reddwarf.hostd.network import veth_name
from reddwarf.hostd.template import IDMAP_BASE
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc
from tests.fixtures.hostd import RunningHostd, start_hostd
from tests.fixtures.mariadb import free_port
from tests.fixtures.waiting import until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, network namespaces, nftables")
QUOTA_MB = 64
SLEEPER = "/bin/sleep 3600"  # PID 1 stand-in: these tests attack the container, not the guest agent
CAP_BITS = {"sys_module": 16, "sys_rawio": 17, "sys_boot": 22, "sys_time": 25, "mknod": 27, "mac_override": 32,
            "mac_admin": 33, "syslog": 34, "net_raw": 13}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=60)


def free_subnet() -> str:
    used = sh("ip", "-o", "-4", "addr").stdout
    for _ in range(100):
        cidr = f"10.79.{random.randrange(256)}.0/24"
        if cidr.rsplit(".", 1)[0] + "." not in used:
            return cidr
    raise RuntimeError("no free 10.79.x.0/24 for the test bridge")


class HostService:
    """A TCP service on the host's loopback that answers every connection with its name."""

    def __init__(self, name: bytes) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.name = name
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(self.name)

    def close(self) -> None:
        self.sock.close()


@contextmanager
def bridged_hostd(root, pki) -> Iterator[tuple[RunningHostd, host_pb2_grpc.HostAgentStub, str, str]]:
    """A hostd with a bridge and subnet of its own (other tests and hostds on this machine keep theirs)."""
    bridge = f"rdi{uuid.uuid4().hex[:6]}"
    cidr = free_subnet()
    root.mkdir(parents=True, exist_ok=True)
    config = root / "hostd.json"
    config.write_text(json.dumps({"bridge": {"name": bridge, "cidr": cidr}, "rootfs_quota_mb": QUOTA_MB}))
    try:
        with start_hostd(root / "h", pki.files("host", "h-iso"), host_id="h-iso", agent_init_cmd=SLEEPER,
                         crl_path=pki.ca.dir / "crl.pem", extra_args=("--config", str(config))) as h, \
                h.channel(pki.files("server", "control")) as ch:
            yield h, host_pb2_grpc.HostAgentStub(ch), bridge, cidr
    finally:  # whatever a failed test left: never leave our bridge or filter behind
        sh("nft", "delete", "table", "inet", "rd_" + bridge, check=False)
        sh("ip", "link", "del", bridge, check=False)


@pytest.fixture(scope="module")
def bridged(tmp_path_factory, pki) -> Iterator[tuple[RunningHostd, host_pb2_grpc.HostAgentStub, str, str]]:
    with bridged_hostd(tmp_path_factory.mktemp("isolation"), pki) as b:
        yield b


@pytest.fixture(scope="module")
def services() -> Iterator[tuple[HostService, HostService]]:
    published, private = HostService(b"control-server"), HostService(b"private")
    yield published, private
    published.close()
    private.close()


@pytest.fixture(scope="module")
def tenants(bridged, services, pki):
    """Two tenants' containers on the bridge; A has a data volume."""
    h, stub, bridge, cidr = bridged
    published, _ = services
    ids = [f"iso-a-{uuid.uuid4().hex[:6]}", f"iso-b-{uuid.uuid4().hex[:6]}"]
    stub.CreateVolume(host_pb2.CreateVolumeRequest(volume=host_pb2.HostVolume(id=ids[0], size_gb=1)))
    made = []
    try:
        for cid in ids:
            made.append(stub.CreateContainer(host_pb2.CreateContainerRequest(container=host_pb2.Container(
                id=cid, network_mode=host_pb2.NETWORK_MODE_BRIDGE, volume_id=ids[0] if cid == ids[0] else "",
                limits=common_pb2.Limits(memory_mb=128, cpu_shares=512, max_processes=128),
                bootstrap=host_pb2.AgentBootstrap(
                    server_address=f"127.0.0.1:{published.port}", ca_pem=pki.ca.cert_pem.decode(),
                    enrollment_token="tok", instance_id=cid, heartbeat_seconds=5)))))
            stub.StartContainer(host_pb2.ContainerRef(id=cid))
        yield [stub.GetContainer(host_pb2.ContainerRef(id=c)) for c in ids]
    finally:
        for c in made:
            stub.DeleteContainer(host_pb2.ContainerRef(id=c.id))
        stub.DeleteVolume(host_pb2.DeleteVolumeRequest(id=ids[0]))


def run_in(stub, cid: str, script: str, timeout: int = 30) -> host_pb2.ExecResponse:
    return stub.Exec(host_pb2.ExecRequest(id=cid, argv=["/bin/sh", "-c", script], timeout_seconds=timeout))


def listen_in(stub, cid: str, address: str, port: int, banner: str) -> None:
    """A server in the container answering every connection with `banner`."""
    code = (f"import socket\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            f"s.bind(({address!r},{port}));s.listen(8)\nwhile True:\n c,_=s.accept();c.sendall(b{banner!r});"
            f"c.close()\n")
    blob = base64.b64encode(code.encode()).decode()
    r = run_in(stub, cid, f"echo {blob} | base64 -d > /tmp/srv-{port}.py && setsid -f python3 /tmp/srv-{port}.py "
                          ">/dev/null 2>&1 </dev/null; sleep 0.5")
    assert r.exit_code == 0, r.stderr


def connect_from(stub, cid: str, address: str, port: int) -> str:
    """What a client in the container gets from address:port ('' when it cannot connect)."""
    code = (f"import socket\ntry:\n print(socket.create_connection(({address!r},{port}),timeout=3).recv(64)"
            f".decode())\nexcept OSError as e:\n print('')")
    return run_in(stub, cid, f"python3 -c \"{code}\"").stdout.decode().strip()


def connect_from_host(address: str, port: int) -> str:
    try:
        with socket.create_connection((address, port), timeout=3) as s:
            return s.recv(64).decode()
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------- root is not root
def container_base(stub, cid: str) -> int:
    """The host id that is root in container `cid` (its uid_map's first line)."""
    return int(run_in(stub, cid, "cat /proc/self/uid_map").stdout.decode().split()[1])


def test_root_in_a_container_is_an_unprivileged_id_range_of_its_own_on_the_host(tenants, bridged):
    _, stub, _, _ = bridged
    bases = []
    for t in tenants:
        r = run_in(stub, t.id, "cat /proc/self/uid_map /proc/self/gid_map; id -u")
        base = int(r.stdout.decode().split()[1])
        assert r.stdout.decode().split() == ["0", str(base), "65536", "0", str(base), "65536", "0"]
        assert idmap.is_isolated(base)
        with open(f"/proc/{t.init_pid}/status") as f:
            uid_line = next(ln for ln in f if ln.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(base)] * 4  # its PID 1 is its range's first uid to the host
        bases.append(base)
    assert abs(bases[0] - bases[1]) >= 65536, "two tenants' ranges do not overlap"


def test_the_template_is_seen_through_an_id_mapped_read_only_mount(tenants, bridged):
    """No copy of the template per range: its files show as the container's root's through an id-mapped
    lower layer, which neither the container nor anyone else can write."""
    h, stub, _, _ = bridged
    a = tenants[0]
    lower = h.lxc_path / ".lower" / (h.prefix + a.id)
    with open("/proc/self/mountinfo") as f:
        line = next(ln for ln in f if ln.split()[4] == str(lower))
    assert "idmapped" in line.split()[5] and "ro" in line.split()[5].split(","), line
    assert os.stat(lower / "etc" / "passwd").st_uid == container_base(stub, a.id)
    r = run_in(stub, a.id, "stat -c %u /etc/passwd /usr/bin/python3")
    assert r.stdout.decode().split() == ["0", "0"]


def test_capabilities_are_dropped_and_seccomp_is_on(tenants, bridged):
    _, stub, _, _ = bridged
    status = run_in(stub, tenants[0].id, "cat /proc/1/status").stdout.decode()
    fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
    assert fields["Seccomp"].strip() == "2"  # a filter: LXC's default policy
    bounding = int(fields["CapBnd"].strip(), 16)
    for cap, bit in CAP_BITS.items():
        assert cap in DROP_CAPS
        assert not bounding & (1 << bit), f"{cap} is still in the bounding set"


def test_no_device_nodes_no_modules_no_clock(tenants, bridged):
    _, stub, _, _ = bridged
    cid = tenants[0].id
    r = run_in(stub, cid, "mknod /tmp/sda b 8 0")
    assert r.exit_code != 0 and b"Operation not permitted" in r.stderr
    # finit_module(2) and init_module(2): refused by the seccomp policy (EPERM) before any file is read
    r = run_in(stub, cid, "python3 -c \"import ctypes,os; l=ctypes.CDLL(None,use_errno=True); "
                          "print(l.syscall(313,-1,b'',0), ctypes.get_errno(), l.syscall(175,0,0,b''), "
                          "ctypes.get_errno())\"")
    assert r.stdout.decode().split() == ["-1", "1", "-1", "1"], r.stdout + r.stderr
    r = run_in(stub, cid, "date -s 2001-01-01")
    assert r.exit_code != 0
    r = run_in(stub, cid, "echo 1 > /proc/sys/kernel/sysrq")
    assert r.exit_code != 0


def test_a_host_owned_file_in_the_container_cannot_be_written(tenants, bridged):
    """The data volume is the container's (its mapped ids own it); a file the host's root puts there stays
    the host's: the container's root sees nobody's file and cannot write it."""
    h, stub, _, _ = bridged
    a = tenants[0]
    mnt = h.root / "state" / "mnt" / a.volume_id
    base = container_base(stub, a.id)
    assert os.stat(mnt).st_uid == base
    host_file = mnt / "host-owned"
    host_file.write_text("host\n")
    os.chown(host_file, 0, 0)
    os.chmod(host_file, 0o644)
    try:
        r = run_in(stub, a.id, "ls -ln /var/lib/mysql/host-owned; echo pwned >> /var/lib/mysql/host-owned")
        assert r.exit_code != 0 and b"Permission denied" in r.stderr, r.stdout + r.stderr
        assert r.stdout.decode().split()[2] == "65534"  # nobody: host uid 0 is not mapped
        assert host_file.read_text() == "host\n"
        r = run_in(stub, a.id, "touch /var/lib/mysql/mine && stat -c %u /var/lib/mysql/mine")
        assert r.exit_code == 0 and r.stdout.decode().strip() == "0"
        assert os.stat(mnt / "mine").st_uid == base
    finally:
        host_file.unlink()


def test_the_cgroup_v1_release_agent_escape_is_closed(tenants, bridged, tmp_path):
    """The classic escape (CVE-2022-0492 style): mount a cgroup v1 hierarchy, point release_agent at a
    script, let a cgroup empty. Every step that would reach the host is refused."""
    _, stub, _, _ = bridged
    marker = tmp_path / "escaped"
    script = f"""
try() {{ name=$1; shift; if ( "$@" ) >/dev/null 2>&1; then echo "$name: OK"; else echo "$name: refused"; fi; }}
printf '#!/bin/sh\\ntouch {marker}\\n' > /tmp/x; chmod +x /tmp/x
d=$(mktemp -d); e=$(mktemp -d)
try mount-named mount -t cgroup -o none,name=rdx cgroup $d
try mount-unused mount -t cgroup -o rdma cgroup $d
mount -t cgroup -o memory cgroup $d 2>/dev/null
try agent sh -c "echo /tmp/x > $d/release_agent"
try host-agent sh -c "echo /tmp/x > /sys/fs/cgroup/memory/release_agent"
try nested unshare -UrmC sh -c "mount -t cgroup -o memory cgroup $e && echo /tmp/x > $e/release_agent"
# its own sub-cgroup may ask for release notification: nothing runs, as no release_agent can be set
mkdir -p $d/rdx && echo 1 > $d/rdx/notify_on_release && echo $$ > $d/rdx/cgroup.procs
echo 0 > $d/cgroup.procs 2>/dev/null; rmdir $d/rdx 2>/dev/null
umount $d 2>/dev/null; rmdir $d $e
"""
    out = run_in(stub, tenants[0].id, script).stdout.decode()
    results = dict(ln.split(": ", 1) for ln in out.splitlines() if ": " in ln)
    assert results == {k: "refused" for k in ("mount-named", "mount-unused", "agent", "host-agent", "nested")}, out
    time.sleep(0.5)
    assert not marker.exists()


def test_the_writable_layer_has_a_quota(tenants, bridged):
    """A container filling its root filesystem fills its own layer's filesystem, not the host's disk."""
    h, stub, _, _ = bridged
    b = tenants[1]
    layer = h.lxc_path / (h.prefix + b.id) / "overlay"
    assert os.path.ismount(layer)
    r = run_in(stub, b.id, f"dd if=/dev/zero of=/var/tmp/fill bs=1M count={QUOTA_MB * 2} 2>&1; "
                          "du -m /var/tmp/fill; rm -f /var/tmp/fill")
    assert b"No space left on device" in r.stdout, r.stdout
    assert int(r.stdout.decode().splitlines()[-1].split()[0]) < QUOTA_MB
    assert run_in(stub, b.id, "echo still-writable > /var/tmp/ok && cat /var/tmp/ok").stdout == b"still-writable\n"


@pytest.mark.skipif(not apparmor_enabled(), reason="this kernel has no AppArmor (no /sys/module/apparmor, "
                    "CONFIG_SECURITY_APPARMOR off): containers run unconfined by AppArmor here")
def test_apparmor_confines_the_container(tenants, bridged):
    _, stub, _, _ = bridged
    r = run_in(stub, tenants[0].id, "cat /proc/1/attr/current")
    assert "unconfined" not in r.stdout.decode()


# ---------------------------------------------------------------------------------------- network
def test_each_tenant_has_its_own_network_namespace_and_address(tenants, bridged):
    _, _, bridge, cidr = bridged
    a, b = tenants
    assert a.network_mode == b.network_mode == host_pb2.NETWORK_MODE_BRIDGE
    prefix = cidr.rsplit(".", 1)[0] + "."
    assert a.address.startswith(prefix) and b.address.startswith(prefix) and a.address != b.address
    assert a.port == b.port == 3306
    host_ns = os.readlink("/proc/self/ns/net")
    assert len({host_ns, os.readlink(f"/proc/{a.init_pid}/ns/net"), os.readlink(f"/proc/{b.init_pid}/ns/net")}) == 3
    links = sh("bridge", "-d", "link", "show").stdout
    for c in (a, b):
        line = next(ln for ln in links.split("\n") if veth_name_for(bridged[0], c.id) + "@" in ln
                    or veth_name_for(bridged[0], c.id) + ":" in ln)
        assert f"master {bridge}" in line
    detail = sh("bridge", "-d", "link", "show", "dev", veth_name_for(bridged[0], a.id)).stdout
    assert "isolated on" in detail


def veth_name_for(h: RunningHostd, cid: str) -> str:
    return veth_name(h.prefix + cid)


def test_a_neighbour_cannot_reach_or_take_a_tenants_port(tenants, bridged):
    _, stub, _, _ = bridged
    a, b = tenants
    listen_in(stub, a.id, "0.0.0.0", 3306, "tenant-a")
    # the instance's endpoint as hostd reports it serves tenant A, from the host
    until(lambda: connect_from_host(a.address, a.port), lambda got: got == "tenant-a", timeout=10,
          what="tenant A's endpoint from the host")
    # B cannot reach it: directly on the bridge (ports isolated) ...
    assert connect_from(stub, b.id, a.address, a.port) == ""
    # ... nor routed through the host (a route via the gateway; the host forwards nothing from the bridge)
    r = run_in(stub, b.id, f"ip route add {a.address}/32 via {bridged[3].rsplit('.', 1)[0]}.1")
    assert r.exit_code == 0, r.stderr
    assert connect_from(stub, b.id, a.address, a.port) == ""
    run_in(stub, b.id, f"ip route del {a.address}/32")
    # B can bind 3306 in its own namespace: it is B's own port, A's endpoint still answers as A
    listen_in(stub, b.id, "0.0.0.0", 3306, "tenant-b")
    assert connect_from_host(b.address, b.port) == "tenant-b"
    assert connect_from_host(a.address, a.port) == "tenant-a"
    # and A's address is not B's to bind
    r = run_in(stub, b.id, f"python3 -c \"import socket; socket.socket().bind(('{a.address}', 3307))\"")
    assert r.exit_code != 0 and b"Cannot assign requested address" in r.stderr


def test_a_container_reaches_only_what_hostd_published_on_the_host(tenants, bridged, services):
    h, stub, _, cidr = bridged
    published, private = services
    gateway = cidr.rsplit(".", 1)[0] + ".1"
    a = tenants[0]
    cfg = run_in(stub, a.id, "cat /etc/reddwarf/agent.json")
    assert json.loads(cfg.stdout)["server_address"] == f"{gateway}:{published.port}"  # the agent's dial
    assert connect_from(stub, a.id, gateway, published.port) == "control-server"
    assert connect_from(stub, a.id, gateway, private.port) == ""  # any other host service: filtered
    assert connect_from(stub, a.id, "127.0.0.1", private.port) == ""  # its loopback is its own
    port = free_port()
    with socket.socket() as s:  # a host service on every address: still not the container's to reach
        s.bind(("0.0.0.0", port))
        s.listen(1)
        assert connect_from(stub, a.id, gateway, port) == ""


def test_deleting_the_last_container_removes_veths_bridge_and_filter(tmp_path, pki):
    with bridged_hostd(tmp_path, pki) as (h, stub, bridge, _):
        cids = [f"iso-c-{uuid.uuid4().hex[:6]}", f"iso-d-{uuid.uuid4().hex[:6]}"]
        pids = []
        for cid in cids:
            stub.CreateContainer(host_pb2.CreateContainerRequest(container=host_pb2.Container(
                id=cid, network_mode=host_pb2.NETWORK_MODE_BRIDGE,
                limits=common_pb2.Limits(memory_mb=64, cpu_shares=256, max_processes=64),
                bootstrap=host_pb2.AgentBootstrap(server_address="127.0.0.1:1", ca_pem=pki.ca.cert_pem.decode(),
                                                  enrollment_token="tok", instance_id=cid))))
            pids.append(stub.StartContainer(host_pb2.ContainerRef(id=cid)).init_pid)
            assert sh("ip", "link", "show", "dev", veth_name_for(h, cid), check=False).returncode == 0
        assert sh("nft", "list", "table", "inet", "rd_" + bridge, check=False).returncode == 0
        stub.DeleteContainer(host_pb2.ContainerRef(id=cids[0]))
        assert sh("ip", "link", "show", "dev", veth_name_for(h, cids[0]), check=False).returncode != 0
        assert sh("ip", "link", "show", "dev", bridge, check=False).returncode == 0  # the neighbour's
        stub.DeleteContainer(host_pb2.ContainerRef(id=cids[1]))
        assert sh("ip", "link", "show", "dev", veth_name_for(h, cids[1]), check=False).returncode != 0
        assert sh("ip", "link", "show", "dev", bridge, check=False).returncode != 0
        assert sh("nft", "list", "table", "inet", "rd_" + bridge, check=False).returncode != 0
        mounts = open("/proc/self/mounts").read()
        assert str(h.lxc_path) not in mounts  # the writable layers' filesystems are gone with them
        assert not any(os.path.exists(f"/proc/{p}") for p in pids)


# ---------------------------------------------------------------------------------------- the pieces
def test_subordinate_ids_are_given_once(tmp_path):
    from reddwarf.hostd.template import ensure_subids
    sub = tmp_path / "subuid"
    sub.write_text("alice:100000:65536\n")
    ensure_subids(files=(str(sub),))
    ensure_subids(files=(str(sub),))
    assert sub.read_text() == f"alice:100000:65536\nroot:{IDMAP_BASE}:65536\n"
    wider = tmp_path / "subgid"
    wider.write_text(f"root:{IDMAP_BASE - 10}:200000\n")  # an operator's wider range is kept as it is
    ensure_subids(files=(str(wider),))
    assert wider.read_text() == f"root:{IDMAP_BASE - 10}:200000\n"


def test_shifting_moves_owners_into_the_range_and_keeps_setuid(tmp_path):
    from reddwarf.hostd.template import shift_tree
    (tmp_path / "d").mkdir()
    tool = tmp_path / "d" / "tool"
    tool.write_text("x")
    os.chown(tool, 0, 42)
    os.chmod(tool, 0o4755)
    os.symlink("tool", tmp_path / "d" / "link")
    assert shift_tree(str(tmp_path)) == 4
    st = os.stat(tool)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (IDMAP_BASE, IDMAP_BASE + 42, 0o4755)
    assert os.lstat(tmp_path / "d" / "link").st_uid == IDMAP_BASE
    assert shift_tree(str(tmp_path)) == 0  # once


def test_search_is_granted_to_the_mapped_root_only(tmp_path):
    from reddwarf.hostd.template import grant_search
    top = tmp_path / "private"
    inner = top / "lxc"
    inner.mkdir(parents=True)
    os.chmod(top, 0o700)
    assert str(top) in grant_search(str(inner))
    assert grant_search(str(inner)) == []  # nothing left to grant
    os.chmod(top, 0o700)  # a chmod narrows the ACL's mask: granted again
    assert str(top) in grant_search(str(inner))

    def as_uid(uid: int, *argv: str) -> int:
        return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *argv],
                              capture_output=True, timeout=10).returncode
    assert as_uid(IDMAP_BASE, "ls", str(inner)) == 0  # walks through
    assert as_uid(IDMAP_BASE, "ls", str(top)) != 0  # but cannot list
    assert as_uid(IDMAP_BASE + 1, "ls", str(inner)) != 0  # and no one else can walk

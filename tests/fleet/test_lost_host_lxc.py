"""A lost host, for real: REAL LXC containers with the real guest agent and MariaDB, their datadirs SAN LUNs
(a SAN node with its own REAL tgtd; compute hosts with the REAL user-space initiator, qemu-storage-daemon),
each host in its own network namespace (containers in host network mode: they are the host's processes).

A writer inserts rows and records every id MariaDB acknowledged; then every process of the instance's host
dies at once (its hostd, its container's agent and mysqld, its initiator). The server marks the host DOWN,
fences it, and the instance comes back ACTIVE on the other host with every acknowledged row."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator

import pymysql
import pytest

from reddwarf.hostd import qsd
from reddwarf.hostd.iscsi import TargetHost
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.fleet import LxcFleet, clear_dead_host, start_lxc_fleet
from tests.fixtures.netns import HostNetwork
from tests.fixtures.waiting import until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="LXC, tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE
IQN = "iqn.2024-01.reddwarf:host."
PASSWORD = "app-pw-123"


class Writer(threading.Thread):
    """Inserts ids one by one (autocommit); an id is acknowledged when its INSERT returned."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port = host, port
        self.acked: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            try:
                with pymysql.connect(host=self.host, port=self.port, user="app", password=PASSWORD, database="shop",
                                     autocommit=True, connect_timeout=3, read_timeout=5, write_timeout=5) as conn, \
                        conn.cursor() as cur:
                    while not self.stop.is_set():
                        n += 1
                        cur.execute("INSERT INTO rows_ (id) VALUES (%s)", (n,))
                        self.acked.append(n)
            except pymysql.err.MySQLError:
                time.sleep(0.2)  # the host is gone: the unacknowledged id is simply skipped


@pytest.fixture
def lxc_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LxcFleet]:
    # A short root: the initiator's QMP socket path under it has a 108-byte limit.
    with start_lxc_fleet(tmp_path_factory.mktemp("lh"), {"REDDWARF_HOST_CHECK_SECONDS": "1",
                                                         "REDDWARF_HOST_LOST_SECONDS": "4"}) as f:
        yield f


def netns_pids(net: HostNetwork, key: str) -> list[int]:
    ns = os.stat(net[key].netns_path).st_ino
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{d}/ns/net").st_ino == ns:
                    pids.append(int(d))
    return pids


def test_a_lost_host_s_mariadb_instance_comes_back_elsewhere_with_every_acknowledged_row(lxc_fleet):
    net, server, computes, control_port = lxc_fleet.net, lxc_fleet.server, lxc_fleet.computes, lxc_fleet.control_port
    admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id="lostco")))
    md = (("authorization", "Bearer " + admin.CreateToken(admin_pb2.CreateTokenRequest(tenant="tenants/lostco")).secret),)
    instances = database_pb2_grpc.InstancesStub(server.channel())

    def get(name: str) -> database_pb2.Instance:
        return instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=md)

    inst = instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="durable", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password=PASSWORD, databases=["shop"])]), metadata=md)
    inst = until(lambda: get(inst.name), lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR)
                 and not i.task, timeout=300, what="ACTIVE", interval=0.5)
    assert inst.status == ACTIVE, inst.fault.message
    lost = inst.host.removeprefix("hosts/")
    survivor = "h-a" if lost == "h-b" else "h-b"
    ep = inst.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop") as conn:
        conn.cursor().execute("CREATE TABLE rows_ (id INT PRIMARY KEY) ENGINE=InnoDB")
    writer = Writer(ep.host, ep.port)
    writer.start()
    try:
        until(lambda: len(writer.acked), lambda n: n >= 200, timeout=60, what="rows written", interval=0.1)
        # Mid-write, every process of the host dies at once.
        key = lost.removeprefix("h-")
        for pid in netns_pids(net, key):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        computes[lost].proc.wait(timeout=30)
        time.sleep(1)
    finally:
        writer.stop.set()
        writer.join(15)
    acked = set(writer.acked)
    assert len(acked) >= 200

    back = until(lambda: get(inst.name), lambda i: i.host == f"hosts/{survivor}" and i.status == ACTIVE
                 and not i.task, timeout=240, what=f"ACTIVE on {survivor}", interval=0.5)
    assert admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{lost}")).state == admin_pb2.HOST_STATE_FENCED
    target = TargetHost(f"{net['san'].address}:3260", control_port).find(f"iqn.2024-01.reddwarf:vol.{inst.id}")
    assert target is not None and target.acl == (IQN + survivor,)
    ep = back.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="app", password=PASSWORD, database="shop") as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT id FROM rows_")
        stored = {r[0] for r in cur.fetchall()}
        missing = acked - stored
        assert not missing, f"{len(missing)} acknowledged rows lost of {len(acked)}"
        cur.execute("INSERT INTO rows_ (id) VALUES (%s)", (10**8,))  # and it takes writes there
        conn.commit()

    clear_dead_host(computes[lost].root)  # as a reboot would; then delete
    instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=md)
    until(lambda: TargetHost(f"{net['san'].address}:3260", control_port).targets(), lambda t: t == [],
          timeout=180, what="the LUN gone", interval=0.5)

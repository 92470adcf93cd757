"""A hostile guest floods heartbeats with its instance's own certificate, against the real server: the state
DB sees at most one health write per heartbeat interval for that instance, the flooder is cut off, and a
neighbour instance keeps heartbeating (its health keeps being written)."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from reddwarf.common import tls
from reddwarf.common.pki import TlsFiles
from reddwarf.v1 import agent_pb2, agent_pb2_grpc, common_pb2, database_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.waiting import until

INTERVAL = 2  # REDDWARF_HEARTBEAT_SECONDS of tests/fixtures/server.py


def create(c: Cluster, name: str) -> database_pb2.Instance:
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name=name, flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
    return until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md),
                 lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE and not i.task, timeout=60,
                 what=f"{name} ACTIVE", interval=0.2)


@pytest.fixture(scope="module")
def pair(cluster: Cluster) -> Iterator[tuple[database_pb2.Instance, database_pb2.Instance]]:
    a, b = create(cluster, "neighbour"), create(cluster, "hostile")
    yield a, b
    for inst in (a, b):
        cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)


def count_health_writes(c: Cluster) -> sqlite3.Connection:
    """A trigger in the server's state DB recording every write of an instance's health."""
    conn = sqlite3.connect(c.server.state_dir / "state.db", timeout=30, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS test_health_writes (instance_id TEXT, at REAL)")
    conn.execute("CREATE TRIGGER IF NOT EXISTS test_health_written AFTER UPDATE OF health_at ON instances "
                 "BEGIN INSERT INTO test_health_writes VALUES (NEW.id, julianday('now')); END")
    return conn


def writes(conn: sqlite3.Connection, iid: str) -> int:
    return int(conn.execute("SELECT count(*) FROM test_health_writes WHERE instance_id = ?", (iid,)).fetchone()[0])


def test_a_heartbeat_flood_with_a_real_instance_certificate_is_throttled_and_cut_off(
        cluster: Cluster, pair: tuple[database_pb2.Instance, database_pb2.Instance]) -> None:
    c = cluster
    neighbour, hostile = pair
    # The hostile guest's own credentials, as its agent enrolled them.
    agent_dir = c.hostd.lxc_path / f"{c.hostd.prefix}{hostile.id}" / "rootfs/var/lib/reddwarf-agent"
    files = TlsFiles(agent_dir / "agent.pem", agent_dir / "agent.key", c.server.admin_files.ca)
    assert files.cert.exists()
    db = count_health_writes(c)
    sent = 0

    async def flood() -> AsyncIterator[agent_pb2.AgentMessage]:
        nonlocal sent
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=hostile.id))
        health = common_pb2.GuestHealth(service_state=common_pb2.SERVICE_STATE_RUNNING, accepting_connections=True)
        for n in range(50_000):
            health.uptime_seconds = n
            sent += 1
            yield agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(health=health))
            if n % 200 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(60)

    async def attack() -> grpc.StatusCode:
        async with tls.aio_channel(c.server.agent, files) as ch:
            try:
                async for _ in agent_pb2_grpc.AgentGatewayStub(ch).Connect(flood()):
                    pass
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    started = time.monotonic()
    neighbour_before, hostile_before = writes(db, neighbour.id), writes(db, hostile.id)
    code = asyncio.run(asyncio.wait_for(attack(), 30))
    cut_after = time.monotonic() - started
    # Cut off (RESOURCE_EXHAUSTED; a flooder still writing may see its own write fail as INTERNAL).
    assert code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL), code
    assert cut_after < 10 and sent < 50_000
    time.sleep(3 * INTERVAL)
    window = time.monotonic() - started
    hostile_writes = writes(db, hostile.id) - hostile_before
    # At most one write per interval for the instance, whoever sends (its real agent heartbeats too).
    assert hostile_writes <= int(window / INTERVAL) + 2, (hostile_writes, sent, window)
    # The neighbour kept heartbeating and being written, and stays ACTIVE.
    assert writes(db, neighbour.id) - neighbour_before >= 2
    got = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=neighbour.name), metadata=c.md)
    assert got.status == database_pb2.INSTANCE_STATUS_ACTIVE
    assert "heartbeats far faster" in c.server.log()
    db.close()

"""Limits against a misbehaving guest or tenant (issue 13, part 4), each tried as an attacker would:

- a hostile agent holding a real instance certificate floods heartbeats: the state sees at most one write
  per interval and the flooder is cut off, while another instance keeps heartbeating;
- an oversized heartbeat or hello is refused, and so is any agent message over the port's size cap;
- the agent port serves at most AGENT_MAX_CONCURRENT_STREAMS calls at once on one connection, and a peer
  pinging faster than the servers allow is sent away;
- one tenant's long verifies and tasks leave workers for another tenant;
- quota checks are atomic (SQLite and MariaDB), scheduled backups obey the backup quotas, and the stored
  bytes are capped.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import tls
from reddwarf.common.errors import ResourceExhausted
from reddwarf.common.states import BackupStatus, InstanceStatus, TaskState
from reddwarf.server import db, models, quotas, tasks
from reddwarf.server.agents import AgentGatewayServicer, AgentRegistry
from reddwarf.server.backups import take_scheduled_backups
from reddwarf.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.fixtures.mariadb import free_port

INTERVAL = 1  # heartbeat_seconds of the gateway under test


# -- the agent port, in process, with real mTLS --------------------------------------------------------
class Gateway:
    def __init__(self, pki: Any) -> None:
        self.pki = pki
        self.writes: collections.Counter[str] = collections.Counter()
        self.last: dict[str, common_pb2.GuestHealth] = {}
        self.port = free_port()
        self.in_upload = 0
        self.max_in_upload = 0
        self.release = asyncio.Event()

    async def on_health(self, iid: str, health: common_pb2.GuestHealth) -> None:
        self.writes[iid] += 1
        self.last[iid] = health

    async def upload(self, instance_id: str, chunks: AsyncIterator[agent_pb2.BackupChunk]
                     ) -> agent_pb2.UploadBackupResponse:
        self.in_upload += 1
        self.max_in_upload = max(self.max_in_upload, self.in_upload)
        try:
            await self.release.wait()
            return agent_pb2.UploadBackupResponse()
        finally:
            self.in_upload -= 1

    def download(self, instance_id: str, backup_id: str) -> AsyncIterator[agent_pb2.BackupChunk]:
        raise NotImplementedError

    async def start(self) -> None:
        self.registry = AgentRegistry(self.on_health, heartbeat_seconds=INTERVAL, heartbeat_expiry=30,
                                      heartbeat_max_bytes=64 * 1024, heartbeat_flood_burst=20)
        cert, key, ca = self.pki.files("server", "control").read()
        self.server = grpc.aio.server(options=tls.agent_server_options(2 << 20))
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(AgentGatewayServicer(self.registry, self), self.server)
        self.server.add_secure_port(f"127.0.0.1:{self.port}", tls.server_credentials(cert, key, ca))
        await self.server.start()

    def channel(self, iid: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        files = self.pki.files("instance", iid)
        if options is None:
            return tls.aio_channel(f"127.0.0.1:{self.port}", files)
        cert, key, ca = files.read()
        return grpc.aio.secure_channel(f"127.0.0.1:{self.port}", tls.channel_credentials(ca, cert, key),
                                       options=[*options, ("grpc.ssl_target_name_override",
                                                           tls.peer_name(tls.SERVER_PEER))])


@pytest.fixture
async def gw(pki: Any) -> AsyncIterator[Gateway]:
    g = Gateway(pki)
    await g.start()
    yield g
    g.release.set()
    await g.server.stop(None)


def health(uptime: int, last_error: str = "") -> common_pb2.GuestHealth:
    return common_pb2.GuestHealth(service_state=common_pb2.SERVICE_STATE_RUNNING, uptime_seconds=uptime,
                                  last_error=last_error)


def beat(uptime: int, last_error: str = "") -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(health=health(uptime, last_error)))


async def run_stream(g: Gateway, iid: str, messages: AsyncIterator[agent_pb2.AgentMessage]
                     ) -> grpc.StatusCode:
    """Runs a Connect stream to its end; the status it ended with."""
    async with g.channel(iid) as ch:
        call = agent_pb2_grpc.AgentGatewayStub(ch).Connect(messages)
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return grpc.StatusCode.OK


async def test_a_heartbeat_flood_is_written_at_most_once_per_interval_and_cut_off_while_others_beat_on(
        gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    good, bad = f"good-{uuid.uuid4().hex[:6]}", f"bad-{uuid.uuid4().hex[:6]}"
    stop = asyncio.Event()
    sent = 0

    async def honest() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=good, health=health(0)))
        n = 0
        while not stop.is_set():
            await asyncio.sleep(INTERVAL)
            n += 1
            yield beat(n)

    async def flood() -> AsyncIterator[agent_pb2.AgentMessage]:
        nonlocal sent
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=bad, health=health(0)))
        for n in range(20_000):
            sent += 1
            yield beat(n)
            if n % 100 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(60)

    honest_call = asyncio.create_task(run_stream(gw, good, honest()))
    await asyncio.sleep(1.5)
    started = time.monotonic()
    flooded = await asyncio.wait_for(run_stream(gw, bad, flood()), 30)
    # The server ends the call RESOURCE_EXHAUSTED; a flooder still writing when the trailers arrive may
    # see its own write fail instead (grpc's client then reports INTERNAL).
    assert flooded in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
    assert any(getattr(r, "reason", "").startswith("heartbeats far faster") for r in caplog.records)
    assert not gw.registry.is_connected(bad)
    good_before = gw.writes[good]
    await asyncio.sleep(3 * INTERVAL + 0.5)  # any coalesced report of the flooder lands in this time
    elapsed = time.monotonic() - started
    # One write per interval at most: the hello's, then at most one per interval since.
    assert gw.writes[bad] <= 1 + int(elapsed / INTERVAL) + 1, (gw.writes[bad], sent, elapsed)
    assert gw.writes[bad] <= 3
    # The honest neighbour kept its stream and kept being written.
    assert gw.registry.is_connected(good) and not honest_call.done()
    assert gw.writes[good] >= good_before + 2
    stop.set()
    await asyncio.wait_for(honest_call, 10)


async def test_heartbeats_faster_than_the_interval_are_coalesced_into_the_newest(gw: Gateway) -> None:
    iid = f"fast-{uuid.uuid4().hex[:6]}"
    done = asyncio.Event()

    async def quick() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid))
        for n in range(1, 13):  # four a second: faster than allowed, slower than a flood (cut after ~10 s)
            await asyncio.sleep(INTERVAL / 4)
            yield beat(n)
        await asyncio.sleep(2 * INTERVAL)  # the last one is written when its interval is up
        done.set()
        await asyncio.sleep(60)

    call = asyncio.create_task(run_stream(gw, iid, quick()))
    await asyncio.wait_for(done.wait(), 20)
    assert gw.registry.is_connected(iid)
    assert 3 <= gw.writes[iid] <= 5  # ~3 s of heartbeats: one write per second, not twelve
    assert gw.last[iid].uptime_seconds == 12  # nothing newer was lost
    call.cancel()


async def test_an_oversized_heartbeat_is_refused_and_not_written(gw: Gateway) -> None:
    iid = f"big-{uuid.uuid4().hex[:6]}"

    async def big() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid))
        yield beat(1, last_error="x" * (70 * 1024))
        await asyncio.sleep(30)

    assert await asyncio.wait_for(run_stream(gw, iid, big()), 20) == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.sleep(0.2)
    assert gw.writes[iid] == 0 and not gw.registry.is_connected(iid)

    async def big_hello() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid, health=health(1, "y" * (70 * 1024))))
        await asyncio.sleep(30)

    assert await asyncio.wait_for(run_stream(gw, iid, big_hello()), 20) == grpc.StatusCode.INVALID_ARGUMENT
    assert gw.writes[iid] == 0


async def test_a_message_over_the_agent_ports_cap_is_refused_by_grpc(gw: Gateway) -> None:
    iid = f"huge-{uuid.uuid4().hex[:6]}"

    async def huge() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid))
        yield agent_pb2.AgentMessage(result=agent_pb2.CommandResult(command_id="x" * (3 << 20)))
        await asyncio.sleep(30)

    assert await asyncio.wait_for(run_stream(gw, iid, huge()), 20) == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_one_connection_gets_at_most_the_agent_ports_concurrent_streams(gw: Gateway) -> None:
    iid = f"streams-{uuid.uuid4().hex[:6]}"
    async with gw.channel(iid) as ch:
        stub = agent_pb2_grpc.AgentGatewayStub(ch)

        async def one() -> None:
            async def chunks() -> AsyncIterator[agent_pb2.BackupChunk]:
                yield agent_pb2.BackupChunk(backup_id="b", data=b"x")
            await stub.UploadBackup(chunks())

        # Connected first: a client opening streams before the server's SETTINGS arrive may have the excess
        # refused (RST_STREAM REFUSED_STREAM) rather than queued.
        await ch.channel_ready()
        await asyncio.sleep(0.5)
        calls = [asyncio.create_task(one()) for _ in range(tls.AGENT_MAX_CONCURRENT_STREAMS + 4)]
        deadline = time.monotonic() + 20
        while gw.max_in_upload < tls.AGENT_MAX_CONCURRENT_STREAMS and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        assert gw.max_in_upload == tls.AGENT_MAX_CONCURRENT_STREAMS  # the rest wait for a free stream
        gw.release.set()
        ended = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        # The waiting ones then run, or (gRPC core racing a freed slot) are refused with REFUSED_STREAM,
        # which the client sees as UNAVAILABLE; never more than the cap at once.
        for r in ended:
            assert r is None or (isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE), r
        assert ended.count(None) >= tls.AGENT_MAX_CONCURRENT_STREAMS
        assert gw.max_in_upload == tls.AGENT_MAX_CONCURRENT_STREAMS


async def test_a_peer_pinging_faster_than_allowed_is_sent_away(gw: Gateway) -> None:
    iid = f"pinger-{uuid.uuid4().hex[:6]}"
    abusive = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 5000),
               ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]

    async def idle() -> AsyncIterator[agent_pb2.AgentMessage]:
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid))
        await asyncio.sleep(60)

    async with gw.channel(iid, abusive) as ch:
        call = agent_pb2_grpc.AgentGatewayStub(ch).Connect(idle())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call:
                pass
        # GOAWAY ENHANCE_YOUR_CALM "too_many_pings"
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_servers_let_the_clients_own_keepalive_pings_through() -> None:
    client = dict(tls.channel_options("127.0.0.1:1"))
    server = dict(tls.SERVER_OPTIONS)
    assert int(str(client["grpc.keepalive_time_ms"])) >= server["grpc.http2.min_ping_interval_without_data_ms"]
    assert server["grpc.keepalive_permit_without_calls"] == 1 and server["grpc.http2.max_ping_strikes"] > 0
    assert server["grpc.max_concurrent_streams"] == tls.MAX_CONCURRENT_STREAMS


# -- state DBs ------------------------------------------------------------------------------------------
@pytest.fixture(params=["sqlite", "mariadb"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """A seeded state DB: SQLite as the server makes it (WAL, busy timeout), or a database in the real
    MariaDB fixture."""
    dbname = None
    if request.param == "sqlite":
        engine = db.make_engine(f"sqlite:///{tmp_path}/state.db")
    else:
        mariadb = request.getfixturevalue("mariadb")
        dbname = f"rd_limits_{uuid.uuid4().hex[:10]}"
        with mariadb.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{dbname}`")  # generated name, not user input
        engine = create_engine(mariadb.url(dbname), pool_size=25, max_overflow=5)
    models.Base.metadata.create_all(engine)
    sessions = db.session_factory(engine)
    with sessions() as s, s.begin():
        db.seed(s)
    try:
        yield sessions
    finally:
        engine.dispose()
        if dbname is not None:
            with mariadb.connect() as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE `{dbname}`")


def add_tenant(sessions: sessionmaker[Session], **quota: int) -> str:
    tid = f"t{uuid.uuid4().hex[:8]}"
    with sessions() as s, s.begin():
        s.add(models.Tenant(id=tid, display_name=tid, **{f"quota_{k}": v for k, v in quota.items()}))
    return tid


def add_instance(s: Session, tenant_id: str, status: str = InstanceStatus.ACTIVE) -> models.Instance:
    row = models.Instance(id=str(uuid.uuid4()), tenant_id=tenant_id, display_name="i", status=status,
                          flavor_id="tiny", volume_size_gb=1, datastore="mariadb", datastore_version="10.11")
    s.add(row)
    s.flush()
    return row


def test_concurrent_creates_cannot_all_pass_the_instance_quota(state: sessionmaker[Session]) -> None:
    tid = add_tenant(state, instances=3)
    start = threading.Barrier(20)

    def create(_: int) -> bool:
        start.wait()
        try:
            with state() as s, s.begin():
                tenant = s.get(models.Tenant, tid)
                assert tenant is not None
                time.sleep(0.01)  # widen the window a racy check would lose in
                quotas.check_instance_quota(s, tenant, 256, 1)
                time.sleep(0.01)
                add_instance(s, tid)
            return True
        except ResourceExhausted:
            return False

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(create, range(20)))
    assert results.count(True) == 3
    with state() as s:
        assert quotas.tenant_allocation(s, tid).instances == 3


def test_a_scheduled_backup_over_quota_is_refused_with_a_fault_on_the_schedule(
        state: sessionmaker[Session]) -> None:
    tid = add_tenant(state, backups=1)
    with state() as s, s.begin():
        inst = add_instance(s, tid)
        iid = inst.id
        s.add(models.Backup(id=str(uuid.uuid4()), tenant_id=tid, instance_id=iid, display_name="old",
                            status=BackupStatus.COMPLETED, size_bytes=10))
        s.add(models.BackupSchedule(instance_id=iid, interval_seconds=3600, keep=3, full_every=1,
                                    next_run=dt.datetime(2000, 1, 1)))
    app: Any = type("App", (), {"sessions": state})()
    assert take_scheduled_backups(app) == 0
    with state() as s:
        sch = s.get(models.BackupSchedule, iid)
        assert sch is not None and "quota exceeded: backups" in sch.fault_message and sch.fault_at is not None
        assert sch.next_run is not None and sch.next_run > dt.datetime(2001, 1, 1)  # tried again next interval
        assert len(s.scalars(select(models.Backup).where(models.Backup.tenant_id == tid)).all()) == 1
        assert s.scalars(select(models.Task)).first() is None

    # Room again (one more allowed): the next due run takes its backup and clears the fault.
    with state() as s, s.begin():
        t = s.get(models.Tenant, tid)
        sch = s.get(models.BackupSchedule, iid)
        assert t is not None and sch is not None
        t.quota_backups, sch.next_run = 2, dt.datetime(2000, 1, 1)
    assert take_scheduled_backups(app) == 1
    with state() as s:
        sch = s.get(models.BackupSchedule, iid)
        assert sch is not None and sch.fault_message == "" and sch.fault_at is None
        task = s.scalars(select(models.Task)).one()
        assert task.kind == "create_backup" and task.tenant_id == tid


def test_stored_backup_bytes_are_capped(state: sessionmaker[Session]) -> None:
    tid = add_tenant(state, backup_bytes=1000)
    with state() as s, s.begin():
        iid = add_instance(s, tid).id
        s.add(models.Backup(id=str(uuid.uuid4()), tenant_id=tid, instance_id=iid, display_name="a",
                            status=BackupStatus.COMPLETED, size_bytes=600))
        s.add(models.Backup(id=str(uuid.uuid4()), tenant_id=tid, instance_id=iid, display_name="failed",
                            status=BackupStatus.FAILED, size_bytes=5000))  # its object is gone: not counted
    with state() as s, s.begin():
        tenant = s.get(models.Tenant, tid)
        assert tenant is not None
        quotas.check_backup_quota(s, tenant)  # 600 of 1000 held: one more may start
        assert quotas.remaining_backup_bytes(s, tid) == 400  # and upload at most this
    with state() as s, s.begin():
        s.add(models.Backup(id=str(uuid.uuid4()), tenant_id=tid, instance_id=iid, display_name="b",
                            status=BackupStatus.COMPLETED, size_bytes=400))
    with state() as s, s.begin():
        tenant = s.get(models.Tenant, tid)
        assert tenant is not None
        with pytest.raises(ResourceExhausted, match="backups hold 1000 bytes"):
            quotas.check_backup_quota(s, tenant)
        assert quotas.remaining_backup_bytes(s, tid) == 0


# -- the task engine ------------------------------------------------------------------------------------
def test_a_task_records_its_resources_tenant(state: sessionmaker[Session]) -> None:
    tid = add_tenant(state)
    with state() as s, s.begin():
        iid = add_instance(s, tid, InstanceStatus.BUILD).id
        b = models.Backup(id=str(uuid.uuid4()), tenant_id=tid, instance_id=iid, display_name="b")
        s.add(b)
        s.flush()
        t1 = tasks.submit(s, "create_instance", f"instances/{iid}")
        t2 = tasks.submit(s, "verify_backup", f"backups/{b.id}")
        t3 = tasks.submit(s, "other", "things/1")
        assert (t1.tenant_id, t2.tenant_id, t3.tenant_id) == (tid, tid, None)


async def test_one_tenants_long_verifies_and_tasks_leave_workers_for_another_tenant(
        state: sessionmaker[Session]) -> None:
    release = asyncio.Event()
    running: collections.Counter[tuple[str, str]] = collections.Counter()
    most: collections.Counter[tuple[str, str]] = collections.Counter()
    finished: dict[str, float] = {}

    def slow(kind: str) -> tasks.Step:
        async def run(ctx: tasks.StepContext) -> None:
            key = (ctx.params["tenant"], kind)
            running[key] += 1
            most[key] = max(most[key], running[key])
            try:
                if ctx.params["tenant"] == "hog":
                    await release.wait()  # hours of scratch restore, as far as the others can tell
                finished[ctx.task_id] = time.monotonic()
            finally:
                running[key] -= 1
        return tasks.Step("work", run)

    engine = tasks.TaskEngine(state, "srv-a", workers=4, per_tenant=2, poll_seconds=0.05,
                              pools=[tasks.Pool("verify", 2, 1, ("verify_backup",))])
    for kind in ("verify_backup", "create_backup", "create_instance"):
        engine.register(tasks.TaskKind(kind, (slow(kind),)))
    with state() as s, s.begin():
        for n in range(6):
            tasks.submit(s, "verify_backup", f"backups/v{n}", {"tenant": "hog"}, tenant_id="hog")
            tasks.submit(s, "create_backup", f"instances/h{n}", {"tenant": "hog"}, tenant_id="hog")
    await engine.start()
    try:
        await asyncio.sleep(1.0)  # the hog's tasks take every slot they may
        assert most[("hog", "verify_backup")] == 1 and most[("hog", "create_backup")] == 2
        submitted = time.monotonic()
        with state() as s, s.begin():
            other = tasks.submit(s, "create_instance", "instances/o1", {"tenant": "other"}, tenant_id="other").id
            other_verify = tasks.submit(s, "verify_backup", "backups/o1", {"tenant": "other"},
                                        tenant_id="other").id
        engine.wake()
        for tid in (other, other_verify):
            assert (await tasks.wait_for(state, tid, timeout=10)).state == TaskState.SUCCEEDED
        assert finished[other] - submitted < 5
        # The hog never held more than its share, in either pool.
        assert most[("hog", "verify_backup")] == 1 and most[("hog", "create_backup")] == 2
        release.set()
        with state() as s:
            ids = [t.id for t in s.scalars(select(models.Task).where(models.Task.tenant_id == "hog"))]
        for tid in ids:
            assert (await tasks.wait_for(state, tid, timeout=60)).state == TaskState.SUCCEEDED
    finally:
        release.set()
        await engine.stop()


def test_the_schedule_shows_why_its_last_run_took_no_backup() -> None:
    from reddwarf.server.backups import schedule_pb
    row = models.BackupSchedule(instance_id="i1", interval_seconds=3600, keep=2, full_every=1,
                                fault_message="scheduled backup not taken: quota exceeded",
                                fault_at=dt.datetime(2026, 1, 1))
    pb = schedule_pb(row)
    assert pb.HasField("fault") and pb.fault.message.endswith("quota exceeded") and pb.fault.created.seconds
    row.fault_message, row.fault_at = "", None
    assert not schedule_pb(row).HasField("fault")


def test_migration_0003_gives_running_tasks_their_tenant(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/m.db"
    db.upgrade(url, "0002")
    engine = db.make_engine(url)
    with engine.begin() as c:
        c.exec_driver_sql("INSERT INTO flavors (id, display_name, memory_mb, swap_mb, cpu_shares, "
                          "cpu_limit_millicores, max_processes, max_open_files, io_weight, io_iops, "
                          "io_bytes_per_sec, default_volume_gb) VALUES ('f', 'f', 1, 0, 1, 0, 1, 0, 1, 0, 0, 1)")
        c.exec_driver_sql("INSERT INTO tenants (id, display_name, quota_instances, quota_memory_mb, "
                          "quota_volume_gb, quota_backups, created_at) VALUES ('t1', 't1', 1, 1, 1, 1, '2026-01-01')")
        c.exec_driver_sql("INSERT INTO instances (id, tenant_id, display_name, status, flavor_id, volume_size_gb, "
                          "datastore, datastore_version, address, port, fault_message, fault_details, health, "
                          "root_enabled, restored_from, create_params, created_at, updated_at) VALUES ('i1', 't1', "
                          "'i', 'BUILD', 'f', 1, 'mariadb', '10.11', '', 0, '', '', '{}', 0, '', '{}', "
                          "'2026-01-01', '2026-01-01')")
        for tid, state in (("k1", "pending"), ("k2", "succeeded")):
            c.exec_driver_sql("INSERT INTO tasks (id, kind, resource, state, current_step, steps, params, "
                              "attempts, progress_percent, fault_message, fault_details, created_at, updated_at) "
                              f"VALUES ('{tid}', 'create_instance', 'instances/i1', '{state}', '', '[]', '{{}}', "
                              "0, 0, '', '', '2026-01-01', '2026-01-01')")
    engine.dispose()
    db.upgrade(url)
    engine = db.make_engine(url)
    with engine.connect() as c:
        got = dict(c.exec_driver_sql("SELECT id, tenant_id FROM tasks").fetchall())
        assert got == {"k1": "t1", "k2": None}
        assert c.exec_driver_sql("SELECT quota_backup_bytes FROM tenants").scalar() == 1 << 40
    engine.dispose()


def test_the_backup_bytes_quota_is_optional_on_the_api(server: Any) -> None:
    from reddwarf.v1 import admin_pb2, admin_pb2_grpc
    with server.channel(server.admin_files) as ch:
        a = admin_pb2_grpc.AdminStub(ch)
        tid = f"t{uuid.uuid4().hex[:8]}"
        t = a.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(
            id=tid, quota=admin_pb2.Quota(instances=1, memory_mb=1024, volume_gb=10, backups=5))))
        assert t.quota.backup_bytes == 1 << 40  # absent: the server's default
        q = a.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(
            instances=1, memory_mb=1024, volume_gb=10, backups=5, backup_bytes=5 << 30)))
        assert q.limit.backup_bytes == 5 << 30 and q.in_use.backup_bytes == 0
        q = a.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(
            instances=2, memory_mb=1024, volume_gb=10, backups=5)))
        assert q.limit.backup_bytes == 5 << 30 and q.limit.instances == 2  # absent: left as it was
        with pytest.raises(grpc.RpcError) as e:
            a.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(
                backup_bytes=-1)))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_progress_faster_than_once_a_second_is_dropped(gw: Gateway) -> None:
    iid = f"progress-{uuid.uuid4().hex[:6]}"
    outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
    await outbox.put(agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id=iid)))

    async def messages() -> AsyncIterator[agent_pb2.AgentMessage]:
        while True:
            yield await outbox.get()

    async def guest() -> None:
        async with gw.channel(iid) as ch:
            async for msg in agent_pb2_grpc.AgentGatewayStub(ch).Connect(messages()):
                if msg.WhichOneof("message") == "command":
                    cid = msg.command.command_id
                    for n in range(100):
                        await outbox.put(agent_pb2.AgentMessage(progress=agent_pb2.Progress(command_id=cid,
                                                                                            percent=n)))
                    await outbox.put(agent_pb2.AgentMessage(result=agent_pb2.CommandResult(command_id=cid)))

    seen: list[int] = []
    stream = asyncio.create_task(guest())
    try:
        await gw.registry.wait_for_hello(iid, 10)
        await gw.registry.call(iid, agent_pb2.Command(table_checksums=agent_pb2.TableChecksums()), timeout=10,
                               on_progress=lambda p: seen.append(p.percent))
        assert seen == [0]  # a hundred in a blink: one reached the task
    finally:
        stream.cancel()

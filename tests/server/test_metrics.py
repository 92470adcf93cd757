"""The server's Prometheus metrics, piece by piece: the series made from a real state DB (SQLite), the
hosts' usage poll, the /metrics listener's TLS and who may scrape it, API call counting in a real server
process, the settings, and the shipped alert rules under promtool."""
from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import InvalidArgument, NotFound, Unavailable, Unimplemented
from reddwarf.common.pki import TlsFiles
from reddwarf.server import models
from reddwarf.server.metrics import PER_INSTANCE_SERIES, ServerMetrics, UsagePoller
from reddwarf.server.metrics_http import MetricsListener, needs_tls
from reddwarf.server.settings import Settings
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc, host_pb2
from tests.fixtures.mariadb import free_port
from tests.fixtures.pki import TestPki
from tests.fixtures.server import RunningServer

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series_of(samples: Samples, instance: str) -> list[str]:
    return [name for name, labels in samples if ("instance", instance) in labels]


# -- the series, from a real state DB ---------------------------------------------------------------------
@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(f"sqlite:///{tmp_path}/state.db")
    models.Base.metadata.create_all(engine)
    try:
        yield sessionmaker(bind=engine, expire_on_commit=False)
    finally:
        engine.dispose()


def health(**kw: object) -> common_pb2.GuestHealth:
    h = common_pb2.GuestHealth(service_state=common_pb2.SERVICE_STATE_RUNNING, accepting_connections=True, **kw)
    h.observed.FromDatetime(dt.datetime(2026, 11, 26, 12, 0, 0))
    return h


class FakeAgents:
    def __init__(self, live: dict[str, common_pb2.GuestHealth]) -> None:
        self.live = live

    def is_connected(self, instance_id: str) -> bool:
        return instance_id in self.live

    def last_health(self, instance_id: str) -> common_pb2.GuestHealth | None:
        return self.live.get(instance_id)

    def stream_count(self) -> int:
        return len(self.live)


class FakeHosts:
    """A UsageSource whose hosts answer from a table, fail, or predate ListUsage."""

    def __init__(self) -> None:
        self.usage: dict[str, list[host_pb2.ContainerUsage]] = {}
        self.down: set[str] = set()
        self.old: set[str] = set()
        self.calls: list[str] = []

    async def list_usage(self, host_id: str) -> list[host_pb2.ContainerUsage]:
        self.calls.append(f"list {host_id}")
        if host_id in self.down:
            raise Unavailable("host unreachable")
        if host_id in self.old:
            raise Unimplemented("Method not found!")
        return self.usage.get(host_id, [])

    async def get_usage(self, host_id: str, container_id: str) -> host_pb2.ContainerUsage:
        self.calls.append(f"get {host_id} {container_id}")
        for u in self.usage.get(host_id, []):
            if u.id == container_id:
                return u
        raise NotFound("no such container", field="id")


def usage(cid: str, memory: int, failcnt: int) -> host_pb2.ContainerUsage:
    return host_pb2.ContainerUsage(id=cid, cpu_usage_ns=2_500_000_000, io_read_bytes=10, io_write_bytes=20,
                                   beancounters=[host_pb2.Beancounter(resource="memory", held=memory, maxheld=memory,
                                                                      barrier=1 << 30, limit=1 << 30, failcnt=failcnt)])


def seed(sessions: sessionmaker[Session]) -> None:
    from google.protobuf import json_format
    now = utcnow()
    with sessions() as s, s.begin():
        s.add_all([models.Tenant(id="t1"), models.Tenant(id="t2"),
                   models.Tenant(id="gone", deleted_at=now)])
        stored = json_format.MessageToDict(health(queries=100, threads_connected=3, datadir_bytes_used=5,
                                                  datadir_bytes_total=50))
        common = {"flavor_id": "tiny", "volume_size_gb": 1, "datastore": "mariadb", "datastore_version": "10.11"}
        s.add_all([
            models.Instance(id="a", tenant_id="t1", display_name="a", status="ACTIVE", host_id="h1",
                            health=stored, health_at=now, **common),
            # silent for an hour: stored ACTIVE, shown SHUTDOWN, not up
            models.Instance(id="b", tenant_id="t2", display_name="b", status="ACTIVE", host_id="h1",
                            health=stored, health_at=now - dt.timedelta(hours=1), **common),
            models.Instance(id="c", tenant_id="t1", display_name="c", status="DELETED", host_id="h1",
                            deleted_at=now, **common),
        ])
        s.add_all([
            models.Backup(id="b-ok", tenant_id="t1", instance_id="a", display_name="x", status="COMPLETED",
                          size_bytes=1000, created_at=now - dt.timedelta(hours=2)),
            models.Backup(id="b-bad", tenant_id="t1", instance_id="a", display_name="y", status="FAILED",
                          size_bytes=0, created_at=now - dt.timedelta(hours=1)),
            models.Backup(id="b-c", tenant_id="t1", instance_id="c", display_name="z", status="COMPLETED",
                          size_bytes=7, created_at=now - dt.timedelta(hours=1)),
            models.Task(id="task-ok", kind="create_backup", resource="backups/b-ok", state="succeeded",
                        created_at=now - dt.timedelta(hours=2), updated_at=now - dt.timedelta(hours=2) + dt.timedelta(seconds=42)),
            models.Task(id="task-b", kind="create_backup", resource="instances/b", state="pending", tenant_id="t2"),
        ])


async def test_scrape_labels_live_instances_by_tenant_and_prefers_the_live_heartbeat(sessions):
    seed(sessions)
    hosts = FakeHosts()
    hosts.usage["h1"] = [usage("a", 123, 2), usage("c", 9, 0)]
    m = ServerMetrics(heartbeat_expiry=20, usage=UsagePoller(hosts))
    m.agents = FakeAgents({"a": health(queries=500, threads_connected=4, slow_queries=2)})
    await m.refresh(sessions)
    await m.usage.poll(m.snapshot, ["h1"])
    got = scrape(m.registry)

    assert value(got, "reddwarf_instance_up", tenant="t1", instance="a") == 1
    assert value(got, "reddwarf_instance_up", tenant="t2", instance="b") == 0
    assert value(got, "reddwarf_instance_status", tenant="t1", instance="a", status="ACTIVE") == 1
    # b has a create_backup task pending: it shows BACKUP, as GetInstance would
    assert value(got, "reddwarf_instance_status", tenant="t2", instance="b", status="BACKUP") == 1
    # the live heartbeat (500), not the stored one (100)
    assert value(got, "reddwarf_guest_queries_total", tenant="t1", instance="a") == 500
    assert value(got, "reddwarf_guest_connections", tenant="t1", instance="a") == 4
    assert value(got, "reddwarf_guest_slow_queries_total", tenant="t1", instance="a") == 2
    assert value(got, "reddwarf_guest_queries_total", tenant="t2", instance="b") == 100
    assert value(got, "reddwarf_guest_datadir_size_bytes", tenant="t2", instance="b") == 50
    # not a replica: no replication series at all
    assert not [n for n, _ in got if "replication" in n]
    assert value(got, "reddwarf_beancounter_held", tenant="t1", instance="a", resource="memory") == 123
    assert value(got, "reddwarf_beancounter_failures_total", tenant="t1", instance="a", resource="memory") == 2
    assert value(got, "reddwarf_container_cpu_seconds_total", tenant="t1", instance="a") == 2.5
    assert value(got, "reddwarf_backup_last_size_bytes", tenant="t1", instance="a") == 1000
    assert value(got, "reddwarf_backup_last_duration_seconds", tenant="t1", instance="a") == 42
    assert value(got, "reddwarf_backup_last_failed", tenant="t1", instance="a") == 1
    assert value(got, "reddwarf_backups", tenant="t1", status="FAILED") == 1
    assert value(got, "reddwarf_backup_stored_bytes", tenant="t1") == 1007
    assert not [k for k in got if ("tenant", "gone") in k[1]]
    assert value(got, "reddwarf_tasks", kind="create_backup", state="pending") == 1
    assert value(got, "reddwarf_agent_streams") == 1
    # the deleted instance has no series, though its host still reported usage for it
    assert series_of(got, "c") == []
    assert 0 < len(series_of(got, "a")) <= PER_INSTANCE_SERIES


async def test_a_deleted_instance_loses_its_series_at_the_next_refresh(sessions):
    seed(sessions)
    m = ServerMetrics(heartbeat_expiry=20)
    await m.refresh(sessions)
    assert series_of(scrape(m.registry), "b")
    with sessions() as s, s.begin():
        row = s.get(models.Instance, "b")
        assert row is not None
        row.status = "DELETED"
    await m.refresh(sessions)
    got = scrape(m.registry)
    assert series_of(got, "b") == [] and series_of(got, "a")


async def test_usage_poll_drops_an_unreachable_host_and_falls_back_for_an_old_hostd():
    hosts = FakeHosts()
    hosts.usage = {"h1": [usage("a", 1, 0)], "h2": [usage("b", 2, 0)]}
    from reddwarf.server.metrics import InstanceFacts, Snapshot
    snap = Snapshot(utcnow(), (InstanceFacts("a", "t", "ACTIVE", "h1", common_pb2.GuestHealth(), None),
                               InstanceFacts("b", "t", "ACTIVE", "h2", common_pb2.GuestHealth(), None)))
    poller = UsagePoller(hosts)
    await poller.poll(snap, ["h1", "h2"])
    assert set(poller.by_container) == {"a", "b"}
    hosts.down.add("h1")
    await poller.poll(snap, ["h1", "h2"])
    assert set(poller.by_container) == {"b"}  # absent, not stale
    await poller.poll(snap, ["h2"])            # a host no longer UP is not asked, and holds nothing
    hosts.old.add("h2")
    hosts.calls.clear()
    await poller.poll(snap, ["h2"])
    await poller.poll(snap, ["h2"])
    assert set(poller.by_container) == {"b"}
    # ListUsage was tried once; after UNIMPLEMENTED, GetUsage per container
    assert hosts.calls == ["list h2", "get h2 b", "get h2 b"]


def test_task_ends_become_a_histogram_by_kind_and_outcome():
    m = ServerMetrics()
    m.task_ended("create_instance", "succeeded", 3.0)
    m.task_ended("create_instance", "succeeded", 700.0)
    m.task_ended("create_backup", "failed", 1.0)
    got = scrape(m.registry)
    assert value(got, "reddwarf_task_duration_seconds_count", kind="create_instance", outcome="succeeded") == 2
    assert value(got, "reddwarf_task_duration_seconds_bucket", kind="create_instance", outcome="succeeded",
                 le="5.0") == 1
    assert value(got, "reddwarf_task_duration_seconds_count", kind="create_backup", outcome="failed") == 1


# -- the listener ----------------------------------------------------------------------------------------------
def https_get(port: int, path: str, files: TlsFiles | None, ca: Path) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=str(ca))
    if files is not None:
        ctx.load_cert_chain(str(files.cert), str(files.key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="server.reddwarf") as tls:
        tls.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.fixture
def tls_listener(pki: TestPki) -> Iterator[tuple[MetricsListener, set[int]]]:
    registry = ServerMetrics().registry
    revoked: set[int] = set()
    listener = MetricsListener(f"127.0.0.1:{free_port()}", registry, tls=pki.files("server", "control"),
                               authorize=lambda ident: "revoked" if ident.serial in revoked else None)
    listener.start()
    try:
        yield listener, revoked
    finally:
        listener.stop()


def test_tls_listener_lets_monitor_and_admin_certificates_scrape(pki, tls_listener):
    listener, _ = tls_listener
    ca = pki.files("server", "control").ca
    for role in ("monitor", "admin"):
        status, body = https_get(listener.port, "/metrics", pki.files(role, "prom"), ca)
        assert status == 200 and "reddwarf_agent_streams 0.0" in body


def test_tls_listener_refuses_guests_tenants_and_revoked_scrapers(pki, tls_listener):
    listener, revoked = tls_listener
    ca = pki.files("server", "control").ca
    for role in ("instance", "client", "host"):
        status, body = https_get(listener.port, "/metrics", pki.files(role, "x1"), ca)
        assert status == 403 and "monitor" in body, role
    monitor = pki.files("monitor", "revoked-one")
    revoked.add(pki.serial(monitor))
    assert https_get(listener.port, "/metrics", monitor, ca) == (403, "revoked\n")
    assert https_get(listener.port, "/elsewhere", pki.files("monitor", "prom"), ca)[0] == 404


def test_tls_listener_refuses_handshakes_without_a_deployment_certificate(pki, tls_listener):
    listener, _ = tls_listener
    ca = pki.files("server", "control").ca
    for files in (None, pki.foreign_files("monitor", "prom"), pki.expired_files("monitor", "prom")):
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            https_get(listener.port, "/metrics", files, ca)
    # and it still serves the next one
    assert https_get(listener.port, "/metrics", pki.files("monitor", "prom"), ca)[0] == 200


def test_metrics_listener_is_plain_only_on_loopback():
    assert not needs_tls("127.0.0.1:9779", "auto")
    assert not needs_tls("[::1]:9779", "auto")
    assert needs_tls("127.0.0.1:9779", "on")
    assert needs_tls("0.0.0.0:9779", "auto")
    assert needs_tls("10.1.2.3:9779", "auto")
    assert needs_tls("metrics.example:9779", "auto")


@pytest.mark.parametrize(("key", "bad"), [("metrics_tls", "off"), ("metrics_listen", "9779"),
                                          ("metrics_refresh_seconds", 0), ("metrics_usage_seconds", 0.5)])
def test_bad_metrics_settings_are_refused_naming_the_key(key, bad):
    with pytest.raises(InvalidArgument) as err:
        Settings(**{key: bad})
    assert err.value.violations[0][0] == key


def test_metrics_can_be_turned_off():
    assert Settings(metrics_listen="").metrics_listen == ""


# -- a real server process: API calls counted by method and code, the plain loopback listener ------------------
def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_api_calls_are_counted_by_method_and_status(server: RunningServer):
    base = f"http://{server.metrics}/metrics"
    before = parse(get(base)[1])
    list_m = "/reddwarf.v1.Instances/ListInstances"
    get_m = "/reddwarf.v1.Instances/GetInstance"

    def count(samples: Samples, method: str, code: str) -> float:
        return value(samples, "reddwarf_api_calls_total", method=method, code=code) or 0

    with server.channel() as ch:
        stub = database_pb2_grpc.InstancesStub(ch)
        for _ in range(3):
            stub.ListInstances(database_pb2.ListInstancesRequest(), metadata=server.metadata())
        with pytest.raises(grpc.RpcError) as e1:
            stub.ListInstances(database_pb2.ListInstancesRequest(), metadata=(("authorization", "Bearer nope"),))
        assert e1.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as e2:
            stub.GetInstance(database_pb2.GetInstanceRequest(name="instances/nothing-here"),
                             metadata=server.metadata())
        assert e2.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as e3:
            stub.GetInstance(database_pb2.GetInstanceRequest(name="bogus/x"), metadata=server.metadata())
        assert e3.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # An aborted call's status reaches the client as the abort is sent, a moment before the interceptor
    # sees the exception it raises: the count is right a moment later, not necessarily at once.
    deadline = time.monotonic() + 5
    while True:
        status, text = get(base)
        after = parse(text)
        if count(after, get_m, "INVALID_ARGUMENT") > count(before, get_m, "INVALID_ARGUMENT") \
                or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert status == 200
    assert count(after, list_m, "OK") - count(before, list_m, "OK") == 3
    assert count(after, list_m, "UNAUTHENTICATED") - count(before, list_m, "UNAUTHENTICATED") == 1
    assert count(after, get_m, "NOT_FOUND") - count(before, get_m, "NOT_FOUND") == 1
    assert count(after, get_m, "INVALID_ARGUMENT") - count(before, get_m, "INVALID_ARGUMENT") == 1
    timed = value(after, "reddwarf_api_call_duration_seconds_count", method=list_m) or 0
    assert timed - (value(before, "reddwarf_api_call_duration_seconds_count", method=list_m) or 0) == 4
    assert get(f"http://{server.metrics}/")[0] == 404


# -- the shipped rules ------------------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (`make setup` installs "
                                    "Debian's prometheus package)")


@needs_promtool
def test_alert_rules_pass_promtool_check():
    out = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES / "reddwarf-alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_alerts_fire_on_what_they_should_under_promtool_test():
    out = subprocess.run([str(PROMTOOL), "test", "rules", "reddwarf-alerts.test.yml"], cwd=RULES,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_names_a_series_the_server_exports():
    """A renamed metric would leave an alert that can never fire: each reddwarf_* name in the rules must be
    one the server makes."""
    import re

    import yaml
    exported = {"reddwarf_instance_up", "reddwarf_instance_status", "reddwarf_guest_queries_total",
                "reddwarf_guest_slow_queries_total", "reddwarf_backup_last_failed",
                "reddwarf_backup_last_success_timestamp_seconds", "reddwarf_beancounter_failures_total",
                "reddwarf_task_duration_seconds_count", "reddwarf_tasks", "reddwarf_guest_datadir_used_bytes",
                "reddwarf_guest_datadir_size_bytes", "reddwarf_guest_replication_lag_seconds",
                "reddwarf_guest_replication_running", "reddwarf_metrics_snapshot_age_seconds"}
    m = ServerMetrics()
    text = generate_latest(m.registry).decode()
    made = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    for name in exported:
        base = re.sub(r"_(total|count|bucket|sum)$", "", name)
        assert name in made or base in made, name
    rules = yaml.safe_load((RULES / "reddwarf-alerts.yml").read_text())
    used = {n for g in rules["groups"] for r in g["rules"] for n in re.findall(r"reddwarf_[a-z_]+", r["expr"])}
    assert used <= exported, used - exported


def test_loop_of_refresh_survives_a_broken_state_db(tmp_path):
    """A snapshot that cannot be read keeps the last one serving (its age grows) rather than ending the loop."""
    engine = create_engine(f"sqlite:///{tmp_path}/empty.db")  # no tables
    broken = sessionmaker(bind=engine)
    m = ServerMetrics()

    async def run() -> None:
        task = asyncio.create_task(m.refresh_loop(broken, every=0.05))
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
    asyncio.run(run())
    engine.dispose()


async def test_a_replica_s_lag_is_exported_and_a_stopped_one_shows_not_running(sessions):
    seed(sessions)
    m = ServerMetrics(heartbeat_expiry=20)
    m.agents = FakeAgents({"a": health(replication_running=True, replication_lag_seconds=7),
                           "b": health(replication_running=False)})
    await m.refresh(sessions)
    got = scrape(m.registry)
    assert value(got, "reddwarf_guest_replication_lag_seconds", tenant="t1", instance="a") == 7
    assert value(got, "reddwarf_guest_replication_running", tenant="t1", instance="a") == 1
    assert value(got, "reddwarf_guest_replication_running", tenant="t2", instance="b") == 0
    assert value(got, "reddwarf_guest_replication_lag_seconds", tenant="t2", instance="b") is None


def test_the_monitor_certificate_init_writes_cannot_use_the_api_even_with_a_token(server: RunningServer):
    assert server.monitor_files is not None and server.monitor_files.key.stat().st_mode & 0o077 == 0
    with server.channel(server.monitor_files) as ch:
        with pytest.raises(grpc.RpcError) as e:
            database_pb2_grpc.InstancesStub(ch).ListInstances(database_pb2.ListInstancesRequest(),
                                                              metadata=server.metadata())
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "monitor" in (e.value.details() or "")


async def test_a_stopped_instance_is_stopped_not_down_and_a_restore_shows_restoring(sessions):
    seed(sessions)
    with sessions() as s, s.begin():
        a = s.get(models.Instance, "a")
        b = s.get(models.Instance, "b")
        assert a is not None and b is not None
        a.status, a.health_at = "STOPPED", utcnow() - dt.timedelta(minutes=5)  # its guest went with it
        b.restored_from = "b-ok"
        s.add(models.Task(id="restore", kind="create_instance", resource="instances/b", state="running",
                          created_at=utcnow() - dt.timedelta(days=1)))
    m = ServerMetrics(heartbeat_expiry=20)
    await m.refresh(sessions)
    got = scrape(m.registry)
    assert value(got, "reddwarf_instance_status", tenant="t1", instance="a", status="STOPPED") == 1
    assert value(got, "reddwarf_instance_up", tenant="t1", instance="a") == 0
    assert value(got, "reddwarf_instance_status", tenant="t2", instance="b", status="RESTORING") == 1

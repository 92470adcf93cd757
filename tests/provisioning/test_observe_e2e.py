"""Seeing what a real database does, all real: a MariaDB instance in an LXC container on a loop volume. The
slow-query log switched to a tiny long_query_time catches a slow query, which tail and show then see; the
log saved into the backup store reads back from it; `reddwarf instance top` draws the instance from its
health stream; the event history holds its create and its BUILD → ACTIVE; and delete leaves nothing.

Steps share one instance and are chained with pytest-dependency."""
from __future__ import annotations

import asyncio
import os
import subprocess

import pymysql
import pytest
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.server import db
from reddwarf.server.backup_store import LocalStore
from reddwarf.server.keys import TenantKeys, ensure_kek
from reddwarf.v1 import common_pb2, database_pb2, observe_pb2, observe_pb2_grpc
from tests.fixtures.waiting import until

from .test_e2e import create, wait_status

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]


@pytest.fixture(scope="module")
def inst(cluster):
    return create(cluster, name="observed", users=[common_pb2.User(user="app", password="app-pw-123")])


def logs(c) -> observe_pb2_grpc.LogsStub:
    return observe_pb2_grpc.LogsStub(c.channel)


def tail(c, name: str, lines: int = 200) -> str:
    return "".join(ch.data for ch in logs(c).TailLog(observe_pb2.TailLogRequest(name=name, lines=lines),
                                                      metadata=c.md))


@pytest.mark.dependency(name="observed")
def test_the_instance_is_active(cluster, inst):
    wait_status(cluster, inst.name)


@pytest.mark.dependency(name="slow", depends=["observed"])
def test_a_slow_query_shows_in_the_slow_log(cluster, inst):
    c = cluster
    name = f"{inst.name}/logs/slow_query"
    got = logs(c).EnableLog(observe_pb2.EnableLogRequest(name=name, long_query_time=0.05), metadata=c.md)
    assert (got.status, got.long_query_time) == ("Enabled", 0.05)
    i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
    ep = i.endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", connect_timeout=5) as conn, \
            conn.cursor() as cur:
        cur.execute("SELECT SLEEP(0.3) AS lxc_slow_marker")
    until(lambda: tail(c, name), lambda t: "SELECT SLEEP(0.3) AS lxc_slow_marker" in t, timeout=20,
          what="the slow query in the slow log")
    shown = logs(c).GetLog(observe_pb2.GetLogRequest(name=name), metadata=c.md)
    assert shown.size_bytes > 0 and shown.type == "USER"
    error = tail(c, f"{inst.name}/logs/error")
    assert "ready for connections" in error


@pytest.mark.dependency(depends=["slow"])
def test_the_saved_slow_log_reads_back_from_the_backup_store(cluster, inst):
    c = cluster
    saved = logs(c).SaveLog(observe_pb2.SaveLogRequest(name=f"{inst.name}/logs/slow_query"), metadata=c.md)
    sd = c.server.state_dir

    async def read_back() -> bytes:
        sessions = db.session_factory(db.make_engine(c.server.db_url))
        store = LocalStore(str(sd / "backups"), TenantKeys(sessions, ensure_kek(str(sd / "backup-kek.key"), sessions)))
        return b"".join([chunk async for chunk in store.open_reader(saved.object_id)])

    data = asyncio.run(read_back())
    assert len(data) == saved.size_bytes and b"lxc_slow_marker" in data


@pytest.mark.dependency(depends=["observed"])
def test_top_draws_the_instance_from_its_health_stream(cluster, inst):
    c = cluster
    f = c.server.client_files
    env = {"REDDWARF_ENDPOINT": c.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": c.token, "REDDWARF_CONFIG": "/nonexistent", "COLUMNS": "160"}
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["instance", "top", "--iterations", "2", "--interval", "3"], env=env)
    assert r.exit_code == 0, r.output
    rows = [line for line in r.output.splitlines() if line.strip().startswith("observed")]
    assert len(rows) == 2 and "ACTIVE" in rows[-1] and "MiB" in rows[-1]  # a real buffer pool in use


@pytest.mark.dependency(depends=["observed"])
def test_the_history_holds_the_create_and_build_to_active(cluster, inst):
    ev = observe_pb2_grpc.EventsStub(cluster.channel)
    got = ev.ListEvents(observe_pb2.ListEventsRequest(resource=inst.name, page_size=100), metadata=cluster.md).events
    assert [e.method for e in got if e.kind == "api"][0] == "/reddwarf.v1.Instances/CreateInstance"
    assert [(e.previous_status, e.status) for e in got if e.kind == "status"][:2] == [("", "BUILD"), ("BUILD", "ACTIVE")]


@pytest.mark.dependency(depends=["observed"])
def test_delete_leaves_nothing(cluster, inst):
    c = cluster
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    until(lambda: c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances,
          lambda items: inst.name not in {i.name for i in items}, timeout=120, what="instance deleted")
    assert inst.id not in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    with open("/proc/mounts") as m:
        assert inst.id not in m.read()

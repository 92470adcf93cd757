"""Several servers on one replicated state database: a real three-node MariaDB Galera cluster (galera-4).

- Conflicting writes through two different nodes fail certification at commit (a deadlock error, 1213);
  db.run_transaction re-runs the whole unit of work, so no update is lost and no error surfaces.
- Three real servers initialised and started at the same moment on a fresh database migrate it exactly once,
  and all serve; when the node they write through is killed with kill -9 they keep serving through the
  next node of their multi-host URL.
"""
from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.orm import Session

from reddwarf.server import db, models
from reddwarf.v1 import admin_pb2, admin_pb2_grpc
from tests.fixtures.galera import Galera, available, galera_cluster
from tests.fixtures.server import RunningServer, start_server

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="galera-4 / mariabackup not installed")]


@pytest.fixture(scope="module")
def galera() -> Any:
    with galera_cluster() as cluster:
        yield cluster


def head() -> str:
    rev = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    assert rev
    return rev


def test_conflicting_writes_on_two_nodes_are_retried_not_lost(galera: Galera) -> None:
    name = f"conflicts_{uuid.uuid4().hex[:6]}"
    galera.create_database(name)
    db.upgrade(galera.url(name, [1]))
    engines = [db.make_engine(galera.url(name, [i])) for i in (1, 2)]  # one writer per node
    sessions = [db.session_factory(e) for e in engines]
    with sessions[0]() as s, s.begin():
        s.add(models.Tenant(id="counter", display_name="counter", quota_instances=0))
    # Galera applies a write set on the other nodes after the commit returns: node 2 is made to catch up before
    # its writer reads the row (once applied there, every connection to it sees the row).
    with engines[1].connect() as conn:
        conn.execute(text("SET SESSION wsrep_sync_wait = 1"))
        assert conn.execute(text("SELECT COUNT(*) FROM tenants WHERE id = 'counter'")).scalar() == 1
    per_writer, calls, failures = 40, [0, 0], []
    start = threading.Barrier(2)

    def writer(i: int) -> None:
        def bump(s: Session) -> None:
            calls[i] += 1
            tenant = s.get(models.Tenant, "counter", with_for_update=True)
            assert tenant is not None
            tenant.quota_instances += 1
        start.wait()
        try:
            for _ in range(per_writer):
                db.run_transaction(sessions[i], bump, attempts=50)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not failures, failures
        # Every increment landed, read back through the third node.
        with db.make_engine(galera.url(name, [0])).connect() as conn:
            conn.execute(text("SET SESSION wsrep_sync_wait = 1"))
            total = conn.execute(text("SELECT quota_instances FROM tenants WHERE id = 'counter'")).scalar()
        assert total == 2 * per_writer
        # The two nodes did conflict (else this test proves nothing): some units of work ran again.
        assert sum(calls) > 2 * per_writer, calls
    finally:
        for e in engines:
            e.dispose()


def test_galera_error_codes_are_the_retried_ones() -> None:
    import pymysql
    from sqlalchemy.exc import IntegrityError, OperationalError
    deadlock = OperationalError("COMMIT", {}, pymysql.err.OperationalError(1213, "Deadlock found"))
    duplicate = IntegrityError("INSERT", {}, pymysql.err.IntegrityError(1062, "Duplicate entry"))
    assert db.is_retryable(deadlock)
    assert not db.is_retryable(duplicate)
    assert not db.is_retryable(ValueError("x"))


def _start_in_thread(path: Path, env: dict[str, str], go: threading.Barrier, up: list[Any],
                     stop: threading.Event) -> threading.Thread:
    def run() -> None:
        go.wait()
        try:
            with start_server(path, extra_env=env) as server:
                up.append(server)
                stop.wait(300)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            up.append(exc)
    t = threading.Thread(target=run)
    t.start()
    return t


def _create_and_list(server: RunningServer) -> list[str]:
    tid = f"g{uuid.uuid4().hex[:6]}"
    with server.channel(server.admin_files) as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        stub.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)), timeout=20)
        return [t.id for t in stub.ListTenants(admin_pb2.ListTenantsRequest(page_size=500), timeout=20).tenants]


def test_three_servers_started_at_once_migrate_once_and_survive_a_node_kill(galera: Galera, tmp_path: Path) -> None:
    name = f"servers_{uuid.uuid4().hex[:6]}"
    galera.create_database(name)
    url = galera.url(name)  # every server: node0 first, then node1, node2
    go, stop, up = threading.Barrier(3), threading.Event(), []
    threads = [_start_in_thread(tmp_path / f"s{i}", {"REDDWARF_DB_URL": url}, go, up, stop) for i in range(3)]
    try:
        for t in threads:
            t.join(timeout=0.1)
        import time
        deadline = time.monotonic() + 150
        while len(up) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        errors = [u for u in up if isinstance(u, BaseException)]
        assert not errors, [getattr(e, "stderr", e) for e in errors]
        servers: list[RunningServer] = [u for u in up if isinstance(u, RunningServer)]
        assert len(servers) == 3
        conn = galera.nodes[1].connect(database=name)
        with conn.cursor() as cur:
            cur.execute("SELECT version_num FROM alembic_version")
            assert [r[0] for r in cur.fetchall()] == [head()]
            cur.execute("SELECT COUNT(*) FROM flavors")
            assert cur.fetchone()[0] == len(db.FLAVORS)  # seeded once, not three times
            cur.execute(f"SELECT COUNT(*) FROM {db.LOCK_TABLE}")
            assert cur.fetchone()[0] == 0  # the schema lock was released
        conn.close()
        for server in servers:
            assert "Traceback" not in server.log(), server.log()[-3000:]
        made = [_create_and_list(s) for s in servers]
        assert len(made[-1]) >= 3

        # kill -9 the node all three write through: they move to node1 and keep serving.
        galera.nodes[0].kill()
        before = set(made[-1])
        for server in servers:
            tenants = _create_and_list(server)
            assert before <= set(tenants)
            before = set(tenants)
        assert galera.nodes[1].status("wsrep_cluster_size") == "2"
    finally:
        stop.set()
        for t in threads:
            t.join(60)

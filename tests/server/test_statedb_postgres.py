"""PostgreSQL 15 as the state database, for real (a private cluster run as the postgres user):

- every migration runs on it, and the migrated schema is the models' schema (Alembic finds nothing to add);
- migrating from several processes at once migrates once (pg_advisory_lock);
- a real server and the fake hostd take an instance through create → ACTIVE → list → delete on it.
"""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from reddwarf.server import db, models
from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import start_cluster
from tests.fixtures.postgres import Postgres, available, postgres_server
from tests.fixtures.waiting import until

pytestmark = pytest.mark.skipif(not available(), reason="postgresql-15 or the postgres user is missing")


@pytest.fixture(scope="module")
def pg() -> Any:
    with postgres_server() as server:
        yield server


def head() -> str:
    rev = ScriptDirectory.from_config(db.alembic_config("sqlite://")).get_current_head()
    assert rev
    return rev


def fresh(pg: Postgres) -> str:
    name = f"rd_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    return pg.url(name)


def test_every_migration_runs_and_matches_the_models(pg: Postgres) -> None:
    url = fresh(pg)
    db.upgrade(url)
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]
            diff = compare_metadata(MigrationContext.configure(conn), models.Base.metadata)
        assert not diff, diff  # the migrations build exactly what the models declare, on PostgreSQL too
        with db.session_factory(engine)() as s, s.begin():
            db.seed(s)
        with db.session_factory(engine)() as s:
            assert s.get(models.Flavor, "tiny") is not None
    finally:
        engine.dispose()


def test_several_processes_migrating_at_once_migrate_once(pg: Postgres) -> None:
    url = fresh(pg)
    # All three start migrating at the same instant (after their imports), not staggered by start-up.
    code = ("import sys, time; from reddwarf.server import db; time.sleep(max(0, float(sys.argv[2]) - time.time())); "
            "db.upgrade(sys.argv[1])")
    at = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", code, url, at], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1].decode()[-2000:] for o in outs]
    assert pg.psql("SELECT version_num FROM alembic_version", url.rsplit("/", 1)[1]) == head()


def test_a_server_on_postgres_creates_lists_and_deletes_an_instance(pg: Postgres, tmp_path: Path) -> None:
    url = fresh(pg)
    with start_cluster(tmp_path, server_env={"REDDWARF_DB_URL": url}, driver="fake") as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="pg-shop", flavor="tiny",
                                           volume=database_pb2.Volume(size_gb=1))), metadata=c.md)

        def get() -> database_pb2.Instance:
            return c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        done = until(get, lambda i: i.status in (database_pb2.INSTANCE_STATUS_ACTIVE,
                                                 database_pb2.INSTANCE_STATUS_ERROR) and not i.task,
                     timeout=60, what="pg-shop ACTIVE", interval=0.2)
        assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE, done.fault.message
        listed = c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances
        assert [i.name for i in listed] == [inst.name]
        # It is PostgreSQL that holds it, not a SQLite file beside the server.
        assert pg.psql(f"SELECT count(*) FROM instances WHERE id = '{inst.id}'", url.rsplit("/", 1)[1]) == "1"
        assert not (c.server.state_dir / "state.db").exists()
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)

        def gone() -> bool:
            try:
                get()
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                return True
            return False
        until(gone, bool, timeout=60, what="pg-shop gone", interval=0.2)
        assert not c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances
        assert "Traceback" not in c.server.log(), c.server.log()[-3000:]

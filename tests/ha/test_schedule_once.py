"""A due backup schedule fires once across every server: several processes' worth of schedulers (each with
its own engine and connections, as separate servers have) run the same due schedule at the same instant on
a real PostgreSQL and a real MariaDB state DB; exactly one backup and one task come of it, and next_run moved
on once. (On MariaDB's REPEATABLE READ the claim matters most: a scheduler reading an old snapshot would
otherwise see no task and submit a second backup.)"""
from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from reddwarf.common.clock import now
from reddwarf.common.states import InstanceStatus
from reddwarf.server import backups, db, models
from tests.fixtures.mariadb import mariadb_server
from tests.fixtures.postgres import available, postgres_server

SERVERS = 4


def _seed(url: str) -> str:
    sessions = db.session_factory(db.make_engine(url))
    iid = str(uuid.uuid4())
    with sessions() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="t1"))
        s.flush()
        s.add(models.Instance(id=iid, tenant_id="t1", display_name="sched", status=InstanceStatus.ACTIVE,
                              flavor_id="tiny", volume_size_gb=1, datastore="mariadb", datastore_version="10.11"))
        s.add(models.BackupSchedule(instance_id=iid, interval_seconds=3600, keep=3, full_every=1, runs=0,
                                    next_run=now() - dt.timedelta(seconds=5)))
    return iid


@pytest.fixture(params=["postgresql", "mariadb"])
def state_url(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"rd_{uuid.uuid4().hex[:8]}"
    if request.param == "postgresql":
        if not available():
            pytest.skip("postgresql-15 or the postgres user is missing")
        with postgres_server() as pg:
            pg.create_database(name)
            yield pg.url(name)
    else:
        with mariadb_server() as maria:
            conn = maria.connect()
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{name}`")  # a name made here, not by a user
            conn.close()
            yield maria.url(name)


def test_a_due_schedule_fires_once_when_several_servers_run_it_at_once(state_url: str) -> None:
    url = state_url
    db.upgrade(url)
    iid = _seed(url)
    apps = [type("App", (), {"sessions": db.session_factory(db.make_engine(url))})() for _ in range(SERVERS)]
    barrier = threading.Barrier(SERVERS)
    taken: list[int] = []
    errors: list[BaseException] = []

    def server(app: Any) -> None:
        try:
            barrier.wait()
            taken.append(backups.take_scheduled_backups(app))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    threads = [threading.Thread(target=server, args=(a,)) for a in apps]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(taken) == [0] * (SERVERS - 1) + [1]
    with apps[0].sessions() as s:
        assert s.scalar(select(func.count()).select_from(models.Backup)
                        .where(models.Backup.instance_id == iid)) == 1
        assert s.scalar(select(func.count()).select_from(models.Task)
                        .where(models.Task.resource == f"instances/{iid}")) == 1
        sch = s.get(models.BackupSchedule, iid)
        assert sch is not None and sch.runs == 1 and sch.next_run is not None and sch.next_run > now()

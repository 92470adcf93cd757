"""The state-database plumbing for several servers, on one real MariaDB (fast; Galera itself is in
test_statedb_galera.py): multi-host URLs fail over in order, and the schema lock row is exclusive while
held, released after, and taken over once a dead holder's lease has run out."""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from reddwarf.server import db
from tests.fixtures.mariadb import MariaDB, free_port, mariadb_server

USER, PASSWORD = "rd_statedb", "rd-statedb-pw"


@pytest.fixture(scope="module")
def maria() -> Iterator[MariaDB]:
    with mariadb_server() as server:
        conn = server.connect()
        with conn.cursor() as cur:
            cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (USER, PASSWORD))
            cur.execute(f"GRANT ALL ON *.* TO '{USER}'@'127.0.0.1'")
        conn.close()
        yield server


def fresh(maria: MariaDB, *ports: int) -> str:
    name = f"sdb_{uuid.uuid4().hex[:8]}"
    conn = maria.connect()
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{name}`")  # a name made here, not by a user
    conn.close()
    hosts = ",".join(f"127.0.0.1:{p}" for p in ports)
    return f"mysql+pymysql://{USER}:{PASSWORD}@{hosts}/{name}"


def test_a_multi_host_url_skips_a_dead_node(maria: MariaDB) -> None:
    dead = free_port()  # nothing listens there
    engine = db.make_engine(fresh(maria, dead, maria.port))
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT @@port")).scalar() == maria.port
    finally:
        engine.dispose()


def test_no_node_answering_names_every_node(maria: MariaDB) -> None:
    dead1, dead2 = free_port(), free_port()
    engine = db.make_engine(fresh(maria, maria.port).replace(f"127.0.0.1:{maria.port}",
                                                             f"127.0.0.1:{dead1},127.0.0.1:{dead2}"))
    try:
        with pytest.raises(OperationalError) as err, engine.connect():
            pass
        assert f"127.0.0.1:{dead1}" in str(err.value) and f"127.0.0.1:{dead2}" in str(err.value)
    finally:
        engine.dispose()


def test_the_schema_lock_is_exclusive_and_released(maria: MariaDB) -> None:
    url = fresh(maria, maria.port)
    held, order = threading.Event(), []

    def holder() -> None:
        with db.schema_lock(url):
            held.set()
            order.append("first in")
            time.sleep(1.5)
            order.append("first out")

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    with db.schema_lock(url, timeout=30):
        order.append("second in")
    t.join(30)
    assert order == ["first in", "first out", "second in"]
    engine = db.make_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text(f"SELECT COUNT(*) FROM {db.LOCK_TABLE}")).scalar() == 0
    finally:
        engine.dispose()


def test_a_lock_left_by_a_dead_holder_expires_and_a_live_one_times_out(maria: MariaDB) -> None:
    url = fresh(maria, maria.port)
    engine = db.make_engine(url)
    try:
        with db.schema_lock(url):
            pass  # makes the table
        with engine.begin() as conn:  # a holder that died: its lease already over
            conn.execute(text(f"INSERT INTO {db.LOCK_TABLE} VALUES (1, 'dead', UTC_TIMESTAMP() - INTERVAL 1 SECOND)"))
        db.upgrade(url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
        with engine.begin() as conn:  # a live holder: not taken over, the waiter gives up with a reason
            conn.execute(text(f"INSERT INTO {db.LOCK_TABLE} VALUES (1, 'alive', UTC_TIMESTAMP() + INTERVAL 1 HOUR)"))
        with pytest.raises(TimeoutError, match=db.LOCK_TABLE), db.schema_lock(url, timeout=1):
            pass
    finally:
        engine.dispose()

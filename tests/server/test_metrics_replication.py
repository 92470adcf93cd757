"""Replication lag in the guest's health report, read from a real MariaDB replica of a real primary: absent on
a server that replicates from nothing, a number while the replica runs, and "not running" (no lag) once its
SQL thread is stopped. Then what the heartbeat carries of it."""
from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from reddwarf.agent import convert
from reddwarf.agent.model import GuestHealth
from reddwarf.agent.mysql_admin import MysqlAdmin
from reddwarf.common.states import ServiceState
from tests.fixtures.mariadb import MariaDB, mariadb_server


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[MariaDB, MariaDB]]:
    with mariadb_server(("--log-bin=primary-bin", "--server-id=1")) as primary, \
            mariadb_server(("--server-id=2",)) as replica:
        with primary.connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY 'repl-pw'")
            cur.execute("GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1'")
        yield primary, replica


def test_a_server_replicating_from_nothing_reports_no_replication(pair):
    primary, _ = pair
    assert MysqlAdmin(lambda: primary.connect()).replication() is None


def test_a_running_replica_reports_its_lag_and_a_stopped_one_none(pair):
    primary, replica = pair
    admin = MysqlAdmin(lambda: replica.connect())
    with replica.connect() as conn, conn.cursor() as cur:
        cur.execute("CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s, MASTER_USER='repl', "
                    "MASTER_PASSWORD='repl-pw', MASTER_USE_GTID=no", (primary.port,))
        cur.execute("START SLAVE")
    with primary.connect() as conn, conn.cursor() as cur:
        cur.execute("CREATE DATABASE shop")
    deadline = time.monotonic() + 30
    while (state := admin.replication()) != (True, 0):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    with replica.connect() as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES LIKE 'shop'")
        assert cur.fetchone() is not None  # it really replicates
        cur.execute("STOP SLAVE SQL_THREAD")
    assert admin.replication() == (False, None)


def test_the_heartbeat_carries_replication_only_when_there_is_some():
    now = datetime.now(UTC)
    plain = convert.health_to_pb(GuestHealth(service_state=ServiceState.RUNNING, observed=now))
    assert not plain.HasField("replication_lag_seconds") and not plain.HasField("replication_running")
    caught_up = convert.health_to_pb(GuestHealth(service_state=ServiceState.RUNNING, observed=now,
                                                 replication_running=True, replication_lag_seconds=0))
    assert caught_up.HasField("replication_lag_seconds") and caught_up.replication_lag_seconds == 0
    assert caught_up.replication_running
    stopped = convert.health_to_pb(GuestHealth(service_state=ServiceState.RUNNING, observed=now,
                                               replication_running=False))
    assert stopped.HasField("replication_running") and not stopped.replication_running
    assert not stopped.HasField("replication_lag_seconds")

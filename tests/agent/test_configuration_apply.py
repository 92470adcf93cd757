"""Configuration overrides on a real mysqld prepared by the real MySQL driver: dynamic values show in SHOW
GLOBAL VARIABLES at once and persist in the my.cnf include (a restart keeps them); a static one waits for
a restart (restart pending, then in effect after it); removed values go back to the instance's defaults;
bad values and a SET that mysqld refuses half-way change nothing at all."""
from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pymysql
import pytest

from reddwarf.agent.commands import CommandRunner
from reddwarf.agent.model import Limits, Prepare, ServiceSpec
from reddwarf.agent.mycnf import size_for_limits
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.v1 import agent_pb2
from tests.fixtures.mariadb import free_port

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
              pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]

MIB = 1024 * 1024
LIMITS = Limits(memory_mb=1024)


@pytest.fixture
async def driver(tmp_path) -> AsyncIterator[MysqlDriver]:
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(tmp_path / "data"), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    try:
        yield d
    finally:
        await d.close()


async def prepared(d: MysqlDriver, configuration: dict[str, str] | None = None) -> MysqlDriver:
    await d.prepare(Prepare(services=(ServiceSpec("mariadb", version="10.11"),), limits=LIMITS,
                            configuration=configuration or {}))
    return d


def shown(d: MysqlDriver, *names: str) -> dict[str, str]:
    with d.mysqld.connect_root() as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN (" + ", ".join(["%s"] * len(names)) + ")", names)
        return dict(cur.fetchall())


def include(d: MysqlDriver) -> str:
    with open(d.config.include_path) as f:
        return f.read()


async def test_dynamic_values_apply_live_persist_in_the_include_and_survive_a_restart(driver: MysqlDriver) -> None:
    d = await prepared(driver)
    with open(d.mysqld.my_cnf_path) as f:
        assert f.read().rstrip().endswith(f"!include {d.config.include_path}")
    before = shown(d, "innodb_log_buffer_size")
    done = await d.apply_configuration({"max_connections": "222", "long_query_time": "1.5", "time_zone": "+02:00",
                                        "sql_mode": "strict_trans_tables,no_zero_date", "wait_timeout": "600"})
    assert not done.restart_required
    assert set(done.applied) == {"max_connections", "long_query_time", "time_zone", "sql_mode", "wait_timeout"}
    now = shown(d, "max_connections", "long_query_time", "time_zone", "sql_mode", "wait_timeout")
    assert now == {"max_connections": "222", "long_query_time": "1.500000", "time_zone": "+02:00",
                   "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE", "wait_timeout": "600"}
    text = include(d)
    assert "max_connections = 222" in text and 'sql_mode = "STRICT_TRANS_TABLES,NO_ZERO_DATE"' in text
    await d.restart()
    assert shown(d, "max_connections", "time_zone", "sql_mode") == {
        "max_connections": "222", "time_zone": "+02:00", "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE"}
    assert shown(d, "innodb_log_buffer_size") == before

    # Leaving the group: back to the flavor's sizes (the main my.cnf) or MariaDB's own defaults, live.
    gone = await d.apply_configuration({"long_query_time": "1.5"})
    assert not gone.restart_required
    _, conns = size_for_limits(LIMITS)
    back = shown(d, "max_connections", "time_zone", "wait_timeout", "long_query_time")
    assert back == {"max_connections": str(conns), "time_zone": "SYSTEM", "wait_timeout": "28800",
                    "long_query_time": "1.500000"}
    assert "max_connections" not in include(d)


async def test_a_static_value_waits_for_a_restart_and_is_in_effect_after_it(driver: MysqlDriver) -> None:
    d = await prepared(driver)
    default = shown(d, "innodb_log_buffer_size")["innodb_log_buffer_size"]
    done = await d.apply_configuration({"innodb_log_buffer_size": str(32 * MIB), "max_connections": "300"})
    assert done.restart_required and done.applied == ("max_connections",)
    assert shown(d, "innodb_log_buffer_size", "max_connections") == {
        "innodb_log_buffer_size": default, "max_connections": "300"}
    # Asked again before the restart: still pending (the running mysqld has the old value).
    assert (await d.apply_configuration({"innodb_log_buffer_size": str(32 * MIB),
                                         "max_connections": "300"})).restart_required
    await d.restart()
    assert shown(d, "innodb_log_buffer_size")["innodb_log_buffer_size"] == str(32 * MIB)
    assert not (await d.apply_configuration({"innodb_log_buffer_size": str(32 * MIB),
                                             "max_connections": "300"})).restart_required
    # Removing it needs a restart again; putting it back before one does not.
    assert (await d.apply_configuration({})).restart_required
    assert not (await d.apply_configuration({"innodb_log_buffer_size": str(32 * MIB)})).restart_required


async def test_a_group_given_at_prepare_is_in_effect_from_the_first_start_without_a_restart(
        driver: MysqlDriver) -> None:
    d = await prepared(driver, {"innodb_log_buffer_size": str(8 * MIB), "max_connections": "77"})
    assert shown(d, "innodb_log_buffer_size", "max_connections") == {
        "innodb_log_buffer_size": str(8 * MIB), "max_connections": "77"}
    assert not d.config.restart_pending(d.mysqld.supervisor.pid if d.mysqld.supervisor else None)


async def test_bad_values_change_nothing_and_name_the_field(driver: MysqlDriver) -> None:
    d = await prepared(driver)
    await d.apply_configuration({"max_connections": "150"})
    text = include(d)
    for values, field in [
        ({"max_connections": "500", "sql_mode": "STRICT_TRANS_TABLES'; DROP DATABASE mysql; --"}, "values.sql_mode"),
        ({"max_connections": "500", "time_zone": "+01:00\n[mysqld]\ninit_file=/tmp/x"}, "values.time_zone"),
        ({"max_connections": "500", "wait_timeout": "0"}, "values.wait_timeout"),
        ({"max_connections": "500", "init_file": "/tmp/x.sql"}, "values.init_file"),
        ({"max_connections": "500", "innodb_buffer_pool_size": str(1000 * MIB)}, "values.innodb_buffer_pool_size"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            await d.apply_configuration(values)
        assert err.value.violations[0][0] == field
        assert shown(d, "max_connections") == {"max_connections": "150"}
        assert include(d) == text


class RefusingConnection:
    """A real connection to the guest's mysqld whose cursor refuses one SET, as mysqld would refuse a value
    (the failure cannot be provoked with a value the rules accept, so it is injected here)."""

    def __init__(self, conn: Any, refuse: str) -> None:
        self._conn, self._refuse = conn, refuse

    def cursor(self) -> Any:
        real = self._conn.cursor()
        refuse = self._refuse

        class Cursor:
            def __enter__(self) -> Cursor:
                return self

            def __exit__(self, *exc: object) -> None:
                real.close()

            def execute(self, sql: str, args: Any = None) -> Any:
                if sql.startswith(f"SET GLOBAL {refuse} ") and args is not None:
                    raise pymysql.err.OperationalError(1231, f"Variable '{refuse}' can't be set")
                return real.execute(sql, args)

            def fetchall(self) -> Any:
                return real.fetchall()
        return Cursor()

    def close(self) -> None:
        self._conn.close()


async def test_a_set_refused_half_way_puts_back_what_was_set_and_writes_nothing(driver: MysqlDriver) -> None:
    d = await prepared(driver)
    await d.apply_configuration({"max_connections": "150", "wait_timeout": "700"})
    text = include(d)
    real_connect = d.config._connect
    d.config._connect = lambda: RefusingConnection(real_connect(), "wait_timeout")
    try:
        with pytest.raises(FailedPrecondition, match="nothing was changed") as err:
            # Applied in name order: long_query_time and max_connections are set before wait_timeout fails.
            await d.apply_configuration({"long_query_time": "3", "max_connections": "400", "wait_timeout": "900"})
        assert err.value.violations[0][0] == "values.wait_timeout"
    finally:
        d.config._connect = real_connect
    assert shown(d, "max_connections", "wait_timeout", "long_query_time") == {
        "max_connections": "150", "wait_timeout": "700", "long_query_time": "2.000000"}
    assert include(d) == text


async def test_the_command_table_applies_through_the_driver(driver: MysqlDriver) -> None:
    d = await prepared(driver)

    async def no_progress(percent: int, message: str, done: int) -> None:
        return None
    res = await CommandRunner(d).run(agent_pb2.Command(command_id="cfg-1", apply_configuration=agent_pb2.ApplyConfiguration(
        values={"max_connections": "199", "performance_schema": "ON"})), no_progress)
    assert res.configuration_applied.restart_required and list(res.configuration_applied.applied) == ["max_connections"]
    assert shown(d, "max_connections") == {"max_connections": "199"}

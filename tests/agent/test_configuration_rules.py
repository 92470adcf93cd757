"""The configuration parameter rules against a real MariaDB (the session's mariadbd), and their validation:
every rule names a variable of SHOW GLOBAL VARIABLES, every dynamic one really takes SET GLOBAL with a value
the rule accepts (bound as a parameter, as the agent does), every static one is read-only; and values of the
wrong type, out of range, unknown, beyond the flavor's memory or carrying SQL / my.cnf syntax are refused
with the field named."""
from __future__ import annotations

import os
import re
import shutil

import pymysql
import pytest

from reddwarf.common import parameters as params
from reddwarf.common.errors import InvalidArgument, NotFound
from tests.fixtures.mariadb import MariaDB

RULES = params.rules_for("mariadb", "10.11")
needs_mariadb = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mariadbd"),
                                   reason="needs root and the MariaDB server package")


def sample(r: params.Rule, current: str) -> str:
    """A value the rule accepts, as close to the server's current one as the rule allows."""
    if r.type == "integer":
        n = int(current)
        lo = int(r.min) if r.min is not None else n
        hi = int(params.max_for(r, 4096) or n)
        return str(min(max(n, lo), hi))
    if r.type == "float":
        return params.canonical(r, str(min(max(float(current), float(r.min or 0)), float(r.max or 0))), "v")
    if r.type == "boolean":
        return params.canonical(r, current, "v")
    if r.name == "time_zone":
        return "+01:00"
    try:
        return params.canonical(r, current, "v")
    except InvalidArgument:
        return r.allowed[0]


def test_there_are_at_least_forty_rules_including_the_commonly_tuned_ones() -> None:
    assert len(RULES) >= 40
    for name in ("max_connections", "sql_mode", "time_zone", "character_set_server", "long_query_time",
                 "innodb_buffer_pool_size", "innodb_log_file_size", "wait_timeout"):
        assert name in RULES
    assert {r.type for r in RULES.values()} == {"integer", "string", "boolean", "float"}
    assert any(r.restart_required for r in RULES.values()) and any(r.dynamic for r in RULES.values())


@needs_mariadb
def test_every_rule_is_a_real_variable_dynamic_ones_take_set_global_static_ones_are_read_only(
        mariadb: MariaDB) -> None:
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES")
        current = {k: v for k, v in cur.fetchall()}
        missing = sorted(set(RULES) - set(current))
        assert not missing, f"not variables of this MariaDB: {missing}"
        not_settable, not_read_only = [], []
        for r in RULES.values():
            value = params.sql_value(r, sample(r, current[r.name]))
            try:
                cur.execute(f"SET GLOBAL {r.name} = %s", (value,))
                if not r.dynamic:
                    not_read_only.append(r.name)
            except pymysql.err.MySQLError as exc:
                if r.dynamic:
                    not_settable.append(f"{r.name}={value!r}: {exc.args}")
                elif exc.args[0] != 1238:  # ER_INCORRECT_GLOBAL_LOCAL_VAR: read only
                    not_read_only.append(f"{r.name}: {exc.args}")
            finally:
                if r.dynamic:
                    # Put the session server back as it was for the other tests.
                    try:
                        cur.execute(f"SET GLOBAL {r.name} = %s", (params.sql_value(r, current[r.name])
                                                                  if r.type != "string" else current[r.name],))
                    except pymysql.err.MySQLError:
                        cur.execute(f"SET GLOBAL {r.name} = DEFAULT")
        assert not not_settable, f"dynamic rules MariaDB refuses with SET GLOBAL: {not_settable}"
        assert not not_read_only, f"static rules MariaDB lets SET GLOBAL change: {not_read_only}"


@needs_mariadb
def test_a_changed_dynamic_value_shows_in_show_global_variables(mariadb: MariaDB) -> None:
    with mariadb.connect() as conn, conn.cursor() as cur:
        for name, raw in (("max_connections", "123"), ("long_query_time", "1.5"), ("time_zone", "+02:00"),
                          ("sql_mode", "strict_trans_tables,no_zero_date"), ("wait_timeout", "600")):
            r = RULES[name]
            cur.execute("SHOW GLOBAL VARIABLES LIKE %s", (name,))
            before = cur.fetchone()[1]
            try:
                cur.execute(f"SET GLOBAL {name} = %s", (params.sql_value(r, params.canonical(r, raw, name)),))
                cur.execute("SHOW GLOBAL VARIABLES LIKE %s", (name,))
                shown = cur.fetchone()[1]
                assert shown.split(".")[0] == params.canonical(r, raw, name).split(".")[0] \
                    if r.type != "float" else float(shown) == float(raw)
            finally:
                cur.execute(f"SET GLOBAL {name} = %s", (params.sql_value(r, before) if r.type != "string" else before,))


def test_values_become_their_canonical_text() -> None:
    v = params.validate("mariadb", "10.11", {
        "max_connections": " 500 ", "slow_query_log": "true", "autocommit": "0", "long_query_time": "2.50",
        "sql_mode": "strict_trans_tables, NO_ZERO_DATE,STRICT_TRANS_TABLES", "character_set_server": "UTF8MB4",
        "time_zone": "+2:00", "tx_isolation": "read-committed", "innodb_change_buffering": "ALL"})
    assert v == {"max_connections": "500", "slow_query_log": "ON", "autocommit": "OFF", "long_query_time": "2.5",
                 "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE", "character_set_server": "utf8mb4",
                 "time_zone": "+02:00", "tx_isolation": "READ-COMMITTED", "innodb_change_buffering": "all"}
    assert params.validate("mariadb", "10.11", {"sql_mode": ""}) == {"sql_mode": ""}
    assert params.sql_value(RULES["max_connections"], "500") == 500
    assert params.sql_value(RULES["long_query_time"], "2.5") == 2.5


@pytest.mark.parametrize(("name", "value", "why"), [
    ("max_connections", "many", "must be an integer"),
    ("max_connections", "1e3", "must be an integer"),
    ("max_connections", "5", "between 10 and"),
    ("max_connections", "100001", "between 10 and"),
    ("wait_timeout", "-1", "between 1 and"),
    ("long_query_time", "-1", "non-negative number"),
    ("long_query_time", "NaN", "non-negative number"),
    ("slow_query_log", "maybe", "ON or OFF"),
    ("character_set_server", "klingon", "must be one of"),
    ("time_zone", "+14:00", "between -12:59 and +13:00"),
    ("time_zone", "Europe/Paris", "SYSTEM or an offset"),
    ("sql_mode", "ORACLE", "may combine only"),
    ("sql_mode", "STRICT_TRANS_TABLES'; DROP DATABASE mysql; --", "may combine only"),
    ("sql_mode", "STRICT_TRANS_TABLES\ninit_file = /tmp/evil.sql", "may combine only"),
    ("sql_mode", 'STRICT_TRANS_TABLES"', "may combine only"),
    ("time_zone", "+01:00'; SET GLOBAL read_only=1; --", "SYSTEM or an offset"),
    ("max_connections", "100; DROP TABLE x", "must be an integer"),
    ("max_connections", "100\n[mysqld]\ninit_file=/x", "must be an integer"),
    ("default_storage_engine", "InnoDB#", "must be one of"),
])
def test_a_bad_value_is_refused_naming_its_field(name: str, value: str, why: str) -> None:
    with pytest.raises(InvalidArgument, match=re.escape(why)) as err:
        params.validate("mariadb", "10.11", {"max_connections": "100", name: value})
    assert err.value.violations[0][0] == f"values.{name}"


def test_an_unknown_parameter_or_version_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        params.validate("mariadb", "10.11", {"init_file": "/tmp/x.sql"})
    assert err.value.violations[0][0] == "values.init_file"
    with pytest.raises(NotFound):
        params.validate("mariadb", "9.9", {"max_connections": "100"})


def test_the_buffer_pool_is_bounded_by_the_flavors_memory() -> None:
    ok = params.validate("mariadb", "10.11", {"innodb_buffer_pool_size": str(768 * params.MIB)}, memory_mb=1024)
    assert ok["innodb_buffer_pool_size"] == str(768 * params.MIB)
    with pytest.raises(InvalidArgument, match="three quarters of the flavor's memory") as err:
        params.validate("mariadb", "10.11", {"innodb_buffer_pool_size": str(769 * params.MIB)}, memory_mb=1024)
    assert err.value.violations[0][0] == "values.innodb_buffer_pool_size"
    # Without a flavor (a group not attached yet) only the rule's own bound applies.
    params.validate("mariadb", "10.11", {"innodb_buffer_pool_size": str(4096 * params.MIB)})


def test_my_cnf_lines_quote_strings_and_keep_numbers_bare() -> None:
    lines = params.cnf_lines(RULES, {"max_connections": "200", "sql_mode": "STRICT_TRANS_TABLES,NO_ZERO_DATE",
                                     "slow_query_log": "ON"})
    assert lines == ["max_connections = 200", "slow_query_log = ON",
                     'sql_mode = "STRICT_TRANS_TABLES,NO_ZERO_DATE"']


@needs_mariadb
def test_every_allowed_value_of_every_dynamic_string_rule_is_taken_by_set_global(mariadb: MariaDB) -> None:
    refused = []
    with mariadb.connect() as conn, conn.cursor() as cur:
        for r in RULES.values():
            if r.type != "string" or not r.dynamic or not r.allowed:
                continue
            cur.execute("SHOW GLOBAL VARIABLES LIKE %s", (r.name,))
            before = cur.fetchone()[1]
            for value in r.allowed:
                try:
                    cur.execute(f"SET GLOBAL {r.name} = %s", (value,))
                except pymysql.err.MySQLError as exc:
                    refused.append(f"{r.name}={value}: {exc.args[1]}")
            cur.execute(f"SET GLOBAL {r.name} = %s", (before,))
    assert not refused, refused


@needs_mariadb
def test_mariadbd_reads_every_rule_as_my_cnf_writes_it(tmp_path) -> None:
    """mysqld refuses to start on a my.cnf option it does not know (time_zone is default-time-zone there): every
    rule, rendered as the agent renders it, is an option mariadbd accepts."""
    import subprocess
    values = {r.name: sample(r, str(r.min if r.min is not None else "")) if r.type in ("integer", "float")
              else (r.allowed[0] if r.allowed else "+01:00") for r in RULES.values()}
    cnf = tmp_path / "all.cnf"
    cnf.write_text("[mysqld]\n" + "\n".join(params.cnf_lines(RULES, values)) + "\n")
    out = subprocess.run(["mariadbd", f"--defaults-file={cnf}", "--user=root", "--help", "--verbose"],
                         capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if "[ERROR]" in line]
    assert not errors, errors

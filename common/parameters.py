"""The rules of the MariaDB parameters a configuration group may set, per datastore version, and the one
validation both the server (before it stores or sends anything) and the guest agent (before it runs a SET)
apply. A value passes only as the canonical text of its rule's type; strings pass only from an allowed list
or a strict pattern, so no quote, semicolon, comment or newline can reach SQL or my.cnf.

The rules are data (RULES below); tests/agent/test_configuration_rules.py checks them against a real
MariaDB: every name is in SHOW GLOBAL VARIABLES, every dynamic one takes SET GLOBAL, every static one is
read-only there.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .errors import InvalidArgument, NotFound

ParamType = Literal["integer", "string", "boolean", "float"]

MIB = 1024 * 1024
# A buffer pool may take at most this share of the flavor's memory: the rest is for per-connection
# buffers, the log buffer and the agent, all inside the same memory limit.
BUFFER_POOL_SHARE = (3, 4)

_INT = re.compile(r"^-?[0-9]{1,20}$")
_FLOAT = re.compile(r"^[0-9]{1,12}(\.[0-9]{1,6})?$")
_BOOLEANS = {"ON": "ON", "OFF": "OFF", "1": "ON", "0": "OFF", "TRUE": "ON", "FALSE": "OFF"}
# UTC offsets MariaDB takes for time_zone (-12:59 .. +13:00) and SYSTEM; named zones need the guest's
# time zone tables, which are not loaded.
_TIME_ZONE = re.compile(r"^(SYSTEM|[+-][0-9]{1,2}:[0-5][0-9])$")

# The sql_mode flags a tenant may combine. Left out: the compatibility modes (ORACLE, MSSQL, DB2,
# POSTGRESQL, MAXDB, MYSQL323, MYSQL40) that change how the agent's own administration SQL parses, and
# NO_BACKSLASH_ESCAPES, which changes how its quoted values read.
SQL_MODES = ("ALLOW_INVALID_DATES", "ANSI", "ANSI_QUOTES", "EMPTY_STRING_IS_NULL", "ERROR_FOR_DIVISION_BY_ZERO",
             "HIGH_NOT_PRECEDENCE", "IGNORE_BAD_TABLE_OPTIONS", "IGNORE_SPACE", "NO_AUTO_CREATE_USER",
             "NO_AUTO_VALUE_ON_ZERO", "NO_DIR_IN_CREATE", "NO_ENGINE_SUBSTITUTION", "NO_FIELD_OPTIONS",
             "NO_KEY_OPTIONS", "NO_TABLE_OPTIONS", "NO_UNSIGNED_SUBTRACTION", "NO_ZERO_DATE", "NO_ZERO_IN_DATE",
             "ONLY_FULL_GROUP_BY", "PAD_CHAR_TO_FULL_LENGTH", "PIPES_AS_CONCAT", "REAL_AS_FLOAT",
             "SIMULTANEOUS_ASSIGNMENT", "STRICT_ALL_TABLES", "STRICT_TRANS_TABLES", "TIME_ROUND_FRACTIONAL",
             "TRADITIONAL")
CHARSETS = ("ascii", "binary", "latin1", "utf8mb3", "utf8mb4", "utf16", "utf32", "ucs2")
COLLATIONS = ("ascii_general_ci", "ascii_bin", "binary", "latin1_swedish_ci", "latin1_general_ci", "latin1_bin",
              "utf8mb3_general_ci", "utf8mb3_bin", "utf8mb3_unicode_ci", "utf8mb4_general_ci", "utf8mb4_bin",
              "utf8mb4_unicode_ci", "utf8mb4_unicode_520_ci", "utf8mb4_nopad_bin", "utf16_general_ci",
              "utf32_general_ci", "ucs2_general_ci")


@dataclass(frozen=True)
class Rule:
    """One parameter: its type, bounds or allowed values, and whether SET GLOBAL applies it (dynamic) or
    only a restart of mysqld does (restart_required)."""
    name: str
    type: ParamType
    dynamic: bool
    min: int | float | None = None
    max: int | float | None = None
    allowed: tuple[str, ...] = ()
    # The value is a comma-separated set of `allowed` items (sql_mode), "" included.
    is_set: bool = False
    # The upper bound is a share of the flavor's memory (BUFFER_POOL_SHARE), below `max`.
    flavor_bound: bool = False
    description: str = ""
    # Its name in my.cnf where that is not the variable's name (time_zone is set by default-time-zone).
    option: str = ""

    @property
    def restart_required(self) -> bool:
        return not self.dynamic


def _i(name: str, lo: int, hi: int, dynamic: bool = True, description: str = "", flavor_bound: bool = False) -> Rule:
    return Rule(name, "integer", dynamic, lo, hi, flavor_bound=flavor_bound, description=description)


def _f(name: str, lo: float, hi: float, description: str = "") -> Rule:
    return Rule(name, "float", True, lo, hi, description=description)


def _b(name: str, dynamic: bool = True, description: str = "") -> Rule:
    return Rule(name, "boolean", dynamic, allowed=("ON", "OFF"), description=description)


def _s(name: str, allowed: tuple[str, ...], dynamic: bool = True, description: str = "") -> Rule:
    return Rule(name, "string", dynamic, allowed=allowed, description=description)


G = 1024 * MIB
YEAR = 31536000

# MariaDB 10.11 (Debian 12's mariadb-server). Checked against the real server by the rules test.
MARIADB_10_11: tuple[Rule, ...] = (
    # connections and timeouts
    _i("max_connections", 10, 100000, description="most simultaneous client connections"),
    _i("max_connect_errors", 1, 4294967295),
    _i("wait_timeout", 1, YEAR, description="seconds an idle connection is kept"),
    _i("interactive_timeout", 1, YEAR),
    _i("connect_timeout", 2, YEAR),
    _i("net_read_timeout", 1, YEAR),
    _i("net_write_timeout", 1, YEAR),
    _i("lock_wait_timeout", 1, YEAR),
    _i("max_allowed_packet", 1024, G),
    _i("thread_cache_size", 0, 16384),
    _i("back_log", 1, 65535, dynamic=False),
    _s("thread_handling", ("one-thread-per-connection", "pool-of-threads"), dynamic=False),
    # SQL behaviour
    Rule("sql_mode", "string", True, allowed=SQL_MODES, is_set=True,
         description="comma-separated sql_mode flags (the compatibility modes and NO_BACKSLASH_ESCAPES excluded)"),
    Rule("time_zone", "string", True, description="SYSTEM or a UTC offset from -12:59 to +13:00",
         option="default-time-zone"),
    _s("character_set_server", CHARSETS),
    _s("collation_server", COLLATIONS),
    _s("default_storage_engine", ("InnoDB", "Aria", "MyISAM", "MEMORY")),
    Rule("tx_isolation", "string", True, allowed=("READ-UNCOMMITTED", "READ-COMMITTED", "REPEATABLE-READ",
                                                  "SERIALIZABLE"), option="transaction-isolation"),
    _b("autocommit"),
    _b("explicit_defaults_for_timestamp"),
    _i("group_concat_max_len", 4, 4294967295),
    _i("max_sp_recursion_depth", 0, 255),
    _i("div_precision_increment", 0, 30),
    _i("max_prepared_stmt_count", 0, 1048576),
    _f("max_statement_time", 0, YEAR, description="seconds a query may run; 0 = no limit"),
    # logging
    _b("slow_query_log"),
    _f("long_query_time", 0, YEAR, description="seconds after which a query is logged as slow"),
    _b("log_queries_not_using_indexes"),
    _i("min_examined_row_limit", 0, 4294967295),
    _i("log_warnings", 0, 9),
    _b("event_scheduler"),
    # caches and buffers
    _i("table_open_cache", 10, 1048576),
    _i("table_definition_cache", 400, 2097152),
    _i("table_open_cache_instances", 1, 64, dynamic=False),
    _i("tmp_table_size", 1024, 4 * G),
    _i("max_heap_table_size", 16384, 4 * G),
    _i("sort_buffer_size", 32768, 256 * MIB),
    _i("join_buffer_size", 128, 256 * MIB),
    _i("read_buffer_size", 8192, 256 * MIB),
    _i("read_rnd_buffer_size", 1, 256 * MIB),
    _i("key_buffer_size", 8, 4 * G),
    _i("query_cache_size", 0, G),
    _i("query_cache_limit", 0, G),
    _i("ft_min_word_len", 1, 84, dynamic=False),
    _i("ft_max_word_len", 10, 84, dynamic=False),
    # InnoDB
    _i("innodb_buffer_pool_size", 32 * MIB, 64 * G, flavor_bound=True,
       description="bytes; at most three quarters of the flavor's memory"),
    _i("innodb_log_file_size", 4 * MIB, 4 * G, description="bytes (resized online since MariaDB 10.9)"),
    _i("innodb_log_buffer_size", MIB, G, dynamic=False),
    _i("innodb_flush_log_at_trx_commit", 0, 3),
    _s("innodb_flush_method", ("fsync", "O_DSYNC", "littlesync", "nosync", "O_DIRECT", "O_DIRECT_NO_FSYNC"),
       dynamic=False),
    _i("innodb_io_capacity", 100, 1000000),
    _i("innodb_io_capacity_max", 100, 2000000),
    _i("innodb_lock_wait_timeout", 1, 1073741824),
    _i("innodb_read_io_threads", 1, 64),
    _i("innodb_write_io_threads", 1, 64),
    _i("innodb_purge_threads", 1, 32),
    _f("innodb_max_dirty_pages_pct", 0, 99.999),
    _b("innodb_file_per_table"),
    _b("innodb_stats_on_metadata"),
    _b("innodb_strict_mode"),
    _b("innodb_adaptive_hash_index"),
    _b("innodb_deadlock_detect"),
    _b("innodb_print_all_deadlocks"),
    _b("innodb_doublewrite", dynamic=False),
    _s("innodb_change_buffering", ("none", "inserts", "deletes", "changes", "purges", "all")),
    _i("innodb_autoinc_lock_mode", 0, 2, dynamic=False),
    _i("innodb_open_files", 10, 1048576, dynamic=False),
    _i("innodb_ft_min_token_size", 0, 16, dynamic=False),
    _i("innodb_sort_buffer_size", 65536, 64 * MIB, dynamic=False),
    _b("performance_schema", dynamic=False),
)

# MariaDB 11.8 (Debian 13's mariadb-server), compared with 10.11 by `mariadbd --verbose --help` of both
# templates: the same names and defaults but for these.
# - innodb_change_buffering is gone (11.0 removed the change buffer);
# - collation_server defaults to utf8mb4_uca1400_ai_ci, and the UCA 14.0 collations are offered;
# - innodb_doublewrite also takes `fast` in 11.8; kept as the ON/OFF boolean, static as in 10.11 (not
#   checked against a running 11.8 whether it became dynamic: a needless restart is the safe error).
COLLATIONS_11_8 = COLLATIONS + ("utf8mb4_uca1400_ai_ci", "utf8mb4_uca1400_as_cs", "utf8mb4_uca1400_nopad_ai_ci")
_DROPPED_IN_11 = {"innodb_change_buffering"}
MARIADB_11_8: tuple[Rule, ...] = tuple(
    _s("collation_server", COLLATIONS_11_8) if r.name == "collation_server" else r
    for r in MARIADB_10_11 if r.name not in _DROPPED_IN_11)

# (datastore, version) → its rules by name.
RULES: dict[tuple[str, str], dict[str, Rule]] = {
    ("mariadb", "10.11"): {r.name: r for r in MARIADB_10_11},
    ("mariadb", "11.8"): {r.name: r for r in MARIADB_11_8},
}


def rules_for(datastore: str, version: str, field: str = "datastore_version") -> dict[str, Rule]:
    """The parameter rules of a datastore version; NOT_FOUND when it has none."""
    rules = RULES.get((datastore, version))
    if rules is None:
        raise NotFound(f"no configuration parameters are defined for {datastore} {version}", field=field)
    return rules


def rule(datastore: str, version: str, name: str, field: str = "name") -> Rule:
    r = rules_for(datastore, version).get(name)
    if r is None:
        raise NotFound(f"{datastore} {version} has no configurable parameter {name[:64]!r}", field=field)
    return r


def buffer_pool_cap(memory_mb: int) -> int:
    """The largest innodb_buffer_pool_size (bytes) a flavor of memory_mb allows."""
    num, den = BUFFER_POOL_SHARE
    return memory_mb * MIB * num // den


def max_for(r: Rule, memory_mb: int | None) -> int | float | None:
    """The rule's upper bound, lowered by the flavor's memory when it is flavor-bound and one is known."""
    if r.flavor_bound and memory_mb and r.max is not None:
        return min(int(r.max), buffer_pool_cap(memory_mb))
    return r.max


def canonical(r: Rule, value: str, field: str, memory_mb: int | None = None) -> str:
    """The value as its rule's canonical text, or InvalidArgument naming the field: wrong type, out of range,
    not an allowed value, or anything else (quotes, separators, newlines) that no rule accepts."""
    if not isinstance(value, str) or len(value) > 1024:
        raise InvalidArgument(f"{r.name} must be a {r.type} of at most 1024 characters", field=field)
    v = value.strip()
    if r.type == "integer":
        if not _INT.match(v):
            raise InvalidArgument(f"{r.name} must be an integer, got {value[:40]!r}", field=field)
        n = int(v)
        hi = max_for(r, memory_mb)
        if (r.min is not None and n < r.min) or (hi is not None and n > hi):
            why = " (three quarters of the flavor's memory)" if r.flavor_bound and hi != r.max else ""
            raise InvalidArgument(f"{r.name} must be between {r.min} and {hi}{why}, got {n}", field=field)
        return str(n)
    if r.type == "float":
        if not _FLOAT.match(v):
            raise InvalidArgument(f"{r.name} must be a non-negative number, got {value[:40]!r}", field=field)
        x = float(v)
        if (r.min is not None and x < r.min) or (r.max is not None and x > r.max):
            raise InvalidArgument(f"{r.name} must be between {r.min} and {r.max}, got {v}", field=field)
        return repr(x) if x != int(x) else str(int(x))
    if r.type == "boolean":
        b = _BOOLEANS.get(v.upper())
        if b is None:
            raise InvalidArgument(f"{r.name} must be ON or OFF (1/0, true/false), got {value[:40]!r}", field=field)
        return b
    if r.name == "time_zone":
        m = _TIME_ZONE.match(v.upper() if v.upper() == "SYSTEM" else v)
        if not m:
            raise InvalidArgument(f"time_zone must be SYSTEM or an offset such as +02:00, got {value[:40]!r}",
                                  field=field)
        if v.upper() == "SYSTEM":
            return "SYSTEM"
        sign, hh, mm = v[0], int(v[1:].split(":")[0]), int(v.split(":")[1])
        minutes = (hh * 60 + mm) * (-1 if sign == "-" else 1)
        if not -(12 * 60 + 59) <= minutes <= 13 * 60:
            raise InvalidArgument(f"time_zone must be between -12:59 and +13:00, got {v}", field=field)
        return f"{sign}{hh:02d}:{mm:02d}"
    by_upper = {a.upper(): a for a in r.allowed}
    if r.is_set:
        items = [p.strip().upper() for p in v.split(",")] if v else []
        bad = [p for p in items if p not in by_upper]
        if bad:
            raise InvalidArgument(f"{r.name} may combine only {', '.join(r.allowed)}; {bad[0][:40]!r} is not one",
                                  field=field)
        return ",".join(dict.fromkeys(by_upper[p] for p in items))
    if v.upper() not in by_upper:
        raise InvalidArgument(f"{r.name} must be one of {', '.join(r.allowed)}, got {value[:40]!r}", field=field)
    return by_upper[v.upper()]


def validate(datastore: str, version: str, values: Mapping[str, str], memory_mb: int | None = None,
             field: str = "values") -> dict[str, str]:
    """Every value checked (names known, each canonical) before anything uses any of them: the canonical
    values, or the first InvalidArgument, naming `field.<name>`."""
    rules = rules_for(datastore, version)
    out: dict[str, str] = {}
    for name in sorted(values):
        r = rules.get(name)
        if r is None:
            raise InvalidArgument(f"{datastore} {version} has no configurable parameter {name[:64]!r}",
                                  field=f"{field}.{name[:64]}")
        out[name] = canonical(r, values[name], f"{field}.{name}", memory_mb)
    for low, high in PAIRS:
        if low in out and high in out and float(out[low]) > float(out[high]):
            raise InvalidArgument(f"{low} ({out[low]}) may not exceed {high} ({out[high]})", field=f"{field}.{low}")
    return out


# Parameters that bound each other: the first may not exceed the second when both are set.
PAIRS = (("innodb_io_capacity", "innodb_io_capacity_max"), ("ft_min_word_len", "ft_max_word_len"))


def sql_value(r: Rule, canonical_value: str) -> int | float | str:
    """The value to bind in `SET GLOBAL <name> = %s`: numbers as numbers (MariaDB refuses a quoted number
    for a numeric variable), the rest as a string the driver quotes."""
    if r.type == "integer":
        return int(canonical_value)
    if r.type == "float":
        return float(canonical_value)
    return canonical_value


def cnf_lines(rules: Mapping[str, Rule], values: Mapping[str, str]) -> list[str]:
    """my.cnf lines for validated values (`option = value`; strings quoted, they may hold commas)."""
    out = []
    for name in sorted(values):
        r = rules[name]
        v = values[name]
        option = r.option or name
        out.append(f'{option} = "{v}"' if r.type == "string" else f"{option} = {v}")
    return out

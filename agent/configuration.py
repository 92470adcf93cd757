"""A guest's configuration overrides (its configuration group): validated against the parameter rules, the
dynamic ones set live with SET GLOBAL (all or none: what was set is put back if any SET fails), then all of
them written to the my.cnf include that the main my.cnf names last. A static parameter whose value differs
from the one the running mysqld started with leaves a restart pending.

Blocking (pymysql and files); the driver runs it in a thread. Parameter names reach SQL only after they
matched a rule (a fixed identifier); values only as bound parameters.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pymysql

from reddwarf.common import parameters
from reddwarf.common.errors import FailedPrecondition, Internal, Unavailable

from .model import ConfigurationApplied as Applied

INCLUDE_HEADER = ("# Written by the Red Dwarf agent: the instance's configuration group. Read after the lines of\n"
                  "# the main my.cnf, so these values win.\n")

Connect = Callable[[], "pymysql.connections.Connection[Any]"]
SqlValue = int | float | str


@dataclass
class _Record:
    """Kept beside the include: its values, and the static values the running mysqld (pid) started with."""
    values: dict[str, str] = field(default_factory=dict)
    started_with: dict[str, str] = field(default_factory=dict)
    pid: int = 0


class ConfigurationOverrides:
    """The overrides of one guest's mysqld. `defaults` are the values the main my.cnf gives (flavor-sized
    buffer pool, max_connections, ...): a parameter removed from the group goes back to them, any other to
    MariaDB's own DEFAULT."""

    def __init__(self, state_dir: str, connect: Connect, datastore: str = "mariadb", version: str = "10.11") -> None:
        self.include_path = os.path.join(state_dir, "configuration.cnf")
        self._record_path = os.path.join(state_dir, "configuration.json")
        self._connect = connect
        self.datastore, self.version = datastore, version

    # the record and the include --------------------------------------------------------------------

    def _read(self) -> _Record:
        try:
            with open(self._record_path) as f:
                data = json.load(f)
            return _Record(dict(data.get("values", {})), dict(data.get("started_with", {})), int(data.get("pid", 0)))
        except (OSError, ValueError, AttributeError):
            return _Record()

    def _write_atomic(self, path: str, text: str) -> None:
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)

    def _save(self, rec: _Record) -> None:
        self._write_atomic(self._record_path, json.dumps({"values": rec.values, "started_with": rec.started_with,
                                                          "pid": rec.pid}))

    def render_include(self, values: Mapping[str, str]) -> str:
        rules = parameters.rules_for(self.datastore, self.version)
        lines = parameters.cnf_lines(rules, values)
        return INCLUDE_HEADER + ("[mysqld]\n" + "\n".join(lines) + "\n" if lines else "")

    def ensure_include(self) -> None:
        """The include exists (empty at first): my.cnf names it, and mysqld refuses a missing include."""
        if not os.path.exists(self.include_path):
            self._write_atomic(self.include_path, INCLUDE_HEADER)

    def write_initial(self, values: Mapping[str, str], memory_mb: int | None) -> None:
        """Before mysqld first starts (prepare): the group's values, validated, straight into the include."""
        checked = parameters.validate(self.datastore, self.version, values, memory_mb)
        self._write_atomic(self.include_path, self.render_include(checked))
        self._save(_Record(values=checked))

    def values(self) -> dict[str, str]:
        return self._read().values

    def _static(self, values: Mapping[str, str]) -> dict[str, str]:
        rules = parameters.rules_for(self.datastore, self.version)
        return {k: v for k, v in values.items() if k in rules and not rules[k].dynamic}

    def _seen(self, rec: _Record, pid: int | None) -> _Record:
        """A mysqld with a new pid read the include as it stood when it started: its static values are the
        running ones from then on."""
        if pid and pid != rec.pid:
            rec.started_with, rec.pid = self._static(rec.values), pid
        return rec

    def restart_pending(self, pid: int | None) -> bool:
        rec = self._seen(self._read(), pid)
        return self._static(rec.values) != rec.started_with

    # applying -----------------------------------------------------------------------------------------

    def _current(self, cur: Any, names: list[str]) -> dict[str, str]:
        if not names:
            return {}
        marks = ", ".join(["%s"] * len(names))
        cur.execute(f"SHOW GLOBAL VARIABLES WHERE Variable_name IN ({marks})", names)
        return {str(k): str(v) for k, v in cur.fetchall()}

    @staticmethod
    def _as_sql(r: parameters.Rule, shown: str) -> SqlValue:
        """A value as SHOW GLOBAL VARIABLES gave it, to bind when putting it back."""
        if r.type == "integer":
            return int(shown)
        if r.type == "float":
            return float(shown)
        return shown

    def apply(self, values: Mapping[str, str], memory_mb: int | None, defaults: Mapping[str, SqlValue],
              pid: int | None) -> Applied:
        """Makes `values` the whole set of overrides. Everything is validated before the first SET; the
        dynamic changes are set live in order and, if one fails, those already set are put back and nothing
        is written; the include is written only after every SET succeeded."""
        rules = parameters.rules_for(self.datastore, self.version)
        wanted = parameters.validate(self.datastore, self.version, values, memory_mb)
        rec = self._seen(self._read(), pid)
        changes: dict[str, SqlValue | None] = {}  # None: back to the default
        for name, v in wanted.items():
            if rules[name].dynamic and rec.values.get(name) != v:
                changes[name] = parameters.sql_value(rules[name], v)
        for name in rec.values:
            if name not in wanted and name in rules and rules[name].dynamic:
                changes[name] = defaults.get(name)
        order = sorted(changes)
        # innodb_io_capacity may not exceed innodb_io_capacity_max at any moment (MariaDB clamps it rather than
        # refusing): when both change, a second pass sets them again, which settles either direction.
        again = [n for n in ("innodb_io_capacity_max", "innodb_io_capacity") if n in changes] \
            if "innodb_io_capacity" in changes and "innodb_io_capacity_max" in changes else []
        done: list[str] = []
        before: dict[str, str] = {}
        try:
            conn = self._connect()
        except pymysql.err.OperationalError as exc:
            raise Unavailable(f"mysqld is not accepting connections ({exc.args[0]})") from None
        try:
            with conn.cursor() as cur:
                before = self._current(cur, order)
                try:
                    for name in order + again:
                        value = changes[name]
                        # The name matched a rule: a fixed identifier, never the caller's text.
                        if value is None:
                            cur.execute(f"SET GLOBAL {rules[name].name} = DEFAULT")
                        else:
                            cur.execute(f"SET GLOBAL {rules[name].name} = %s", (value,))
                        if name not in done:
                            done.append(name)
                    rec.values = wanted
                    self._write_atomic(self.include_path, self.render_include(wanted))
                    self._save(rec)
                except (pymysql.err.MySQLError, OSError) as exc:
                    self._put_back(cur, rules, done, before)
                    if isinstance(exc, OSError):
                        raise Internal(f"could not write the configuration include: {exc}") from None
                    code = exc.args[0] if exc.args else 0
                    name = next((n for n in order if n not in done), "values")
                    raise FailedPrecondition(f"mysqld refused {name} (error {code}): {exc.args[-1]}; nothing was "
                                             "changed", field=f"values.{name}") from None
        finally:
            conn.close()
        return Applied(restart_required=self._static(rec.values) != rec.started_with, applied=tuple(done))

    def _put_back(self, cur: Any, rules: Mapping[str, parameters.Rule], done: list[str],
                  before: Mapping[str, str]) -> None:
        for name in reversed(done):
            if name in before:
                try:
                    cur.execute(f"SET GLOBAL {rules[name].name} = %s", (self._as_sql(rules[name], before[name]),))
                except pymysql.err.MySQLError as exc:  # noqa: PERF203 - each one is put back on its own
                    raise Internal(f"could not put {name} back after a failed change: {exc.args}") from None

    def reapply(self, names: tuple[str, ...]) -> None:
        """Sets the recorded values of these parameters again (after a resize set its own sizes live)."""
        rules = parameters.rules_for(self.datastore, self.version)
        rec = self._read()
        todo = [n for n in names if n in rec.values and n in rules and rules[n].dynamic]
        if not todo:
            return
        try:
            conn = self._connect()
        except pymysql.err.OperationalError as exc:
            raise Unavailable(f"mysqld is not accepting connections ({exc.args[0]})") from None
        try:
            with conn.cursor() as cur:
                for n in todo:
                    cur.execute(f"SET GLOBAL {rules[n].name} = %s", (parameters.sql_value(rules[n], rec.values[n]),))
        except pymysql.err.MySQLError as exc:
            raise Internal(f"mysqld refused a configuration value after a resize: {exc.args}") from None
        finally:
            conn.close()


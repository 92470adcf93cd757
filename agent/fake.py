"""A datastore driver with no mysqld, for testing and benchmarking the agent's stream itself (never used in
a real guest). Every state change is appended to <state_dir>/fake-actions.log so tests can count them."""
from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from reddwarf.common import names, parameters
from reddwarf.common.errors import AlreadyExists, NotFound
from reddwarf.common.states import ServiceState

from .datastore import DatastoreDriver, ProgressFn, no_progress
from .logs import LOG_TYPES, GuestLogs, LogFiles, LogInfo, LogRead, LogSwitches, ReadSpec, check_log_name
from .model import (
    ConfigurationApplied,
    Database,
    DatabasePage,
    GuestHealth,
    Limits,
    Prepare,
    RootCredentials,
    RootStatus,
    User,
    UserPage,
    UserUpdate,
)


class FakeLogs:
    """Logs with no mysqld: the fake datastore writes its statements into them itself."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.files = LogFiles(directory, max_bytes=64 * 1024, keep=2)
        self.switches = LogSwitches()

    def write(self, name: str, line: str) -> None:
        if self.switches.enabled(name):
            with open(self.files.path(name), "a") as f:
                f.write(line + "\n")

    async def list_logs(self) -> list[LogInfo]:
        return [self._info(n) for n in LOG_TYPES]

    def _info(self, name: str) -> LogInfo:
        return LogInfo(name, LOG_TYPES[name], self.switches.enabled(name), self.files.size(name),
                       self.files.max_bytes * 3, self.switches.long_query_time if name == "slow_query" else 0.0)

    async def set_log(self, name: str, enabled: bool, long_query_time: float) -> LogInfo:
        check_log_name(name)
        if name != "error":
            self.switches = dataclasses.replace(self.switches, **{name: enabled})
        if long_query_time:
            self.switches = dataclasses.replace(self.switches, long_query_time=long_query_time)
        return self._info(name)

    async def read_log(self, spec: ReadSpec) -> LogRead:
        return self.files.read(spec)

    def rotate_due(self) -> list[str]:
        due = [n for n in LOG_TYPES if self.files.needs_rotation(n)]
        for n in due:
            self.files.rotate(n)
        return due


class FakeDriver(DatastoreDriver):
    capabilities = ("fake",)

    def __init__(self, state_dir: str) -> None:
        self.log_path = os.path.join(state_dir, "fake-actions.log")
        self._logs = FakeLogs(os.path.join(state_dir, "logs"))
        self.dbs: set[str] = set()
        self.users: dict[tuple[str, str], set[str]] = {}
        self.root = False
        self.memory_mb = 0
        # Configuration overrides, and the static ones the pretend mysqld last started with.
        self.config: dict[str, str] = {}
        self.started_static: dict[str, str] = {}

    def _act(self, what: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(what + "\n")
        # Every action is a "statement" the fake's general log sees, and a slow one for its slow log.
        self._logs.write("general", f"Query\t{what}")
        self._logs.write("slow_query", f"# Query_time: 0.000001\n{what};")

    def logs(self) -> GuestLogs:
        return self._logs

    async def prepare(self, spec: Prepare, progress: ProgressFn = no_progress) -> None:
        await progress(50, "pretending")
        self.memory_mb = spec.limits.memory_mb
        if spec.configuration:
            self.config = parameters.validate("mariadb", "10.11", spec.configuration, self.memory_mb or None,
                                              "configuration")
            self.started_static = self._static(self.config)
        self._logs.write("error", "[Note] fake datastore: ready for connections")
        self._act("prepare")
        # What a real prepare makes besides mysqld: the initial databases and users.
        self.dbs.update(d.name for d in spec.databases)
        for u in spec.users:
            self.users[(u.name, u.host or "%")] = set(u.databases)

    async def create_databases(self, databases: Sequence[Database]) -> None:
        for i, d in enumerate(databases):
            names.validate_database(d.name, f"databases[{i}].database")
            if d.name in self.dbs:
                raise AlreadyExists(f"database {d.name} exists", field=f"databases[{i}].database")
        for d in databases:
            self.dbs.add(d.name)
            self._act(f"create_database {d.name}")
        if any(d.name.startswith("slow") for d in databases):
            await asyncio.sleep(3)  # lets tests cut the stream while a command runs

    async def delete_database(self, database: str) -> None:
        if database not in self.dbs:
            raise NotFound(f"database {database} does not exist", field="database")
        self.dbs.discard(database)
        self._act(f"delete_database {database}")

    async def list_databases(self, page_size: int, page_token: str) -> DatabasePage:
        return DatabasePage(databases=tuple(Database(name=d) for d in sorted(self.dbs)))

    async def create_users(self, users: Sequence[User]) -> None:
        for u in users:
            self.users[(u.name, u.host or "%")] = set(u.databases)
            self._act(f"create_user {u.name}")

    async def delete_user(self, user: str, host: str) -> None:
        if self.users.pop((user, host or "%"), None) is None:
            raise NotFound(f"user {user} does not exist", field="user")

    async def get_user(self, user: str, host: str) -> User:
        if (user, host or "%") not in self.users:
            raise NotFound(f"user {user} does not exist", field="user")
        return User(name=user, host=host or "%", databases=tuple(sorted(self.users[(user, host or "%")])))

    async def update_user(self, update: UserUpdate) -> None:
        await self.get_user(update.user, update.host)

    async def grant_access(self, user: str, host: str, databases: Sequence[str]) -> None:
        await self.get_user(user, host)
        self.users[(user, host or "%")].update(databases)

    async def revoke_access(self, user: str, host: str, database: str) -> None:
        await self.get_user(user, host)
        self.users[(user, host or "%")].discard(database)

    async def list_users(self, page_size: int, page_token: str) -> UserPage:
        return UserPage(users=tuple(User(name=u, host=h) for (u, h) in sorted(self.users)))

    async def enable_root(self) -> RootCredentials:
        self.root = True
        self._act("enable_root")
        return RootCredentials(user="root", password=os.urandom(12).hex())

    async def disable_root(self) -> None:
        self.root = False

    async def root_status(self) -> RootStatus:
        return RootStatus(enabled=self.root)

    async def start(self) -> None:
        self.started_static = self._static(self.config)
        self._act("start")

    @staticmethod
    def _static(values: dict[str, str]) -> dict[str, str]:
        rules = parameters.rules_for("mariadb", "10.11")
        return {k: v for k, v in values.items() if not rules[k].dynamic}

    async def apply_configuration(self, values: Mapping[str, str]) -> ConfigurationApplied:
        checked = parameters.validate("mariadb", "10.11", values, self.memory_mb or None)
        rules = parameters.rules_for("mariadb", "10.11")
        live = tuple(sorted(k for k in set(checked) | set(self.config)
                            if rules[k].dynamic and checked.get(k) != self.config.get(k)))
        self.config = checked
        self._act("apply_configuration " + ",".join(f"{k}={v}" for k, v in sorted(checked.items())))
        return ConfigurationApplied(restart_required=self._static(checked) != self.started_static, applied=live)

    async def stop(self) -> None:
        self._act("stop")

    async def apply_limits(self, limits: Limits) -> None:
        self._act(f"apply_limits {limits.memory_mb}")

    async def health(self) -> GuestHealth:
        return GuestHealth(service_state=ServiceState.RUNNING, observed=datetime.now(UTC),
                           accepting_connections=True)

"""A datastore driver with no mysqld, for testing and benchmarking the agent's stream itself (never used in
a real guest). Every state change is appended to <state_dir>/fake-actions.log so tests can count them."""
from __future__ import annotations

import asyncio
import os

from reddwarf.common import names
from reddwarf.common.errors import AlreadyExists, NotFound
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2

from .datastore import DatastoreDriver, ProgressFn, no_progress


class FakeDriver(DatastoreDriver):
    capabilities = ("fake",)

    def __init__(self, state_dir: str) -> None:
        self.log_path = os.path.join(state_dir, "fake-actions.log")
        self.dbs: set[str] = set()
        self.users: dict[tuple[str, str], set[str]] = {}
        self.root = False

    def _act(self, what: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(what + "\n")

    async def prepare(self, spec: agent_pb2.Prepare, progress: ProgressFn = no_progress) -> None:
        await progress(50, "pretending")
        self._act("prepare")
        # What a real prepare makes besides mysqld: the initial databases and users.
        self.dbs.update(d.database for d in spec.databases)
        for u in spec.users:
            self.users[(u.user, u.host or "%")] = set(u.databases)

    async def create_databases(self, databases: list[common_pb2.Database]) -> None:
        for i, d in enumerate(databases):
            names.validate_database(d.database, f"databases[{i}].database")
            if d.database in self.dbs:
                raise AlreadyExists(f"database {d.database} exists", field=f"databases[{i}].database")
        for d in databases:
            self.dbs.add(d.database)
            self._act(f"create_database {d.database}")
        if any(d.database.startswith("slow") for d in databases):
            await asyncio.sleep(3)  # lets tests cut the stream while a command runs

    async def delete_database(self, database: str) -> None:
        if database not in self.dbs:
            raise NotFound(f"database {database} does not exist", field="database")
        self.dbs.discard(database)
        self._act(f"delete_database {database}")

    async def list_databases(self, page_size: int, page_token: str) -> agent_pb2.DatabaseList:
        return agent_pb2.DatabaseList(databases=[common_pb2.Database(database=d) for d in sorted(self.dbs)])

    async def create_users(self, users: list[common_pb2.User]) -> None:
        for u in users:
            self.users[(u.user, u.host or "%")] = set(u.databases)
            self._act(f"create_user {u.user}")

    async def delete_user(self, user: str, host: str) -> None:
        if self.users.pop((user, host or "%"), None) is None:
            raise NotFound(f"user {user} does not exist", field="user")

    async def get_user(self, user: str, host: str) -> common_pb2.User:
        if (user, host or "%") not in self.users:
            raise NotFound(f"user {user} does not exist", field="user")
        return common_pb2.User(user=user, host=host or "%", databases=sorted(self.users[(user, host or "%")]))

    async def update_user(self, req: agent_pb2.UpdateUser) -> None:
        await self.get_user(req.user, req.host)

    async def grant_access(self, user: str, host: str, databases: list[str]) -> None:
        await self.get_user(user, host)
        self.users[(user, host or "%")].update(databases)

    async def revoke_access(self, user: str, host: str, database: str) -> None:
        await self.get_user(user, host)
        self.users[(user, host or "%")].discard(database)

    async def list_users(self, page_size: int, page_token: str) -> agent_pb2.UserList:
        return agent_pb2.UserList(users=[common_pb2.User(user=u, host=h) for (u, h) in sorted(self.users)])

    async def enable_root(self) -> database_pb2.RootCredentials:
        self.root = True
        self._act("enable_root")
        return database_pb2.RootCredentials(user="root", password=os.urandom(12).hex())

    async def disable_root(self) -> None:
        self.root = False

    async def root_status(self) -> database_pb2.RootStatus:
        return database_pb2.RootStatus(enabled=self.root)

    async def start(self) -> None:
        self._act("start")

    async def stop(self) -> None:
        self._act("stop")

    async def apply_limits(self, limits: common_pb2.Limits) -> None:
        self._act(f"apply_limits {limits.memory_mb}")

    async def health(self) -> common_pb2.GuestHealth:
        h = common_pb2.GuestHealth(service_state=common_pb2.SERVICE_STATE_RUNNING, accepting_connections=True)
        h.observed.GetCurrentTime()
        return h

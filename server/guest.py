"""Databases, Users and Root: validated here, executed by the instance's own guest agent.

Every identifier is validated (common/names.py) before it leaves the server and again in the guest, where
it is quoted; nothing is concatenated into SQL. The root password is generated in the guest and returned
once; the server never stores it (only that root was enabled).
"""
from __future__ import annotations

import asyncio
from typing import Any

from google.protobuf import empty_pb2

from reddwarf.common import names
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, grpc_edge
from reddwarf.common.states import InstanceStatus
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2, database_pb2_grpc

from . import models
from .agents import AgentRegistry
from .app import App, Context
from .auth import current_principal
from .instance_views import derived_status, owned_instance

COMMAND_TIMEOUT = 120


def split_child(name: str, collection: str, field: str) -> tuple[str, str]:
    """"instances/<id>/<collection>/<child>" → (instance name, child)."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "instances" or parts[2] != collection or not parts[1] or not parts[3]:
        raise InvalidArgument(f"{field} must be instances/<id>/{collection}/<name>, got {name[:100]!r}", field=field)
    return f"instances/{parts[1]}", parts[3]


def split_user(name: str, field: str = "name") -> tuple[str, str, str]:
    inst, at = split_child(name, "users", field)
    user, sep, host = at.rpartition("@")
    if not sep:
        user, host = at, "%"
    names.validate_user(user, field)
    names.validate_host(host, field)
    return inst, user, host


class GuestBase:
    def __init__(self, app: App, registry: AgentRegistry) -> None:
        self.app = app
        self.registry = registry

    def _ready(self, context: Context, name: str, field: str) -> str:
        p = current_principal(context)
        with self.app.sessions() as s:
            row = owned_instance(s, p, name, field)
            status, _ = derived_status(s, row, self.app.settings.heartbeat_expiry_seconds)
            if status not in (InstanceStatus.ACTIVE, InstanceStatus.RESTART_REQUIRED) \
                    or not self.registry.is_connected(row.id):
                raise FailedPrecondition(f"instance {row.id} is {status}; this needs an ACTIVE instance", field=field)
            return row.id

    async def _call(self, iid: str, **command: Any) -> agent_pb2.CommandResult:
        return await self.registry.call(iid, agent_pb2.Command(**command), timeout=COMMAND_TIMEOUT)


class DatabasesServicer(GuestBase, database_pb2_grpc.DatabasesServicer):
    @grpc_edge
    async def CreateDatabase(self, request: database_pb2.CreateDatabaseRequest,
                             context: Context) -> common_pb2.Database:
        names.validate_database(request.database.database, "database.database")
        iid = self._ready(context, request.parent, "parent")
        await self._call(iid, create_databases=agent_pb2.CreateDatabases(databases=[request.database]))
        out = common_pb2.Database()
        out.CopyFrom(request.database)
        out.name = f"instances/{iid}/databases/{request.database.database}"
        return out

    @grpc_edge
    async def ListDatabases(self, request: database_pb2.ListDatabasesRequest,
                            context: Context) -> database_pb2.ListDatabasesResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        iid = self._ready(context, request.parent, "parent")
        res = await self._call(iid, list_databases=agent_pb2.ListDatabases(page_size=request.page_size,
                                                                          page_token=request.page_token))
        dbs = list(res.databases.databases)
        for d in dbs:
            d.name = f"instances/{iid}/databases/{d.database}"
        return database_pb2.ListDatabasesResponse(databases=dbs, next_page_token=res.databases.next_page_token)

    @grpc_edge
    async def DeleteDatabase(self, request: database_pb2.DeleteDatabaseRequest,
                             context: Context) -> empty_pb2.Empty:
        inst, db = split_child(request.name, "databases", "name")
        names.validate_database(db, "name")
        iid = self._ready(context, inst, "name")
        await self._call(iid, delete_database=agent_pb2.DeleteDatabase(database=db))
        return empty_pb2.Empty()


class UsersServicer(GuestBase, database_pb2_grpc.UsersServicer):
    def _named(self, iid: str, u: common_pb2.User) -> common_pb2.User:
        u.name = f"instances/{iid}/users/{u.user}@{u.host or '%'}"
        u.password = ""
        return u

    @grpc_edge
    async def CreateUser(self, request: database_pb2.CreateUserRequest, context: Context) -> common_pb2.User:
        u = request.user
        names.validate_user(u.user, "user.user")
        if u.host:
            names.validate_host(u.host, "user.host")
        names.validate_password(u.password, "user.password")
        for i, d in enumerate(u.databases):
            names.validate_database(d, f"user.databases[{i}]")
        iid = self._ready(context, request.parent, "parent")
        await self._call(iid, create_users=agent_pb2.CreateUsers(users=[u]))
        out = common_pb2.User()
        out.CopyFrom(u)
        return self._named(iid, out)

    @grpc_edge
    async def GetUser(self, request: database_pb2.GetUserRequest, context: Context) -> common_pb2.User:
        inst, user, host = split_user(request.name)
        iid = self._ready(context, inst, "name")
        res = await self._call(iid, get_user=agent_pb2.GetUser(user=user, host=host))
        return self._named(iid, res.user)

    @grpc_edge
    async def ListUsers(self, request: database_pb2.ListUsersRequest,
                        context: Context) -> database_pb2.ListUsersResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field="page_size")
        iid = self._ready(context, request.parent, "parent")
        res = await self._call(iid, list_users=agent_pb2.ListUsers(page_size=request.page_size,
                                                                  page_token=request.page_token))
        return database_pb2.ListUsersResponse(users=[self._named(iid, u) for u in res.users.users],
                                              next_page_token=res.users.next_page_token)

    @grpc_edge
    async def DeleteUser(self, request: database_pb2.DeleteUserRequest, context: Context) -> empty_pb2.Empty:
        inst, user, host = split_user(request.name)
        iid = self._ready(context, inst, "name")
        await self._call(iid, delete_user=agent_pb2.DeleteUser(user=user, host=host))
        return empty_pb2.Empty()

    @grpc_edge
    async def UpdateUser(self, request: database_pb2.UpdateUserRequest, context: Context) -> common_pb2.User:
        inst, user, host = split_user(request.name)
        if request.password:
            names.validate_password(request.password, "password")
        if request.new_user:
            names.validate_user(request.new_user, "new_user")
        if request.new_host:
            names.validate_host(request.new_host, "new_host")
        if not (request.password or request.new_user or request.new_host):
            raise InvalidArgument("nothing to change: give password, new_user or new_host", field="password")
        iid = self._ready(context, inst, "name")
        await self._call(iid, update_user=agent_pb2.UpdateUser(user=user, host=host, password=request.password,
                                                               new_user=request.new_user, new_host=request.new_host))
        res = await self._call(iid, get_user=agent_pb2.GetUser(user=request.new_user or user,
                                                               host=request.new_host or host))
        return self._named(iid, res.user)

    @grpc_edge
    async def GrantAccess(self, request: database_pb2.GrantAccessRequest,
                          context: Context) -> common_pb2.User:
        inst, user, host = split_user(request.name)
        if not request.databases:
            raise InvalidArgument("databases must name at least one database", field="databases")
        for i, d in enumerate(request.databases):
            names.validate_database(d, f"databases[{i}]")
        iid = self._ready(context, inst, "name")
        await self._call(iid, grant_access=agent_pb2.GrantAccess(user=user, host=host, databases=list(request.databases)))
        res = await self._call(iid, get_user=agent_pb2.GetUser(user=user, host=host))
        return self._named(iid, res.user)

    @grpc_edge
    async def RevokeAccess(self, request: database_pb2.RevokeAccessRequest,
                           context: Context) -> common_pb2.User:
        inst, user, host = split_user(request.name)
        names.validate_database(request.database, "database")
        iid = self._ready(context, inst, "name")
        await self._call(iid, revoke_access=agent_pb2.RevokeAccess(user=user, host=host, database=request.database))
        res = await self._call(iid, get_user=agent_pb2.GetUser(user=user, host=host))
        return self._named(iid, res.user)

    @grpc_edge
    async def ListAccess(self, request: database_pb2.ListAccessRequest,
                         context: Context) -> database_pb2.ListAccessResponse:
        inst, user, host = split_user(request.name)
        iid = self._ready(context, inst, "name")
        res = await self._call(iid, get_user=agent_pb2.GetUser(user=user, host=host))
        return database_pb2.ListAccessResponse(databases=list(res.user.databases))


class RootServicer(GuestBase, database_pb2_grpc.RootServicer):
    @grpc_edge
    async def EnableRoot(self, request: database_pb2.EnableRootRequest,
                         context: Context) -> database_pb2.RootCredentials:
        iid = self._ready(context, request.name, "name")
        res = await self._call(iid, enable_root=agent_pb2.EnableRoot())
        await asyncio.to_thread(self._mark, iid, True)
        return res.root_credentials  # shown once; the server keeps only the fact that root was enabled

    @grpc_edge
    async def DisableRoot(self, request: database_pb2.DisableRootRequest,
                          context: Context) -> empty_pb2.Empty:
        iid = self._ready(context, request.name, "name")
        await self._call(iid, disable_root=agent_pb2.DisableRoot())
        await asyncio.to_thread(self._mark, iid, False)
        return empty_pb2.Empty()

    @grpc_edge
    async def GetRootStatus(self, request: database_pb2.GetRootStatusRequest,
                            context: Context) -> database_pb2.RootStatus:
        iid = self._ready(context, request.name, "name")
        res = await self._call(iid, get_root_status=agent_pb2.GetRootStatus())
        return res.root_status

    def _mark(self, iid: str, enabled: bool) -> None:
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Instance, iid)
            if row is not None:
                row.root_enabled = enabled

"""The command table: for each command of agent.proto's Command oneof, by its name, the handler that turns
it into a call on the datastore driver or its backups. Messages become the agent's own values here, and
what the call returns becomes a CommandResult (agent/convert.py)."""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NamedTuple

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, ok_status
from reddwarf.v1 import agent_pb2

from . import convert, upgrade
from .convert import Outcome
from .datastore import Backups, DatastoreDriver
from .logs import GuestLogs, LogList
from .model import Download, Progress, Upload


class Transfer(NamedTuple):
    """The backup bytes' own calls to the server, valid while a stream is up."""
    upload: Upload
    download: Download


@dataclass(frozen=True)
class Call:
    """What a handler may use: the driver, its backups, the server's transfer calls, the progress report."""
    driver: DatastoreDriver
    backups_or_none: Backups | None
    transfer_or_none: Transfer | None
    progress: Progress
    state_dir: str = ""  # the agent's own (agent upgrades unpack builds there)

    async def report(self, percent: int, message: str) -> None:
        await self.progress(percent, message, 0)

    @property
    def backups(self) -> Backups:
        if self.backups_or_none is None or self.transfer_or_none is None:
            raise FailedPrecondition("backups are not available in this guest", field="command")
        return self.backups_or_none

    @property
    def logs(self) -> GuestLogs:
        logs = self.driver.logs()
        if logs is None:
            raise FailedPrecondition("this guest's datastore keeps no logs", field="command")
        return logs

    @property
    def transfer(self) -> Transfer:
        assert self.transfer_or_none is not None  # checked with the backups
        return self.transfer_or_none


Handler = Callable[[Call, agent_pb2.Command], Awaitable[Outcome]]

COMMANDS: dict[str, Handler] = {
    "prepare": lambda c, cmd: c.driver.prepare(convert.prepare_from_pb(cmd.prepare), c.report),
    "create_databases": lambda c, cmd: c.driver.create_databases(
        [convert.database_from_pb(d) for d in cmd.create_databases.databases]),
    "delete_database": lambda c, cmd: c.driver.delete_database(cmd.delete_database.database),
    "list_databases": lambda c, cmd: c.driver.list_databases(cmd.list_databases.page_size,
                                                             cmd.list_databases.page_token),
    "create_users": lambda c, cmd: c.driver.create_users([convert.user_from_pb(u) for u in cmd.create_users.users]),
    "delete_user": lambda c, cmd: c.driver.delete_user(cmd.delete_user.user, cmd.delete_user.host),
    "get_user": lambda c, cmd: c.driver.get_user(cmd.get_user.user, cmd.get_user.host),
    "update_user": lambda c, cmd: c.driver.update_user(convert.user_update_from_pb(cmd.update_user)),
    "grant_access": lambda c, cmd: c.driver.grant_access(cmd.grant_access.user, cmd.grant_access.host,
                                                         list(cmd.grant_access.databases)),
    "revoke_access": lambda c, cmd: c.driver.revoke_access(cmd.revoke_access.user, cmd.revoke_access.host,
                                                           cmd.revoke_access.database),
    "list_users": lambda c, cmd: c.driver.list_users(cmd.list_users.page_size, cmd.list_users.page_token),
    "enable_root": lambda c, cmd: c.driver.enable_root(),
    "disable_root": lambda c, cmd: c.driver.disable_root(),
    "get_root_status": lambda c, cmd: c.driver.root_status(),
    "restart": lambda c, cmd: c.driver.restart(),
    "stop": lambda c, cmd: c.driver.stop(),
    "start": lambda c, cmd: c.driver.start(),
    "apply_limits": lambda c, cmd: c.driver.apply_limits(convert.limits_from_pb(cmd.apply_limits.limits)),
    "get_health": lambda c, cmd: c.driver.health(),
    "backup": lambda c, cmd: c.backups.backup(cmd.backup.backup_id, cmd.backup.incremental_from_lsn,
                                              c.transfer.upload, c.progress),
    "restore": lambda c, cmd: c.backups.restore(list(cmd.restore.backup_ids), list(cmd.restore.sha256),
                                                c.transfer.download, c.progress),
    "table_checksums": lambda c, cmd: c.backups.table_checksums(),
    "mysql_tls_request": lambda c, cmd: c.driver.mysql_tls_request(),
    "apply_configuration": lambda c, cmd: c.driver.apply_configuration(dict(cmd.apply_configuration.values)),
    "list_logs": lambda c, cmd: _list_logs(c),
    "set_log": lambda c, cmd: _set_log(c, cmd.set_log),
    "read_log": lambda c, cmd: c.logs.read_log(convert.read_spec_from_pb(cmd.read_log)),
    "upgrade_agent": lambda c, cmd: _upgrade_agent(c, cmd.upgrade_agent),
    "install_mysql_tls": lambda c, cmd: c.driver.install_mysql_tls(cmd.install_mysql_tls.tls_cert_pem,
                                                                   cmd.install_mysql_tls.tls_ca_pem),
}

# Reads that change nothing: answered afresh when replayed, never kept in the results record (a tail polls
# read_log every second; keeping each piece of a log on disk would only fill the guest).
UNRECORDED = frozenset({"list_logs", "read_log"})


async def _upgrade_agent(c: Call, pb: agent_pb2.UpgradeAgent) -> None:
    if not c.state_dir:
        raise FailedPrecondition("this agent has no state dir to unpack a build into", field="command")
    await upgrade.upgrade(c.state_dir, pb)


async def _list_logs(c: Call) -> LogList:
    return LogList(tuple(await c.logs.list_logs()))


async def _set_log(c: Call, pb: agent_pb2.SetLog) -> LogList:
    return LogList((await c.logs.set_log(pb.log, pb.enabled, pb.long_query_time),))


class CommandRunner:
    """Runs one command through the table: its result, or the domain error it raised."""

    def __init__(self, driver: DatastoreDriver, backups: Backups | None = None, state_dir: str = "") -> None:
        self.driver = driver
        self.backups = backups
        self.state_dir = state_dir
        self.transfer: Transfer | None = None  # set by the stream while it is connected

    async def run(self, cmd: agent_pb2.Command, progress: Progress) -> agent_pb2.CommandResult:
        kind = cmd.WhichOneof("command")
        handler = COMMANDS.get(kind or "")
        if handler is None:
            raise InvalidArgument(f"unknown command {kind!r}", field="command")
        res = convert.result_to_pb(await handler(Call(self.driver, self.backups, self.transfer, progress,
                                                      self.state_dir), cmd))
        res.command_id = cmd.command_id
        res.status.CopyFrom(ok_status())
        return res

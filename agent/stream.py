"""The guest agent's one connection: an outbound mTLS bidirectional stream to the control server.

The guest opens no port. It dials out, says Hello (its instance id, which the server checks against the
certificate), then runs the commands it is sent and heartbeats its health. Commands carry ids and their
results are kept on disk, so a command replayed after a reconnect (or a restarted agent) is answered from
the record instead of acting twice. Root passwords are never kept: a replayed EnableRoot answers
FAILED_PRECONDITION rather than resetting the password a second time.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import code_pb2

from reddwarf.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    RedDwarfError,
    Unavailable,
    ok_status,
    to_status_pb,
)
from reddwarf.common.log import bind
from reddwarf.common.pki import TlsFiles
from reddwarf.common.tls import aio_channel
from reddwarf.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from .datastore import DatastoreDriver

log = logging.getLogger("reddwarf.agent.stream")
AGENT_VERSION = "1"


@dataclass(frozen=True)
class StreamSettings:
    server_address: str
    instance_id: str
    tls: TlsFiles
    state_dir: str
    heartbeat_seconds: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class ResultStore:
    """Finished commands' results, one file per command id (written atomically, 0600)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, command_id: str) -> str:
        safe = "".join(c for c in command_id if c.isalnum() or c in "-_")[:128]
        return os.path.join(self.dir, f"{safe}.pb")

    def get(self, command_id: str) -> agent_pb2.CommandResult | None:
        try:
            with open(self._path(command_id), "rb") as f:
                return agent_pb2.CommandResult.FromString(f.read())
        except FileNotFoundError:
            return None

    def forget(self, command_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(command_id)[:-3] + ".running")

    def begin(self, command_id: str, kind: str) -> None:
        """Marks a command as started: a marker without a result after a restart means it was cut off."""
        with open(self._path(command_id)[:-3] + ".running", "w") as f:
            f.write(f"{kind}\n{command_id}")

    def take_interrupted(self) -> dict[str, str]:
        """Command ids (→ kind) that were running when the agent last died; their markers are removed."""
        out = {}
        for name in os.listdir(self.dir):
            if name.endswith(".running"):
                path = os.path.join(self.dir, name)
                with open(path) as f:
                    kind, _, command_id = f.read().partition("\n")
                out[command_id or name[: -len(".running")]] = kind
                os.unlink(path)
        return out

    def put(self, result: agent_pb2.CommandResult) -> None:
        if result.status.code in RETRYABLE:
            # Not an answer but "not now": a retry with the same id must run the command again.
            self.forget(result.command_id)
            return
        stored = agent_pb2.CommandResult()
        stored.CopyFrom(result)
        if stored.HasField("root_credentials"):
            # The password exists once, in the reply in flight; a replay gets a clear refusal instead.
            stored.ClearField("root_credentials")
            stored.status.CopyFrom(to_status_pb(FailedPrecondition(
                "root was already enabled by this command; its password is shown only once "
                "(enable root again for a new one)", field="command_id")))
        path = self._path(result.command_id)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(stored.SerializeToString())
        os.replace(path + ".tmp", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path[:-3] + ".running")


# Results that say "try again" rather than answer: never recorded, so a retry of the same id runs afresh.
RETRYABLE = frozenset({code_pb2.UNAVAILABLE, code_pb2.ABORTED, code_pb2.DEADLINE_EXCEEDED})

Handler = Callable[[agent_pb2.Command, Callable[[int, str, int], Awaitable[None]]],
                   Awaitable[agent_pb2.CommandResult]]


class CommandRunner:
    """Maps each command onto the datastore driver (and the backup runner)."""

    def __init__(self, driver: DatastoreDriver, backups: Any = None) -> None:
        self.driver = driver
        self.backups = backups  # agent.backup.BackupRunner, or None where backups are not wired
        self.upload: Callable[[AsyncIterator[agent_pb2.BackupChunk]], Awaitable[Any]] | None = None
        self.download: Callable[[str], AsyncIterator[agent_pb2.BackupChunk]] | None = None

    async def run(self, cmd: agent_pb2.Command, progress: Callable[[int, str, int], Awaitable[None]]
                  ) -> agent_pb2.CommandResult:
        res = agent_pb2.CommandResult(command_id=cmd.command_id, status=ok_status())
        d = self.driver
        kind = cmd.WhichOneof("command")

        async def p2(percent: int, message: str) -> None:
            await progress(percent, message, 0)

        if kind == "prepare":
            await d.prepare(cmd.prepare, p2)
        elif kind == "create_databases":
            await d.create_databases(list(cmd.create_databases.databases))
        elif kind == "delete_database":
            await d.delete_database(cmd.delete_database.database)
        elif kind == "list_databases":
            res.databases.CopyFrom(await d.list_databases(cmd.list_databases.page_size,
                                                          cmd.list_databases.page_token))
        elif kind == "create_users":
            await d.create_users(list(cmd.create_users.users))
        elif kind == "delete_user":
            await d.delete_user(cmd.delete_user.user, cmd.delete_user.host)
        elif kind == "get_user":
            res.user.CopyFrom(await d.get_user(cmd.get_user.user, cmd.get_user.host))
        elif kind == "update_user":
            await d.update_user(cmd.update_user)
        elif kind == "grant_access":
            await d.grant_access(cmd.grant_access.user, cmd.grant_access.host, list(cmd.grant_access.databases))
        elif kind == "revoke_access":
            await d.revoke_access(cmd.revoke_access.user, cmd.revoke_access.host, cmd.revoke_access.database)
        elif kind == "list_users":
            res.users.CopyFrom(await d.list_users(cmd.list_users.page_size, cmd.list_users.page_token))
        elif kind == "enable_root":
            res.root_credentials.CopyFrom(await d.enable_root())
        elif kind == "disable_root":
            await d.disable_root()
        elif kind == "get_root_status":
            res.root_status.CopyFrom(await d.root_status())
        elif kind == "restart":
            await d.restart()
        elif kind == "stop":
            await d.stop()
        elif kind == "start":
            await d.start()
        elif kind == "apply_limits":
            await d.apply_limits(cmd.apply_limits.limits)
        elif kind == "get_health":
            res.health.CopyFrom(await d.health())
        elif kind in ("backup", "restore", "table_checksums"):
            if self.backups is None or self.upload is None or self.download is None:
                raise FailedPrecondition("backups are not available in this guest", field="command")
            if kind == "backup":
                res.backup.CopyFrom(await self.backups.backup(cmd.backup.backup_id, cmd.backup.incremental_from_lsn,
                                                              self.upload, progress))
            elif kind == "restore":
                await self.backups.restore(list(cmd.restore.backup_ids), list(cmd.restore.sha256),
                                           self.download, progress)
            else:
                res.checksums.checksums.extend(await self.backups.table_checksums())
        else:
            raise InvalidArgument(f"unknown command {kind!r}", field="command")
        return res


class AgentStream:
    def __init__(self, settings: StreamSettings, runner: CommandRunner,
                 health: Callable[[], Awaitable[common_pb2.GuestHealth]]) -> None:
        self.s = settings
        self.runner = runner
        self.health = health
        self.results = ResultStore(os.path.join(settings.state_dir, "results"))
        # Commands a previous life of this agent started but never finished (it was killed, the guest
        # restarted): the first time the server sends one again it hears ABORTED, not a silent second run.
        self._interrupted = self.results.take_interrupted()
        self.log = bind(log, {"instance": settings.instance_id})
        self._running: dict[str, asyncio.Task[None]] = {}
        self._outbox: asyncio.Queue[agent_pb2.AgentMessage] | None = None
        self.connected = asyncio.Event()
        self.boot_id = os.urandom(8).hex()
        self._stop = asyncio.Event()
        self._welcomed = False

    def stop(self) -> None:
        self._stop.set()

    async def _send(self, msg: agent_pb2.AgentMessage) -> None:
        # Messages produced while disconnected are dropped here; results are on disk and re-sent when the
        # server asks for them after the next Welcome.
        if self._outbox is not None:
            await self._outbox.put(msg)

    async def _execute(self, cmd: agent_pb2.Command) -> None:
        cid = cmd.command_id

        async def progress(percent: int, message: str, bytes_done: int = 0) -> None:
            await self._send(agent_pb2.AgentMessage(progress=agent_pb2.Progress(
                command_id=cid, percent=percent, message=message[:500], bytes_done=bytes_done)))

        try:
            try:
                result = await self.runner.run(cmd, progress)
            except RedDwarfError as err:
                result = agent_pb2.CommandResult(command_id=cid, status=to_status_pb(err))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # the agent itself is stopping
                # A call inside the command was cancelled under it: the stream (and the channel its upload
                # or download used) closed because the server went away. Worth running again.
                broke = Unavailable("the connection to the server broke during the command", field="command_id")
                result = agent_pb2.CommandResult(command_id=cid, status=to_status_pb(broke))
            except Exception as exc:  # noqa: BLE001 - a bug in one command must not kill the agent
                self.log.exception("command failed", extra={"command": cid})
                result = agent_pb2.CommandResult(command_id=cid)
                result.status.code = code_pb2.INTERNAL
                result.status.message = f"agent error: {type(exc).__name__}"
            self.results.put(result)
        finally:
            # Whatever happened, the command is no longer running: a re-sent id must not be ignored forever.
            self._running.pop(cid, None)
        await self._send(agent_pb2.AgentMessage(result=result))
        self.log.info("command done", extra={"command": cid, "kind": cmd.WhichOneof("command"),
                                             "code": result.status.code})

    async def _on_command(self, cmd: agent_pb2.Command) -> None:
        cid = cmd.command_id
        if not cid:
            return
        done = self.results.get(cid)
        if done is not None:  # a replay: answer from the record, act not again
            await self._send(agent_pb2.AgentMessage(result=done))
            return
        running = self._running.get(cid)
        if running is not None and not running.done():
            return  # already running since before the reconnect; its result will follow
        kind = self._interrupted.pop(cid, None)
        if kind is not None:
            # Not stored: the server decides whether to run it again (same id, a fresh run) or give up.
            err = Aborted(f"the guest restarted while running {kind}; it did not finish", field="command_id")
            await self._send(agent_pb2.AgentMessage(result=agent_pb2.CommandResult(command_id=cid,
                                                                                   status=to_status_pb(err))))
            return
        self.results.begin(cid, cmd.WhichOneof("command") or "command")
        self._running[cid] = asyncio.create_task(self._execute(cmd))

    async def _heartbeats(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await self._send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(health=await self.health())))

    async def _session(self) -> None:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        hello = agent_pb2.Hello(instance_id=self.s.instance_id, agent_version=AGENT_VERSION, boot_id=self.boot_id,
                                capabilities=list(getattr(self.runner.driver, "capabilities", ())))
        with contextlib.suppress(Exception):
            hello.health.CopyFrom(await self.health())
        await outbox.put(agent_pb2.AgentMessage(hello=hello))

        async def outgoing() -> AsyncIterator[agent_pb2.AgentMessage]:
            while True:
                yield await outbox.get()

        async with aio_channel(self.s.server_address, self.s.tls) as channel:
            stub = agent_pb2_grpc.AgentGatewayStub(channel)
            self._wire_backups(stub)
            call = stub.Connect(outgoing())
            heartbeat: asyncio.Task[None] | None = None
            try:
                async for msg in call:
                    kind = msg.WhichOneof("message")
                    if kind == "welcome":
                        self._outbox = outbox
                        self.connected.set()
                        self._welcomed = True
                        every = msg.welcome.heartbeat_seconds or self.s.heartbeat_seconds
                        heartbeat = asyncio.create_task(self._heartbeats(every))
                        self.log.info("connected", extra={"server": self.s.server_address})
                        for cid in msg.welcome.pending_command_ids:
                            done = self.results.get(cid)
                            if done is not None:
                                await self._send(agent_pb2.AgentMessage(result=done))
                    elif kind == "command":
                        await self._on_command(msg.command)
            finally:
                self.connected.clear()
                self._outbox = None
                if heartbeat is not None:
                    heartbeat.cancel()
                call.cancel()

    def _wire_backups(self, stub: agent_pb2_grpc.AgentGatewayStub) -> None:
        async def upload(chunks: AsyncIterator[agent_pb2.BackupChunk]) -> agent_pb2.UploadBackupResponse:
            return await stub.UploadBackup(chunks)

        def download(backup_id: str) -> AsyncIterator[agent_pb2.BackupChunk]:
            return stub.DownloadBackup(agent_pb2.DownloadBackupRequest(backup_id=backup_id))

        self.runner.upload = upload
        self.runner.download = download

    async def run_forever(self) -> None:
        delay = self.s.backoff_initial
        while not self._stop.is_set():
            self._welcomed = False
            try:
                await self._session()
                delay = self.s.backoff_initial  # a clean end (server restart): reconnect promptly
            except grpc.aio.AioRpcError as exc:
                self.log.warning("stream lost", extra={"code": exc.code().name, "detail": exc.details()})
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    delay = self.s.backoff_max  # refused: do not hammer the server
            except (TimeoutError, OSError) as exc:
                self.log.warning("stream error", extra={"error": str(exc)})
            if self._welcomed:
                delay = self.s.backoff_initial  # it was up: the next try starts from the shortest wait
            # Exponential backoff with full jitter: a restarted server is not stampeded by every guest.
            sleep = random.uniform(0, delay)
            delay = min(self.s.backoff_max, delay * 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=sleep)

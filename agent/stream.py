"""The guest agent's one connection: an outbound mTLS bidirectional stream to the control server.

The guest opens no port. It dials out, says Hello (its instance id, which the server checks against the
certificate), then runs the commands it is sent (agent/commands.py) and heartbeats its health. Commands
carry ids and their results are kept on disk (agent/results.py), so a command replayed after a reconnect
(or a restarted agent) is answered from the record instead of acting twice. Root passwords are never kept:
a replayed EnableRoot answers FAILED_PRECONDITION rather than resetting the password a second time.

Several servers: `server_address` may list every server's agent endpoint, comma-separated. The agent
starts at a random one (so a fleet spreads over the servers), and when its stream ends or a dial fails it
moves to the next one at once, with a short jittered pause; only after every endpoint failed in a row does
the exponential backoff (with full jitter) grow. Every endpoint presents a `server/*` certificate of the
same CA, which is what the channel checks, whatever address was dialled.

After the agent renewed its certificate (agent/main.py), `reconnect()` ends the stream once no command is
running (a backup upload or download runs on the stream's channel) and the next session dials with the
new certificate files.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.rpc import code_pb2

from reddwarf.common.errors import Aborted, RedDwarfError, Unavailable, to_status_pb
from reddwarf.common.log import bind
from reddwarf.common.pki import TlsFiles
from reddwarf.common.tls import aio_channel
from reddwarf.v1 import agent_pb2, agent_pb2_grpc

from . import convert
from .commands import UNRECORDED, CommandRunner, Transfer
from .model import BackupChunk, GuestHealth, StoredBackup
from .results import ResultStore

log = logging.getLogger("reddwarf.agent.stream")
AGENT_VERSION = "1"


def endpoints(addresses: str) -> list[str]:
    """The server endpoints of a comma-separated list, in order, without blanks or repeats."""
    out: list[str] = []
    for item in addresses.split(","):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


@dataclass(frozen=True)
class StreamSettings:
    server_address: str
    instance_id: str
    tls: TlsFiles
    state_dir: str
    heartbeat_seconds: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


class AgentStream:
    def __init__(self, settings: StreamSettings, runner: CommandRunner,
                 health: Callable[[], Awaitable[GuestHealth]]) -> None:
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
        self._cycle = asyncio.Event()  # reconnect() asked for a new session (renewed certificate)
        self._cycling = False
        self._recycled = False
        self.endpoints = endpoints(settings.server_address) or [settings.server_address]
        self._at = random.randrange(len(self.endpoints))  # the endpoint the next session dials
        self.server = self.endpoints[self._at]            # the one the current (or last) session used

    def reconnect(self) -> None:
        """Ends the current session as soon as no command is running; the next one reads the TLS files
        afresh (a renewed certificate)."""
        self._cycle.set()

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
            if cmd.WhichOneof("command") not in UNRECORDED:
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
        if cmd.WhichOneof("command") not in UNRECORDED:
            self.results.begin(cid, cmd.WhichOneof("command") or "command")
        self._running[cid] = asyncio.create_task(self._execute(cmd))

    async def _heartbeats(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                health = convert.health_to_pb(await self.health())
                await self._send(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(health=health)))

    async def _cycle_when_idle(self, call: grpc.aio.StreamStreamCall[agent_pb2.AgentMessage,
                                                                        agent_pb2.ServerMessage]) -> None:
        await self._cycle.wait()
        while self._running:  # never cut a running command's upload or download
            await asyncio.sleep(0.5)
        self._cycle.clear()
        self._cycling = True
        self._recycled = True  # the same server again: only the certificate changed
        self.log.info("reconnecting with the renewed certificate")
        call.cancel()

    async def _session(self) -> None:
        outbox: asyncio.Queue[agent_pb2.AgentMessage] = asyncio.Queue()
        hello = agent_pb2.Hello(instance_id=self.s.instance_id, agent_version=AGENT_VERSION, boot_id=self.boot_id,
                                capabilities=list(self.runner.driver.capabilities))
        with contextlib.suppress(Exception):
            hello.health.CopyFrom(convert.health_to_pb(await self.health()))
        await outbox.put(agent_pb2.AgentMessage(hello=hello))

        async def outgoing() -> AsyncIterator[agent_pb2.AgentMessage]:
            while True:
                yield await outbox.get()

        # This session dials with the TLS files as they are now: a renewal installed before this point
        # needs no further reconnect.
        self._cycle.clear()
        self.server = self.endpoints[self._at]
        async with aio_channel(self.server, self.s.tls) as channel:
            stub = agent_pb2_grpc.AgentGatewayStub(channel)
            self._wire_backups(stub)
            call = stub.Connect(outgoing())
            heartbeat: asyncio.Task[None] | None = None
            cycler = asyncio.create_task(self._cycle_when_idle(call))
            try:
                async for msg in call:
                    kind = msg.WhichOneof("message")
                    if kind == "welcome":
                        self._outbox = outbox
                        self.connected.set()
                        self._welcomed = True
                        every = msg.welcome.heartbeat_seconds or self.s.heartbeat_seconds
                        heartbeat = asyncio.create_task(self._heartbeats(every))
                        self.log.info("connected", extra={"server": self.server})
                        for cid in msg.welcome.pending_command_ids:
                            done = self.results.get(cid)
                            if done is not None:
                                await self._send(agent_pb2.AgentMessage(result=done))
                    elif kind == "command":
                        await self._on_command(msg.command)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._cycling or (task is not None and task.cancelling()):
                    raise
                # We cancelled the call ourselves to reconnect with the renewed certificate: a clean end.
            finally:
                self._cycling = False
                cycler.cancel()
                self.connected.clear()
                self._outbox = None
                if heartbeat is not None:
                    heartbeat.cancel()
                call.cancel()

    def _wire_backups(self, stub: agent_pb2_grpc.AgentGatewayAsyncStub) -> None:
        async def upload(chunks: AsyncIterator[BackupChunk]) -> StoredBackup:
            async def messages() -> AsyncIterator[agent_pb2.BackupChunk]:
                async for chunk in chunks:
                    yield convert.chunk_to_pb(chunk)
            response: agent_pb2.UploadBackupResponse = await stub.UploadBackup(messages())
            return convert.stored_from_pb(response)

        async def download(backup_id: str) -> AsyncIterator[BackupChunk]:
            call = stub.DownloadBackup(agent_pb2.DownloadBackupRequest(backup_id=backup_id))
            try:
                async for chunk in call:
                    yield convert.chunk_from_pb(chunk)
            finally:
                call.cancel()  # a download left unfinished (a corrupt or failed restore) ends its call

        self.runner.transfer = Transfer(upload, download)

    async def run_forever(self) -> None:
        delay = self.s.backoff_initial
        failed_in_a_row = 0
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
                failed_in_a_row = 0
            else:
                failed_in_a_row += 1
            recycled, self._recycled = self._recycled, False
            if len(self.endpoints) > 1 and not recycled:
                # Another server next: the one we had is gone (or refused us).
                self._at = (self._at + 1) % len(self.endpoints)
                if failed_in_a_row < len(self.endpoints):
                    # Not every server failed yet: try the next one almost at once (jittered, so the
                    # guests of a dead server do not arrive at the next in one burst).
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(),
                                               timeout=random.uniform(0, self.s.backoff_initial))
                    continue
                failed_in_a_row = 0
            # Exponential backoff with full jitter: a restarted server is not stampeded by every guest.
            sleep = random.uniform(0, delay)
            delay = min(self.s.backoff_max, delay * 2)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=sleep)

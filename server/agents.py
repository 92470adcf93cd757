"""The server's side of the guest agents: who is connected, routing commands to exactly one instance, their
results, progress and heartbeats; enrollment.

Trust: a stream is accepted only from a certificate with role `instance` whose id equals the Hello's
instance id (and is not revoked). Commands for instance A are only ever written to A's stream, so a
compromised guest neither sees nor answers another tenant's commands. The registry holds no database
handle: callbacks given at construction connect it to the state (health, silence, revocation).

Limits: a guest's health reaches the state at most once per heartbeat interval (what comes faster is
coalesced: the newest is written when the interval is up), progress at most once a second per command; a
heartbeat or hello larger than heartbeat_max_bytes, or a flood of heartbeats (a token bucket of
heartbeat_flood_burst refilled at twice the configured rate), ends the stream with an error.

Renewal: an agent renews its own certificate over this port (RenewCertificate, mTLS with its current,
unrevoked instance certificate); the new one names the caller's id from its verified certificate, never
anything the request says, and is recorded like enrollment's. At most RENEWALS_PER_DAY per instance.

Several servers (server/cluster.py): with a ClusterLink the registry records each stream it holds in the
state DB and posts every command to the relay as well as sending it on a stream it holds, so a guest whose
stream is on another server (now, or after it moved mid-command) is reached through that server.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from reddwarf.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    RedDwarfError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    abort,
    from_status_pb,
    grpc_edge,
)
from reddwarf.common.pki import Identity, identity_from_cert
from reddwarf.common.tls import peer_identity
from reddwarf.v1 import agent_pb2, agent_pb2_grpc, common_pb2

from .app import Context

if TYPE_CHECKING:
    from .cluster import ClusterLink

log = logging.getLogger("reddwarf.server.agents")

ProgressCb = Callable[[agent_pb2.Progress], Awaitable[None] | None]
PROGRESS_MIN_SECONDS = 1.0  # progress of one command reaches its task at most this often
# An honest agent renews once per two thirds of a certificate's life; a guest asking more often than this
# (in one server's memory) only fills the certificates table, so it is refused.
RENEWALS_PER_DAY = 4
SignCsr = Callable[[bytes, str], tuple[bytes, bytes]]  # (csr_pem, instance_id) -> (cert_pem, ca_pem)


@dataclass
class _Conn:
    instance_id: str
    hello: agent_pb2.Hello
    outbox: asyncio.Queue[agent_pb2.ServerMessage | None] = field(default_factory=asyncio.Queue)
    last_seen: float = field(default_factory=time.monotonic)
    # Heartbeat flood bucket: tokens left and when they were counted (see AgentRegistry._heartbeat_allowed).
    tokens: float | None = None
    counted_at: float = field(default_factory=time.monotonic)
    # Why the server ended the stream, sent to the agent as its status.
    error: RedDwarfError | None = None
    attached_at: float = field(default_factory=time.monotonic)
    claim: str = ""  # its row in agent_streams (several servers)


@dataclass
class _HealthGate:
    """Per instance (kept across reconnects): when its health was last written, and a newer report
    waiting for the interval to end."""
    written_at: float = float("-inf")
    pending: common_pb2.GuestHealth | None = None
    flush: asyncio.Task[None] | None = None


@dataclass
class _Pending:
    instance_id: str
    command: agent_pb2.Command
    future: asyncio.Future[agent_pb2.CommandResult]
    on_progress: ProgressCb | None
    progress_at: float = float("-inf")


class AgentRegistry:
    def __init__(self, on_health: Callable[[str, common_pb2.GuestHealth], Awaitable[None]] | None = None,
                 on_silent: Callable[[str], Awaitable[None]] | None = None,
                 is_revoked: Callable[[int], bool] = lambda serial: False,
                 heartbeat_seconds: int = 5, heartbeat_expiry: float = 20.0,
                 heartbeat_max_bytes: int = 64 * 1024, heartbeat_flood_burst: int = 20,
                 cluster: ClusterLink | None = None) -> None:
        self.cluster = cluster
        if cluster is not None:
            cluster.agents = self
        self.on_health = on_health
        self.on_silent = on_silent
        self.is_revoked = is_revoked
        self.heartbeat_seconds = heartbeat_seconds
        self.heartbeat_expiry = heartbeat_expiry
        self.heartbeat_max_bytes = heartbeat_max_bytes
        self.heartbeat_flood_burst = heartbeat_flood_burst
        self._gates: dict[str, _HealthGate] = {}
        self._conns: dict[str, _Conn] = {}
        self._pending: dict[str, _Pending] = {}
        self._hello_waiters: dict[str, list[asyncio.Future[agent_pb2.Hello]]] = {}
        self._health: dict[str, common_pb2.GuestHealth] = {}
        self._silent_reported: set[str] = set()
        self._gone_since: dict[str, float] = {}
        self._releases: set[asyncio.Task[None]] = set()

    # -- used by the rest of the server ----------------------------------------------------------
    def is_connected(self, instance_id: str) -> bool:
        """Connected to this server or (several servers) to a live other one."""
        return instance_id in self._conns or (self.cluster is not None and instance_id in self.cluster.remote)

    def last_health(self, instance_id: str) -> common_pb2.GuestHealth | None:
        return self._health.get(instance_id)

    def stream_count(self) -> int:
        """Guest agents connected to this server now."""
        return len(self._conns)

    async def wait_for_hello(self, instance_id: str, timeout: float) -> agent_pb2.Hello:
        conn = self._conns.get(instance_id)
        if conn is not None:
            return conn.hello
        fut: asyncio.Future[agent_pb2.Hello] = asyncio.get_running_loop().create_future()
        self._hello_waiters.setdefault(instance_id, []).append(fut)
        deadline = time.monotonic() + timeout
        try:
            while True:
                remote = self.cluster.remote.get(instance_id) if self.cluster is not None else None
                if remote is not None:
                    return remote.hello  # it said hello to another server
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                done, _ = await asyncio.wait({fut}, timeout=left if self.cluster is None else min(left, 0.25))
                if done:
                    return fut.result()
        except TimeoutError:
            raise DeadlineExceeded(f"the guest agent of {instance_id} did not connect within {timeout:.0f}s",
                                   field="instance") from None
        finally:
            waiters = self._hello_waiters.get(instance_id, [])
            if fut in waiters:
                waiters.remove(fut)

    async def call(self, instance_id: str, command: agent_pb2.Command, timeout: float,
                   on_progress: ProgressCb | None = None, gone_grace: float | None = None) -> agent_pb2.CommandResult:
        """Runs a command on that instance's agent and returns its result; a failed result is raised as the
        domain error it carries. The command id makes it idempotent: pass the same id to retry safely."""
        if not command.command_id:
            command.command_id = str(uuid.uuid4())
        cid = command.command_id
        existing = self._pending.get(cid)
        if existing is not None and existing.instance_id != instance_id:
            raise InvalidArgument("command id already used for another instance", field="command_id")
        fut: asyncio.Future[agent_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self._pending[cid] = _Pending(instance_id, command, fut, on_progress)
        asked = False
        try:
            if self.cluster is not None:
                # Posted even when the stream is here: the guest may move to another server before it
                # answers, and that server then sends it again from the relay.
                relayed = await self.cluster.ask(instance_id, command, on_progress)
                asked = True
                def settle(f: asyncio.Future[agent_pb2.CommandResult]) -> None:
                    if not fut.done() and not f.cancelled():
                        fut.set_result(f.result())
                relayed.add_done_callback(settle)
        except Exception:
            self._pending.pop(cid, None)
            raise
        conn = self._conns.get(instance_id)
        if conn is not None:
            await conn.outbox.put(agent_pb2.ServerMessage(command=command))
        elif not self.is_connected(instance_id):
            self._gone_since.setdefault(instance_id, time.monotonic())
        # else: sent when the agent (re)connects, if it does before the deadline
        try:
            if gone_grace is None:
                result = await asyncio.wait_for(fut, timeout)
            else:
                result = await self._await_unless_gone(instance_id, fut, timeout, gone_grace)
        except TimeoutError:
            raise DeadlineExceeded(f"the guest agent of {instance_id} did not finish "
                                   f"{command.WhichOneof('command')} within {timeout:.0f}s", field="instance") from None
        finally:
            self._pending.pop(cid, None)
            if asked and self.cluster is not None:
                await self.cluster.done_asking(cid)
        err = from_status_pb(result.status)
        if err is not None:
            raise err
        return result

    async def _await_unless_gone(self, instance_id: str, fut: asyncio.Future[agent_pb2.CommandResult],
                                 timeout: float, grace: float) -> agent_pb2.CommandResult:
        """Waits for the result, but gives up early when the agent has been gone for `grace` seconds: a
        long command (a backup) must not wait hours for a guest that died."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            done, _ = await asyncio.wait({fut}, timeout=min(1.0, left))
            if done:
                return fut.result()
            if self.is_connected(instance_id):
                self._gone_since.pop(instance_id, None)
            else:
                self._gone_since.setdefault(instance_id, time.monotonic())
            since = self._gone_since.get(instance_id)
            if since is not None and time.monotonic() - since > grace:
                raise Unavailable(f"the guest agent of {instance_id} went away during the command", field="instance")

    async def run(self) -> None:
        """Watchdog: an instance whose heartbeats stopped is reported once (the server marks it SHUTDOWN)."""
        while True:
            await asyncio.sleep(max(0.5, self.heartbeat_seconds / 2))
            now = time.monotonic()
            for iid, conn in list(self._conns.items()):
                if now - conn.last_seen > self.heartbeat_expiry and iid not in self._silent_reported:
                    self._silent_reported.add(iid)
                    log.warning("guest silent", extra={"instance": iid})
                    if self.on_silent is not None:
                        with contextlib.suppress(Exception):
                            await self.on_silent(iid)

    def disconnect(self, instance_id: str) -> None:
        """Drops an instance's stream (e.g. its certificate was revoked at delete), on whichever server."""
        if self.cluster is not None:
            self.cluster.forget(instance_id)
        self.drop_local(instance_id)

    # -- used by server/cluster.py ---------------------------------------------------------------
    def local_ids(self) -> list[str]:
        return list(self._conns)

    def attached_at(self, instance_id: str) -> float | None:
        conn = self._conns.get(instance_id)
        return None if conn is None else conn.attached_at

    async def call_local(self, instance_id: str, command: agent_pb2.Command,
                         on_progress: Callable[[agent_pb2.Progress], Awaitable[None]]
                         ) -> agent_pb2.CommandResult | None:
        """Sends another server's command on the stream held here; None when the guest left this server
        before it answered (the server it went to sends the command again)."""
        cid = command.command_id
        conn = self._conns.get(instance_id)
        if conn is None or cid in self._pending:
            return None
        fut: asyncio.Future[agent_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        mine = _Pending(instance_id, command, fut, on_progress)
        self._pending[cid] = mine
        try:
            await conn.outbox.put(agent_pb2.ServerMessage(command=command))
            while True:
                done, _ = await asyncio.wait({fut}, timeout=1.0)
                if done:
                    return fut.result()
                if self._conns.get(instance_id) is not conn or self._pending.get(cid) is not mine:
                    return None  # the guest left, or this server now asks the same command itself
        finally:
            if self._pending.get(cid) is mine:
                del self._pending[cid]

    def drop_local(self, instance_id: str) -> None:
        conn = self._conns.pop(instance_id, None)
        if conn is not None:
            conn.outbox.put_nowait(None)
        gate = self._gates.pop(instance_id, None)
        if gate is not None and gate.flush is not None:
            gate.flush.cancel()

    # -- used by the servicer --------------------------------------------------------------------
    async def _attach(self, conn: _Conn) -> None:
        if self.cluster is not None:
            # Recorded before the stream counts here: the relay then finds it, and its previous holder
            # (the agent moved) drops its own.
            conn.claim = await self.cluster.claim(conn.instance_id, conn.hello)
        old = self._conns.get(conn.instance_id)
        if old is not None:
            old.outbox.put_nowait(None)  # a newer stream of the same agent wins
        self._conns[conn.instance_id] = conn
        self._gone_since.pop(conn.instance_id, None)
        self._silent_reported.discard(conn.instance_id)
        pending = [p for p in self._pending.values() if p.instance_id == conn.instance_id]
        await conn.outbox.put(agent_pb2.ServerMessage(welcome=agent_pb2.Welcome(
            heartbeat_seconds=self.heartbeat_seconds, pending_command_ids=[p.command.command_id for p in pending])))
        for p in pending:  # re-sent with the same id: the agent answers from its record if it already ran
            await conn.outbox.put(agent_pb2.ServerMessage(command=p.command))
        if conn.hello.HasField("health"):
            await self._record_health(conn.instance_id, conn.hello.health)
        for fut in self._hello_waiters.pop(conn.instance_id, []):
            if not fut.done():
                fut.set_result(conn.hello)
        log.info("guest connected", extra={"instance": conn.instance_id, "pending": len(pending)})

    def _detach(self, conn: _Conn) -> None:
        if self._conns.get(conn.instance_id) is conn:
            del self._conns[conn.instance_id]
            self._gone_since[conn.instance_id] = time.monotonic()
            log.info("guest disconnected", extra={"instance": conn.instance_id})
        if self.cluster is not None and conn.claim:
            self._releases.add(asyncio.get_running_loop().create_task(
                self.cluster.release(conn.instance_id, conn.claim)))
            self._releases = {t for t in self._releases if not t.done()}

    async def _record_health(self, instance_id: str, health: common_pb2.GuestHealth) -> None:
        """Keeps the newest report in memory; writes it to the state at most once per heartbeat interval
        per instance (a report arriving sooner waits, and is replaced by any newer one meanwhile)."""
        self._health[instance_id] = health
        gate = self._gates.setdefault(instance_id, _HealthGate())
        wait = gate.written_at + self.heartbeat_seconds - time.monotonic()
        if wait > 0:
            gate.pending = health
            if gate.flush is None:
                gate.flush = asyncio.create_task(self._flush_later(instance_id, gate, wait))
            return
        if gate.flush is not None:  # its time came, but this report is newer than the one it holds
            gate.flush.cancel()
        gate.pending, gate.flush, gate.written_at = None, None, time.monotonic()
        await self._write_health(instance_id, health)

    async def _flush_later(self, instance_id: str, gate: _HealthGate, wait: float) -> None:
        await asyncio.sleep(wait)
        health, gate.pending, gate.flush = gate.pending, None, None
        if health is not None and self._gates.get(instance_id) is gate:
            gate.written_at = time.monotonic()
            await self._write_health(instance_id, health)

    async def _write_health(self, instance_id: str, health: common_pb2.GuestHealth) -> None:
        if self.on_health is not None:
            try:
                await self.on_health(instance_id, health)
            except Exception:  # noqa: BLE001 - a state write failing must not drop the stream
                log.exception("recording health failed")

    def _heartbeat_allowed(self, conn: _Conn) -> bool:
        """A token bucket per stream: heartbeat_flood_burst tokens, refilled at twice the configured rate
        (an honest agent sends one per interval); a heartbeat finding it empty is a flood."""
        now = time.monotonic()
        burst = float(self.heartbeat_flood_burst)
        tokens = burst if conn.tokens is None else conn.tokens
        conn.tokens = min(burst, tokens + (now - conn.counted_at) * 2 / max(self.heartbeat_seconds, 0.001))
        conn.counted_at = now
        if conn.tokens < 1:
            return False
        conn.tokens -= 1
        return True

    async def _on_message(self, conn: _Conn, msg: agent_pb2.AgentMessage) -> None:
        conn.last_seen = time.monotonic()
        self._silent_reported.discard(conn.instance_id)
        kind = msg.WhichOneof("message")
        if kind == "heartbeat":
            size = msg.heartbeat.ByteSize()
            if size > self.heartbeat_max_bytes:
                raise InvalidArgument(f"a heartbeat of {size} bytes is over the limit of {self.heartbeat_max_bytes}",
                                      field="heartbeat")
            if not self._heartbeat_allowed(conn):
                raise ResourceExhausted(f"heartbeats far faster than one per {self.heartbeat_seconds}s: "
                                        "the stream is closed", field="heartbeat")
            await self._record_health(conn.instance_id, msg.heartbeat.health)
        elif kind == "result":
            p = self._pending.get(msg.result.command_id)
            # Only the instance the command was sent to may answer it.
            if p is not None and p.instance_id == conn.instance_id and not p.future.done():
                p.future.set_result(msg.result)
        elif kind == "progress":
            p = self._pending.get(msg.progress.command_id)
            if p is not None and p.instance_id == conn.instance_id and p.on_progress is not None:
                now = time.monotonic()
                if now - p.progress_at < PROGRESS_MIN_SECONDS:
                    return  # each progress is a state write: dropped when faster than this
                p.progress_at = now
                res = p.on_progress(msg.progress)
                if asyncio.iscoroutine(res):
                    await res


class BackupTransfer(Protocol):
    """Where the gateway's backup streams go (server/backups.py's BackupSink)."""

    async def upload(self, instance_id: str, chunks: AsyncIterator[agent_pb2.BackupChunk]
                     ) -> agent_pb2.UploadBackupResponse: ...

    def download(self, instance_id: str, backup_id: str) -> AsyncIterator[agent_pb2.BackupChunk]: ...


class AgentGatewayServicer(agent_pb2_grpc.AgentGatewayServicer):
    def __init__(self, registry: AgentRegistry, backup_sink: BackupTransfer | None = None,
                 sign_csr: SignCsr | None = None, revoke_serial: Callable[[int, str], None] | None = None) -> None:
        self.registry = registry
        self.backup_sink = backup_sink
        # Signs and records an instance certificate (server/enrollment.py's Enrollment.sign_csr); revokes
        # one it issued to a caller revoked meanwhile (in the table and the CRL).
        self.sign = sign_csr
        self.revoke_serial = revoke_serial
        self._renewals: dict[str, list[float]] = {}

    def _instance(self, context: Context) -> str:
        return self._caller(context).id

    def _caller(self, context: Context) -> Identity:
        ident = peer_identity(context)
        if ident is None:
            raise Unauthenticated("a certificate from the deployment CA is required")
        if self.registry.is_revoked(ident.serial):
            raise Unauthenticated(f"certificate of {ident.uri} is revoked")
        if ident.role != "instance":
            raise PermissionDenied(f"only guest agents may connect here; {ident.uri} is a {ident.role}")
        return ident

    async def Connect(self, request_iterator: AsyncIterator[agent_pb2.AgentMessage],
                      context: Context) -> AsyncIterator[agent_pb2.ServerMessage]:
        try:
            cert_instance = self._instance(context)
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("message") != "hello":
                raise InvalidArgument("the first message on the stream must be hello", field="hello")
            if first.hello.instance_id != cert_instance:
                raise PermissionDenied(f"this certificate belongs to instance {cert_instance}, not "
                                       f"{first.hello.instance_id!r}", field="hello.instance_id")
            if first.hello.ByteSize() > self.registry.heartbeat_max_bytes:
                raise InvalidArgument(f"a hello of {first.hello.ByteSize()} bytes is over the limit of "
                                      f"{self.registry.heartbeat_max_bytes}", field="hello")
        except (Unauthenticated, PermissionDenied, InvalidArgument) as err:
            log.warning("agent stream refused", extra={"reason": err.message})
            await abort(context, err)
            return
        conn = _Conn(cert_instance, first.hello)
        await self.registry._attach(conn)

        async def reader() -> None:
            try:
                async for msg in request_iterator:
                    await self.registry._on_message(conn, msg)
            except (InvalidArgument, ResourceExhausted) as err:
                conn.error = err
                log.warning("agent stream closed", extra={"instance": conn.instance_id, "reason": err.message})
            finally:
                conn.outbox.put_nowait(None)

        task = asyncio.create_task(reader())
        try:
            while True:
                msg = await conn.outbox.get()
                if msg is None:
                    break
                yield msg
        finally:
            task.cancel()
            self.registry._detach(conn)
        if conn.error is not None:
            await abort(context, conn.error)

    @grpc_edge
    async def UploadBackup(self, request_iterator: AsyncIterator[agent_pb2.BackupChunk],
                           context: Context) -> agent_pb2.UploadBackupResponse:
        iid = self._instance(context)
        if self.backup_sink is None:
            raise FailedPrecondition("backups are not enabled on this server", field="backup_id")
        return await self.backup_sink.upload(iid, request_iterator)

    async def DownloadBackup(self, request: agent_pb2.DownloadBackupRequest,
                             context: Context) -> AsyncIterator[agent_pb2.BackupChunk]:
        try:
            iid = self._instance(context)
            if self.backup_sink is None:
                raise FailedPrecondition("backups are not enabled on this server", field="backup_id")
            async for chunk in self.backup_sink.download(iid, request.backup_id):
                yield chunk
        except (Unauthenticated, PermissionDenied, FailedPrecondition, InvalidArgument) as err:
            await abort(context, err)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, RedDwarfError):
                await abort(context, exc)
            raise


    @grpc_edge
    async def RenewCertificate(self, request: agent_pb2.RenewCertificateRequest, context: Context
                               ) -> agent_pb2.RenewCertificateResponse:
        # Revoked, foreign-role and certificate-less callers are refused here; the id signed is the one
        # the caller's verified certificate proves.
        caller = self._caller(context)
        iid = caller.id
        if self.sign is None:
            raise FailedPrecondition("certificate renewal is not enabled on this server", field="csr_pem")
        if not request.csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----"):
            raise InvalidArgument("csr_pem must be a PEM certificate request", field="csr_pem")
        now = time.monotonic()
        recent = [t for t in self._renewals.get(iid, []) if now - t < 86400]
        if len(recent) >= RENEWALS_PER_DAY:
            raise ResourceExhausted(f"instance {iid} renewed its certificate {len(recent)} times in the last "
                                    "day; try again later", field="csr_pem")
        self._renewals[iid] = [*recent, now]  # counted before signing: concurrent calls cannot all pass
        cert, _ = await asyncio.to_thread(self.sign, request.csr_pem.encode(), iid)
        if self.registry.is_revoked(caller.serial):
            # Revoked while we signed (the instance was deleted: revoke_identity ran before our record was
            # written and missed it). The new certificate must not outlive the old one's revocation.
            if self.revoke_serial is not None:
                await asyncio.to_thread(self.revoke_serial, identity_from_cert(cert).serial,
                                        "issued to a certificate revoked during its renewal")
            raise Unauthenticated(f"certificate of {caller.uri} was revoked during its renewal")
        # The caller's current certificate is NOT revoked: its stream (and any backup upload or download
        # in flight) runs on it until the agent reconnects with the new one, and an agent that dies before
        # writing the new files must still be able to come back with the old one. It lapses at its own
        # expiry; deleting the instance revokes both (revoke_identity revokes every recorded certificate).
        log.info("agent certificate renewed", extra={"instance": iid})
        return agent_pb2.RenewCertificateResponse(certificate_pem=cert.decode())


class EnrollmentServicer(agent_pb2_grpc.EnrollmentServicer):
    """Exchanges a one-time enrollment token for a certificate on the agent's own key (its CSR)."""

    def __init__(self, verify_and_consume_token: Callable[[str, str], Awaitable[bool]],
                 sign_csr: Callable[[bytes, str], tuple[bytes, bytes]]) -> None:
        self.verify = verify_and_consume_token
        self.sign = sign_csr

    @grpc_edge
    async def Enroll(self, request: agent_pb2.EnrollRequest, context: Context
                     ) -> agent_pb2.EnrollResponse:
        if not request.instance_id:
            raise InvalidArgument("instance_id is required", field="instance_id")
        if not request.enrollment_token:
            raise InvalidArgument("enrollment_token is required", field="enrollment_token")
        if not request.csr_pem.startswith("-----BEGIN CERTIFICATE REQUEST-----"):
            raise InvalidArgument("csr_pem must be a PEM certificate request", field="csr_pem")
        if not await self.verify(request.instance_id, request.enrollment_token):
            raise PermissionDenied("enrollment token is unknown, expired, already used or for another "
                                   "instance", field="enrollment_token")
        cert, ca = await asyncio.to_thread(self.sign, request.csr_pem.encode(), request.instance_id)
        log.info("agent enrolled", extra={"instance": request.instance_id})
        return agent_pb2.EnrollResponse(certificate_pem=cert.decode(), ca_pem=ca.decode())

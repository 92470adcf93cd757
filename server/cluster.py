"""Several control servers over one state DB: who holds each guest agent's stream, and the command relay.

An agent keeps one stream to whichever server it reached (agent/stream.py tries the endpoints it was given).
A server that must reach an instance whose stream another server holds does not dial that server: it writes
the command to `agent_relay`; the holder (it polls the table every `poll_seconds`) sends it on the stream and
writes the progress and the result back, which the asking server reads. The state DB is the only channel
between servers, so a server needs no address, port or certificate for its peers, and a command survives the
death of either end: its row stays until the asking side has the result, and whichever server the agent
reconnects to sends it again with the same id (the agent answers a replay from its record).

`agent_streams` says which server holds each stream (a fresh claim token per stream); `servers` says which
servers are alive (a row refreshed every poll). A claim of a server silent for longer than `member_expiry`
does not count: its agents are on their way elsewhere. Also here: WatchNotifier, which turns changes made
by other servers into WatchInstance pokes (it polls the rows a watcher sees).
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.clock import now
from reddwarf.common.errors import RedDwarfError, to_status_pb
from reddwarf.v1 import agent_pb2

from . import db, models
from .events import EventBus

log = logging.getLogger("reddwarf.server.cluster")
RELAY_TIMEOUT = 24 * 3600.0  # a relayed command runs as long as its asker waits; the asker has the deadline
RELAY_KEEP = dt.timedelta(days=1)  # rows nobody collected (the asker died and never came back) go after this


@dataclass(frozen=True)
class RemoteStream:
    server: str
    hello: agent_pb2.Hello


@dataclass
class _Waiter:
    """A command this server asked of a guest on another server."""
    future: asyncio.Future[agent_pb2.CommandResult]
    on_progress: Callable[[agent_pb2.Progress], Awaitable[None] | None] | None
    progress: bytes = b""


class LocalAgents(Protocol):
    """What the relay needs of this server's AgentRegistry (kept narrow so the registry stays DB-free)."""

    def local_ids(self) -> Iterable[str]: ...

    def attached_at(self, instance_id: str) -> float | None: ...

    def drop_local(self, instance_id: str) -> None: ...

    async def call_local(self, instance_id: str, command: agent_pb2.Command,
                         on_progress: Callable[[agent_pb2.Progress], Awaitable[None]]
                         ) -> agent_pb2.CommandResult | None: ...


@dataclass
class ClusterLink:
    """This server's view of the others, through the state DB. All DB work runs in worker threads."""
    sessions: sessionmaker[Session]
    name: str
    agent_address: str = ""
    poll_seconds: float = 0.25
    member_expiry: float = 10.0
    remote: dict[str, RemoteStream] = field(default_factory=dict)
    _waiters: dict[str, _Waiter] = field(default_factory=dict)
    _relaying: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    agents: LocalAgents | None = None
    polled: asyncio.Event = field(default_factory=asyncio.Event)

    # -- stream ownership ------------------------------------------------------------------------
    def start(self) -> None:
        """At start: claims this server held before it restarted are void (those streams died with it)."""
        def work(s: Session) -> None:
            s.execute(delete(models.AgentStream).where(models.AgentStream.server_name == self.name))
            self._beat(s)
        db.run_transaction(self.sessions, work)

    async def claim(self, instance_id: str, hello: agent_pb2.Hello) -> str:
        token = uuid.uuid4().hex
        payload = hello.SerializeToString()

        def work(s: Session) -> None:
            row = s.get(models.AgentStream, instance_id, with_for_update=True)
            if row is None:
                s.add(models.AgentStream(instance_id=instance_id, server_name=self.name, claim=token,
                                         hello=payload, connected_at=now()))
            else:
                row.server_name, row.claim, row.hello, row.connected_at = self.name, token, payload, now()
        await asyncio.to_thread(self._retry_insert, work)
        self.remote.pop(instance_id, None)
        return token

    def _retry_insert(self, work: Callable[[Session], None]) -> None:
        for attempt in range(3):  # two servers inserting the same new row: the loser updates instead
            try:
                db.run_transaction(self.sessions, work)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    async def release(self, instance_id: str, token: str) -> None:
        def work(s: Session) -> None:
            s.execute(delete(models.AgentStream).where(models.AgentStream.instance_id == instance_id,
                                                       models.AgentStream.claim == token))
        with contextlib.suppress(Exception):  # the server may be stopping; a stale claim expires with it
            await asyncio.to_thread(db.run_transaction, self.sessions, work)

    def forget(self, instance_id: str) -> None:
        """The instance's stream is void wherever it is (deleted, restarted, moved): its holder drops it."""
        self.remote.pop(instance_id, None)

        def work(s: Session) -> None:
            s.execute(delete(models.AgentStream).where(models.AgentStream.instance_id == instance_id))
        try:
            db.run_transaction(self.sessions, work)
        except Exception:  # noqa: BLE001 - the holder's stream then simply lives on until it breaks
            log.exception("forgetting a stream failed", extra={"instance": instance_id})

    # -- the relay (asking side) ------------------------------------------------------------------
    async def ask(self, instance_id: str, command: agent_pb2.Command,
                  on_progress: Callable[[agent_pb2.Progress], Awaitable[None] | None] | None
                  ) -> asyncio.Future[agent_pb2.CommandResult]:
        """Posts a command for a guest whose stream may be on another server; the future gets its result."""
        cid = command.command_id
        fut: asyncio.Future[agent_pb2.CommandResult] = asyncio.get_running_loop().create_future()
        self._waiters[cid] = _Waiter(fut, on_progress)
        payload = command.SerializeToString()

        def work(s: Session) -> None:
            row = s.get(models.AgentRelay, cid, with_for_update=True)
            if row is None:
                s.add(models.AgentRelay(command_id=cid, instance_id=instance_id, origin=self.name, command=payload,
                                        created_at=now()))
            else:  # the same step again (its task moved here from a dead server): adopt the row and its result
                row.origin = self.name
        await asyncio.to_thread(self._retry_insert, work)
        return fut

    async def done_asking(self, command_id: str) -> None:
        self._waiters.pop(command_id, None)

        def work(s: Session) -> None:
            s.execute(delete(models.AgentRelay).where(models.AgentRelay.command_id == command_id,
                                                      models.AgentRelay.origin == self.name))
        with contextlib.suppress(Exception):
            await asyncio.to_thread(db.run_transaction, self.sessions, work)

    # -- the loop -------------------------------------------------------------------------------
    def _beat(self, s: Session) -> None:
        row = s.get(models.ServerMember, self.name)
        if row is None:
            s.add(models.ServerMember(name=self.name, agent_address=self.agent_address, seen_at=now()))
        else:
            row.seen_at, row.agent_address = now(), self.agent_address

    def _snapshot(self) -> tuple[list[tuple[str, str, bytes]], list[tuple[str, str, str, bytes, bytes | None,
                                                                             bytes | None]]]:
        def work(s: Session) -> Any:
            self._beat(s)
            alive_since = now() - dt.timedelta(seconds=self.member_expiry)
            alive = select(models.ServerMember.name).where(models.ServerMember.seen_at >= alive_since)
            streams = s.execute(select(models.AgentStream.instance_id, models.AgentStream.server_name,
                                       models.AgentStream.hello)
                                .where(models.AgentStream.server_name.in_(alive))).all()
            relays = s.execute(select(models.AgentRelay.command_id, models.AgentRelay.instance_id,
                                      models.AgentRelay.origin, models.AgentRelay.command,
                                      models.AgentRelay.progress, models.AgentRelay.result)).all()
            s.execute(delete(models.AgentRelay).where(models.AgentRelay.created_at < now() - RELAY_KEEP))
            return [tuple(r) for r in streams], [tuple(r) for r in relays]
        result: Any = db.run_transaction(self.sessions, work)
        return result  # type: ignore[no-any-return]

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                streams, relays = await asyncio.to_thread(self._snapshot)
                await self._apply(started, streams, relays)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a DB failover: the next poll tries again
                log.exception("cluster poll failed")
            self.polled.set()
            self.polled = asyncio.Event()
            await asyncio.sleep(self.poll_seconds)

    async def _apply(self, started: float, streams: list[tuple[str, str, bytes]],
                     relays: list[tuple[str, str, str, bytes, bytes | None, bytes | None]]) -> None:
        holders: dict[str, str] = {}
        remote: dict[str, RemoteStream] = {}
        for iid, server, hello in streams:
            holders[iid] = server
            if server != self.name:
                remote[iid] = RemoteStream(server, agent_pb2.Hello.FromString(hello))
        self.remote = remote
        if self.agents is None:
            return
        # A stream this server holds whose claim is gone (forgotten by a delete or a restart elsewhere) or
        # was taken by another server (the agent reconnected there) is dropped: one stream per guest.
        for iid in list(self.agents.local_ids()):
            at = self.agents.attached_at(iid)
            if holders.get(iid) != self.name and at is not None and at < started - 1.0:
                log.info("dropping a stream whose claim is gone", extra={"instance": iid})
                self.agents.drop_local(iid)
        local = set(self.agents.local_ids())
        for cid, iid, origin, command, progress, result in relays:
            waiter = self._waiters.get(cid) if origin == self.name else None
            if waiter is not None:
                if progress and progress != waiter.progress and waiter.on_progress is not None:
                    waiter.progress = progress
                    res = waiter.on_progress(agent_pb2.Progress.FromString(progress))
                    if asyncio.iscoroutine(res):
                        await res
                if result is not None and not waiter.future.done():
                    waiter.future.set_result(agent_pb2.CommandResult.FromString(result))
            if result is None and iid in local and cid not in self._relaying and origin != self.name:
                self._relaying[cid] = asyncio.create_task(
                    self._relay(cid, iid, agent_pb2.Command.FromString(command)))

    async def _relay(self, cid: str, iid: str, command: agent_pb2.Command) -> None:
        """Runs another server's command on a stream this server holds and writes the result back."""
        assert self.agents is not None
        last = 0.0

        async def progress(p: agent_pb2.Progress) -> None:
            nonlocal last
            if time.monotonic() - last < 1.0:
                return
            last = time.monotonic()
            await asyncio.to_thread(self._write, cid, progress=p.SerializeToString())
        try:
            try:
                result = await self.agents.call_local(iid, command, progress)
            except RedDwarfError as err:
                result = agent_pb2.CommandResult(command_id=cid, status=to_status_pb(err))
            if result is not None:
                await asyncio.to_thread(self._write, cid, result=result.SerializeToString())
            # None: the guest left this server before answering; whoever it reconnects to sends it again.
        except Exception:  # noqa: BLE001
            log.exception("relaying a command failed", extra={"command": cid, "instance": iid})
        finally:
            self._relaying.pop(cid, None)

    def _write(self, cid: str, **values: bytes) -> None:
        def work(s: Session) -> None:
            s.execute(update(models.AgentRelay).where(models.AgentRelay.command_id == cid,
                                                      models.AgentRelay.result.is_(None)).values(**values))
        db.run_transaction(self.sessions, work)


class WatchNotifier:
    """Pokes WatchInstance watchers on this server when another server changed what they watch: every
    `poll_seconds` it reads a fingerprint of each watched instance (its row and its newest task) and
    publishes on the local bus when it moved. Changes made here are published directly as before; a poke
    for a change a watcher already saw is harmless (WatchInstance sends only what differs)."""

    def __init__(self, sessions: sessionmaker[Session], bus: EventBus, poll_seconds: float = 0.5) -> None:
        self.sessions = sessions
        self.bus = bus
        self.poll_seconds = poll_seconds
        self._seen: dict[str, tuple[Any, ...]] = {}
        # Called with the instance id before its watchers are poked (drops this server's cached view of it).
        self.on_change: Callable[[str], None] | None = None

    def _fingerprints(self, ids: list[str]) -> dict[str, tuple[Any, ...]]:
        with self.sessions() as s:
            rows = s.execute(select(models.Instance.id, models.Instance.status, models.Instance.updated_at,
                                    models.Instance.health_at, models.Instance.task_id,
                                    models.Instance.deleted_at)
                             .where(models.Instance.id.in_(ids))).all()
            resources = [f"instances/{i}" for i in ids]
            newest = (select(models.Task.resource, func.max(models.Task.updated_at).label("at"))
                      .where(models.Task.resource.in_(resources)).group_by(models.Task.resource).subquery())
            tasks = s.execute(select(models.Task.resource, models.Task.state, models.Task.current_step,
                                     models.Task.progress_percent, models.Task.updated_at)
                              .join(newest, (models.Task.resource == newest.c.resource)
                                    & (models.Task.updated_at == newest.c.at))).all()
        out: dict[str, tuple[Any, ...]] = {r[0]: tuple(r[1:]) for r in rows}
        for resource, *rest in tasks:
            iid = resource.split("/", 1)[1]
            out[iid] = (*out.get(iid, ()), *rest)
        return out

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            ids = sorted(self.bus.watched())
            if not ids:
                self._seen.clear()
                continue
            try:
                prints = await asyncio.to_thread(self._fingerprints, ids)
            except Exception:  # noqa: BLE001 - a DB failover: the next poll tries again
                log.exception("watch poll failed")
                continue
            for iid in ids:
                fp = prints.get(iid, ())
                if self._seen.get(iid) != fp:  # a new watcher too: what changed before it subscribed
                    if self.on_change is not None:
                        self.on_change(iid)
                    self.bus.publish(iid, "updated")
                self._seen[iid] = fp
            for gone in set(self._seen) - set(ids):
                del self._seen[gone]


class RevocationSync:
    """Keeps this server's CRL a superset of every revocation recorded in the state DB: each server signs
    and pushes the CRL of its own CA directory (common/pki.py), so without this a host would be handed a
    list lacking what another server revoked. Every `poll_seconds` the serials revoked in `certificates`
    that this CA directory lacks are revoked here too (which re-signs and pushes the CRL to the hosts)."""

    def __init__(self, sessions: sessionmaker[Session], ca: Any, poll_seconds: float = 2.0) -> None:
        self.sessions = sessions
        self.ca = ca
        self.poll_seconds = poll_seconds

    def sync_once(self) -> int:
        with self.sessions() as s:
            recorded = {int(h, 16) for h in s.scalars(select(models.Certificate.serial)
                                                      .where(models.Certificate.revoked_at.is_not(None)))}
        missing = recorded - set(self.ca.revoked_serials())
        for serial in sorted(missing):
            self.ca.revoke(serial)
        if missing:
            log.info("revocations of other servers added to the CRL", extra={"count": len(missing)})
        return len(missing)

    async def run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.sync_once)
            except Exception:  # noqa: BLE001 - a DB failover: the next round tries again
                log.exception("revocation sync failed")
            await asyncio.sleep(self.poll_seconds)

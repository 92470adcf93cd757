"""Maintenance windows and the actions that wait for them (issue 17, part 5).

Each instance has a weekly window in UTC (a weekday, a start time, a duration; Sunday 03:00 for 60 minutes
unless set). Disruptive work is queued as a pending action (`pending_maintenance`) instead of done at once:
a restart a static configuration change needs (RESTART_REQUIRED), an agent upgrade, and what other modules
register (`register_action("upgrade", handler)`). `tick()` — run by every server's loop, or by a test with
its own clock — starts each action as a durable task inside its instance's window (or at once when asked).

Several servers: an action is started by a compare-and-set of its state (pending → running) in the same
transaction that submits its task, under a task id derived from the action, so one action becomes one task
whichever server saw it first; the task engine's leases then run that task once. `open_key` is unique while
an action is open, so two servers cannot queue the same kind twice for one instance.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, RedDwarfError
from reddwarf.common.states import TaskState
from reddwarf.v1 import database_pb2

from . import models, tasks
from .db import run_transaction
from .instance_views import STOPPED

log = logging.getLogger("reddwarf.server.maintenance")

DEFAULT_WEEKDAY, DEFAULT_START, DEFAULT_DURATION = 7, 3 * 60, 60
MIN_DURATION, MAX_DURATION = 30, 24 * 60
_TIME = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
KINDS = ("restart", "agent_upgrade", "upgrade", "patch")
PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"
OPEN = (PENDING, RUNNING)
RETRY_AFTER = dt.timedelta(hours=1)
# Task ids derived from action ids: one action, one task id, whichever server starts it.
_TASK_IDS = uuid.UUID("5b0f4c36-9e53-4a43-8d3f-0c1c2f6a0d17")


@dataclass(frozen=True)
class Window:
    weekday: int  # ISO: 1 = Monday .. 7 = Sunday
    start_minute: int
    duration_minutes: int

    @property
    def start_time(self) -> str:
        return f"{self.start_minute // 60:02d}:{self.start_minute % 60:02d}"

    def _starts_around(self, now: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
        """This week's start of the window and last week's (a window may run over midnight, or Sunday)."""
        monday = (now - dt.timedelta(days=now.isoweekday() - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
        this = monday + dt.timedelta(days=self.weekday - 1, minutes=self.start_minute)
        return this, this - dt.timedelta(days=7)

    def contains(self, now: dt.datetime) -> bool:
        length = dt.timedelta(minutes=self.duration_minutes)
        return any(s <= now < s + length for s in self._starts_around(now))

    def next_start(self, now: dt.datetime) -> dt.datetime:
        """The start of the window now is in, else of the next one."""
        this, last = self._starts_around(now)
        length = dt.timedelta(minutes=self.duration_minutes)
        for s in (last, this):
            if s <= now < s + length:
                return s
        return this if this > now else this + dt.timedelta(days=7)

    def next_change(self, now: dt.datetime) -> dt.datetime:
        """When `contains` next changes: the end of the window now is in, else the next start."""
        start = self.next_start(now)
        return start + dt.timedelta(minutes=self.duration_minutes) if start <= now else start

    def to_pb(self) -> database_pb2.MaintenanceWindow:
        return database_pb2.MaintenanceWindow(weekday=self.weekday, start_time=self.start_time,
                                              duration_minutes=self.duration_minutes)


DEFAULT = Window(DEFAULT_WEEKDAY, DEFAULT_START, DEFAULT_DURATION)


def parse_window(pb: database_pb2.MaintenanceWindow, field: str) -> Window:
    """The window a request asks for, or InvalidArgument naming the bad field (`field`.weekday ...)."""
    if not 1 <= pb.weekday <= 7:
        raise InvalidArgument(f"{field}.weekday must be 1 (Monday) .. 7 (Sunday), not {pb.weekday}",
                              field=f"{field}.weekday")
    m = _TIME.fullmatch(pb.start_time)
    if m is None:
        raise InvalidArgument(f"{field}.start_time must be HH:MM in UTC (00:00 .. 23:59), not {pb.start_time[:20]!r}",
                              field=f"{field}.start_time")
    duration = pb.duration_minutes or DEFAULT_DURATION
    if not MIN_DURATION <= duration <= MAX_DURATION:
        raise InvalidArgument(f"{field}.duration_minutes must be {MIN_DURATION}..{MAX_DURATION}, not {duration}",
                              field=f"{field}.duration_minutes")
    return Window(pb.weekday, int(m.group(1)) * 60 + int(m.group(2)), duration)


def set_window(s: Session, instance_id: str, w: Window) -> None:
    row = s.get(models.MaintenanceWindow, instance_id)
    if row is None:
        s.add(models.MaintenanceWindow(instance_id=instance_id, weekday=w.weekday, start_minute=w.start_minute,
                                       duration_minutes=w.duration_minutes))
    else:
        row.weekday, row.start_minute, row.duration_minutes = w.weekday, w.start_minute, w.duration_minutes


def window_of(s: Session, instance_id: str) -> Window:
    row = s.get(models.MaintenanceWindow, instance_id)
    return DEFAULT if row is None else Window(row.weekday, row.start_minute, row.duration_minutes)


# ---------------------------------------------------------------------------- the registry of actions

# Starts an action: submits its task in the caller's transaction (with the given task id) and returns the
# task's kind. Raise to leave the action pending (e.g. the instance cannot take it now).
Handler = Callable[[Session, models.Instance, models.PendingMaintenance, str], None]
_HANDLERS: dict[str, Handler] = {}


def register_action(kind: str, handler: Handler) -> None:
    """Lets a module (upgrades, patches) say how its kind of action starts."""
    _HANDLERS[kind] = handler


def registered(kind: str) -> bool:
    return kind in _HANDLERS


def _restart(s: Session, row: models.Instance, action: models.PendingMaintenance, task_id: str) -> None:
    if row.status == STOPPED:
        raise FailedPrecondition("the instance is stopped; its restart waits until it runs", field="name")
    tasks.submit(s, "restart_instance", f"instances/{row.id}", {"maintenance": action.id}, task_id=task_id)


# agent_upgrade (server/agent_upgrade.py), upgrade and patch are registered by the modules that carry them
# out; until one is, an action of that kind waits (it is listed, never started).
register_action("restart", _restart)


def queue(s: Session, instance_id: str, kind: str, description: str, params: dict[str, object] | None = None,
          apply_now: bool = False) -> models.PendingMaintenance:
    """Queues an action (or returns the open one of that kind: at most one per instance and kind)."""
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}", field="kind")
    existing = s.scalar(select(models.PendingMaintenance).where(
        models.PendingMaintenance.open_key == f"{instance_id}:{kind}"))
    if existing is not None:
        if apply_now and existing.state == PENDING:
            existing.apply_now = True
        return existing
    action = models.PendingMaintenance(id=str(uuid.uuid4()), instance_id=instance_id, kind=kind,
                                       description=description, params=dict(params or {}), state=PENDING,
                                       apply_now=apply_now, open_key=f"{instance_id}:{kind}", detail="")
    s.add(action)
    s.flush()
    return action


def open_actions(s: Session, instance_id: str) -> list[models.PendingMaintenance]:
    return list(s.scalars(select(models.PendingMaintenance).where(
        models.PendingMaintenance.instance_id == instance_id, models.PendingMaintenance.state.in_(OPEN))
        .order_by(models.PendingMaintenance.created_at)))


def apply_now(s: Session, instance_id: str, kinds: list[str]) -> int:
    """Marks the instance's pending actions (of `kinds`, or all) to run at the next tick; how many. A
    restart a static value needs is queued first, so asking right after the change finds it."""
    for k in kinds:
        if k not in KINDS:
            raise InvalidArgument(f"kinds: {k[:40]!r} is not one of {', '.join(KINDS)}", field="kinds")
    _finish_running(s)
    _queue_restarts(s)
    n = 0
    for a in open_actions(s, instance_id):
        if a.state == PENDING and (not kinds or a.kind in kinds):
            a.apply_now = True
            n += 1
    return n


def _ts(t: dt.datetime) -> Timestamp:
    pb = Timestamp()
    pb.FromDatetime(t)
    return pb


def decorate(s: Session, pb: database_pb2.Instance, now: dt.datetime | None = None,
             window: Window | None = None) -> database_pb2.Instance:
    """Adds the window (`window`, when the caller read it already), the open actions (each with when it runs)
    and the agent's version to a view."""
    now = now or utcnow()
    w = window or window_of(s, pb.id)
    pb.maintenance_window.CopyFrom(w.to_pb())
    nxt = w.next_start(now)
    for a in open_actions(s, pb.id):
        if a.state == RUNNING and a.task_id:
            task = s.get(models.Task, a.task_id)
            if task is None or task.state not in tasks.ACTIVE_STATES:
                continue  # ended: closed by the next pass
        when = now if a.apply_now or a.state == RUNNING or w.contains(now) else nxt
        pb.pending_maintenance.append(database_pb2.PendingMaintenance(
            kind=a.kind, description=a.description, apply_after=_ts(when), state=a.state,
            task=f"tasks/{a.task_id}" if a.task_id else "", create_time=_ts(a.created_at)))
    av = s.get(models.AgentVersion, pb.id)
    if av is not None:
        pb.agent_version = av.version
    return pb


def record_agent_version(sessions: sessionmaker[Session], instance_id: str, version: str, boot_id: str) -> None:
    """What an agent said on its hello; an agent too old to say its version is recorded as ""."""
    run_transaction(sessions, lambda s: _record_agent_version(s, instance_id, version, boot_id))


def _record_agent_version(s: Session, instance_id: str, version: str, boot_id: str) -> None:
    if s.get(models.Instance, instance_id) is None:
        return
    row = s.get(models.AgentVersion, instance_id)
    if row is None:
        s.add(models.AgentVersion(instance_id=instance_id, version=version[:64], boot_id=boot_id[:64],
                                  seen_at=utcnow()))
    else:
        row.version, row.boot_id, row.seen_at = version[:64], boot_id[:64], utcnow()


# ---------------------------------------------------------------------------- the scheduler

def _queue_restarts(s: Session) -> None:
    """A RESTART_REQUIRED instance gets a pending restart; one restarted meanwhile loses it."""
    needing = set(s.scalars(select(models.InstanceConfiguration.instance_id).join(
        models.Instance, models.Instance.id == models.InstanceConfiguration.instance_id).where(
        models.InstanceConfiguration.restart_required.is_(True), models.Instance.deleted_at.is_(None))))
    queued = {a.instance_id: a for a in s.scalars(select(models.PendingMaintenance).where(
        models.PendingMaintenance.kind == "restart", models.PendingMaintenance.state.in_(OPEN)))}
    # A restart that failed lately is not queued again at once (inside the window it would be retried every
    # pass): the next try is after RETRY_AFTER, its fault shown on the instance meanwhile.
    recent = set(s.scalars(select(models.PendingMaintenance.instance_id).where(
        models.PendingMaintenance.kind == "restart", models.PendingMaintenance.state == FAILED,
        models.PendingMaintenance.updated_at > utcnow() - RETRY_AFTER)))
    for iid in needing - set(queued) - recent:
        try:
            with s.begin_nested():
                queue(s, iid, "restart", "restart to apply static configuration values",
                      {"reason": "restart_required"})
        except IntegrityError:
            pass  # another server queued it the same moment
    for iid, a in queued.items():
        if iid not in needing and a.state == PENDING and a.params.get("reason") == "restart_required":
            a.state, a.open_key, a.detail = CANCELLED, None, "no longer needed: the instance restarted"


def _finish_running(s: Session) -> None:
    """Actions whose task ended are done (or failed, with the task's fault) and no longer open."""
    for a in s.scalars(select(models.PendingMaintenance).where(models.PendingMaintenance.state == RUNNING)):
        task = s.get(models.Task, a.task_id) if a.task_id else None
        if task is None or task.state in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED):
            ok = task is not None and task.state == TaskState.SUCCEEDED
            a.state, a.open_key = (DONE if ok else FAILED), None
            a.detail = "" if ok else (task.fault_message if task is not None else "its task is gone")[:2000]


def _start_due(sessions: sessionmaker[Session], now: dt.datetime) -> list[str]:
    with sessions() as s:
        due = [(a.id, a.instance_id, a.apply_now) for a in s.scalars(select(models.PendingMaintenance).where(
            models.PendingMaintenance.state == PENDING))]
    started = []
    for aid, iid, asked in due:
        with sessions() as s, s.begin():
            row = s.get(models.Instance, iid)
            if row is None or row.deleted_at is not None:
                s.execute(update(models.PendingMaintenance).where(models.PendingMaintenance.id == aid)
                          .values(state=CANCELLED, open_key=None, detail="the instance is gone"))
                continue
            if not asked and not window_of(s, iid).contains(now):
                continue
            if tasks.active_task_for(s, f"instances/{iid}") is not None:
                continue  # busy: the action waits (inside the window, the next tick tries again)
            task_id = str(uuid.uuid5(_TASK_IDS, aid))
            # The compare-and-set: only one server moves it to running and submits its task.
            claimed = tasks._rowcount(s, update(models.PendingMaintenance).where(
                models.PendingMaintenance.id == aid, models.PendingMaintenance.state == PENDING)
                .values(state=RUNNING, task_id=task_id, updated_at=utcnow()))
            if claimed != 1:
                continue
            action = s.get(models.PendingMaintenance, aid)
            handler = _HANDLERS.get(action.kind) if action is not None else None
            if action is None or handler is None:
                s.rollback()
                log.warning("no handler for maintenance action yet; it waits", extra={"action": aid})
                continue
            try:
                handler(s, row, action, task_id)
            except RedDwarfError as exc:  # it cannot start now: it stays pending, the next pass tries again
                s.rollback()
                log.info("maintenance action waits", extra={"action": aid, "reason": exc.message})
                continue
            log.info("maintenance action started", extra={"instance": iid, "kind": action.kind, "task": task_id})
            started.append(task_id)
    return started


def _sqlite_busy(exc: OperationalError) -> bool:
    # SQLite in WAL mode refuses at once (no busy wait) a read transaction that turns writer after another
    # connection wrote: the transaction was rolled back, and this pass is safe to run again.
    return "database is locked" in str(exc.orig)


def tick(sessions: sessionmaker[Session], now: dt.datetime | None = None) -> list[str]:
    """One pass: queue restarts, close ended actions, start the due ones. Returns the tasks it submitted.
    `now` is injectable so a test can stand inside or outside a window without waiting for the weekday.
    Every step is guarded (open_key, the pending → running compare-and-set), so a pass runs again whole."""
    now = now or utcnow()
    for attempt in range(1, 9):
        try:
            with sessions() as s, s.begin():
                _finish_running(s)
                _queue_restarts(s)
            return _start_due(sessions, now)
        except OperationalError as exc:
            if attempt == 8 or not _sqlite_busy(exc):
                raise
            time.sleep(random.uniform(0, 0.05 * attempt))
    raise AssertionError("unreachable")


async def run_loop(sessions: sessionmaker[Session], engine: tasks.TaskEngine, every: float,
                   clock: Callable[[], dt.datetime] = utcnow) -> None:
    while True:
        try:
            if await asyncio.to_thread(tick, sessions, clock()):
                engine.wake()
        except Exception:  # noqa: BLE001 - the next pass tries again
            log.exception("maintenance pass failed")
        await asyncio.sleep(every)

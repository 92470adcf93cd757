"""The durable task engine: long operations (create, delete, resize...) as named, idempotent steps in the
state DB, so that a killed server, or another server sharing the DB, resumes them from the recorded step.

A task row (models.Task) holds its kind, resource, params and the record of every step (started/finished).
Workers claim runnable tasks under a lease (lease_owner/lease_expires) — `SELECT ... FOR UPDATE SKIP LOCKED`
on MariaDB/PostgreSQL, a compare-and-set UPDATE on SQLite — and renew it while a step runs. A worker that
loses its lease stops at once, so two servers never run one task at the same time. Every write a worker
makes is guarded by `lease_owner = me`. Transient failures are retried with backoff (the lease's expiry
doubles as the not-before time); anything else, or too many attempts, ends the task in FAILED after the
kind's compensation ran.

Fairness: every task records its tenant (from its resource at submit). Workers belong to pools: the main
pool runs every kind no other pool names; a Pool of its own (VerifyBackup's hours-long scratch restores)
never takes the main pool's workers. In each pool, a tenant with `per_tenant` tasks running (live leases,
counted in the DB, so across servers) is passed over: its queue waits and other tenants' tasks run. Claims
within one engine are serialised per pool, so its own workers never overshoot the cap; two servers
claiming the same instant may, by one task each.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import signal
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, Update, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import errors
from reddwarf.common.clock import now as utcnow
from reddwarf.common.log import bind
from reddwarf.common.states import StepState, TaskState
from reddwarf.server.models import Backup, Instance, Task

log = logging.getLogger("reddwarf.server.tasks")

ACTIVE_STATES = (TaskState.PENDING, TaskState.RUNNING)
ENDED_STATES = (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class TransientError(Exception):
    """A step failed for a reason that may pass (a host briefly unreachable): retry with backoff."""


class LeaseLost(Exception):
    """Another worker owns the task now (our lease expired): stop without touching it."""


# Domain errors that mean "try again later" rather than "this request cannot succeed".
_TRANSIENT = (TransientError, errors.Unavailable, errors.DeadlineExceeded, errors.Aborted, ConnectionError,
              TimeoutError, asyncio.TimeoutError)


def _expiry(at: dt.datetime) -> dt.datetime:
    """Rounds a lease expiry up to a whole second: MariaDB's DATETIME drops fractions, and a lease must
    never be stored shorter than it was granted."""
    return at.replace(microsecond=0) + dt.timedelta(seconds=1) if at.microsecond else at


def _rowcount(s: Session, statement: Update) -> int:
    """How many rows an UPDATE matched: the compare-and-set test of leases and guarded writes."""
    return int(cast(CursorResult[Any], s.execute(statement)).rowcount or 0)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT)


StepFn = Callable[["StepContext"], Awaitable[None]]


@dataclass(frozen=True)
class Step:
    name: str
    run: StepFn


@dataclass(frozen=True)
class TaskKind:
    """What a kind of task does: its ordered steps, and what to do when it ends."""
    name: str
    steps: tuple[Step, ...]
    # Undo what the finished steps allocated (idempotent); runs before the task is marked FAILED.
    compensate: StepFn | None = None
    # Called after the task is marked FAILED (e.g. put the instance in ERROR with the fault).
    on_failed: Callable[[StepContext, str, str], Awaitable[None]] | None = None
    max_attempts: int = 5


@dataclass
class StepContext:
    """What a running step sees: the task's ids and params, and ways to record progress."""
    engine: TaskEngine
    task_id: str
    kind: str
    resource: str
    params: dict[str, Any]
    step: str = ""
    attempts: int = 0
    submitted: dt.datetime | None = None
    log: logging.LoggerAdapter[logging.Logger] = field(default_factory=lambda: bind(log, {}))

    @property
    def resource_id(self) -> str:
        return self.resource.split("/", 1)[1] if "/" in self.resource else self.resource

    async def save(self, **updates: Any) -> None:
        """Records step outputs (host chosen, port...) in the task's params before the step returns, so
        a resumed step finds them. Never pass secrets: params are stored in clear."""
        self.params.update(updates)
        await self.engine._write(self.task_id, params=dict(self.params))

    async def progress(self, percent: int) -> None:
        await self.engine._write(self.task_id, progress_percent=max(0, min(100, int(percent))))


@dataclass(frozen=True)
class TaskView:
    """A task as callers outside the engine see it."""
    id: str
    kind: str
    resource: str
    state: TaskState
    current_step: str
    progress_percent: int
    fault_message: str
    steps: tuple[dict[str, Any], ...]


def view(task: Task) -> TaskView:
    return TaskView(task.id, task.kind, task.resource, TaskState(task.state), task.current_step, task.progress_percent,
                    task.fault_message, tuple(task.steps or ()))


def tenant_of(session: Session, resource: str) -> str | None:
    """The tenant owning `instances/<id>` or `backups/<id>` (None for anything else, or a row not there)."""
    collection, _, rid = resource.partition("/")
    row: Instance | Backup | None = None
    if collection == "instances" and rid:
        row = session.get(Instance, rid)
    elif collection == "backups" and rid:
        row = session.get(Backup, rid)
    return row.tenant_id if row is not None else None


def submit(session: Session, kind: str, resource: str, params: dict[str, Any] | None = None,
           task_id: str | None = None, tenant_id: str | None = None) -> Task:
    """Adds a pending task in the caller's transaction, so the resource row and its task commit together
    (a crash between them cannot leave an instance without its create task). Its tenant, unless given, is
    the resource's (flushed) row's."""
    task = Task(id=task_id or str(uuid.uuid4()), kind=kind, resource=resource, state=TaskState.PENDING,
                steps=[], params=dict(params or {}), attempts=0, progress_percent=0,
                tenant_id=tenant_id if tenant_id is not None else tenant_of(session, resource))
    session.add(task)
    return task


def active_task_for(session: Session, resource: str) -> Task | None:
    return session.scalars(select(Task).where(Task.resource == resource, Task.state.in_(ACTIVE_STATES))
                           .order_by(Task.created_at)).first()


ChangeListener = Callable[[str, str], None]  # (task_id, resource)
# (kind, outcome "succeeded" | "failed", seconds from submit to that end): told once per task that ended here.
EndListener = Callable[[str, str, float], None]


@dataclass(frozen=True)
class Pool:
    """Workers of their own for some kinds: `workers` of them, at most `per_tenant` (0: no cap) running
    one tenant's tasks. kinds=() is the main pool: every kind no other pool names."""
    name: str
    workers: int
    per_tenant: int = 0
    kinds: tuple[str, ...] = ()


class TaskEngine:
    """Runs tasks from the state DB under leases owned by `owner`: `workers` in the main pool (at most
    `per_tenant` of them on one tenant's tasks; 0 = no cap), plus the workers of `pools`."""

    def __init__(self, session_factory: sessionmaker[Session], owner: str, *, workers: int = 4,
                 per_tenant: int = 0, pools: Sequence[Pool] = (),
                 lease_seconds: float = 30.0, poll_seconds: float = 0.5, backoff_seconds: float = 1.0,
                 backoff_max_seconds: float = 30.0, exit_after_step: str = "",
                 on_change: ChangeListener | None = None, on_end: EndListener | None = None) -> None:
        self.session_factory = session_factory
        self.owner = owner
        self.workers = workers
        self.pools = (Pool("main", workers, per_tenant), *pools)
        self._claim_locks = {p.name: threading.Lock() for p in self.pools}
        self.lease = dt.timedelta(seconds=lease_seconds)
        self.poll_seconds = poll_seconds
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        # Test-only crash hook: the process SIGKILLs itself right after recording this step as finished.
        self.exit_after_step = exit_after_step
        self.on_change = on_change
        self.on_end = on_end
        self.kinds: dict[str, TaskKind] = {}
        self._runners: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._resources: dict[str, str] = {}  # task id -> resource, for change listeners
        self._dialect = session_factory.kw["bind"].dialect.name if session_factory.kw.get("bind") else ""

    def register(self, kind: TaskKind) -> None:
        self.kinds[kind.name] = kind

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Reclaims our own stale leases (a restarted server with the same owner resumes at once), then
        starts the workers."""
        n = await asyncio.to_thread(self._release_own_leases)
        if n:
            log.info("reclaimed own task leases count=%s owner=%s", n, self.owner)
        self._stopping = False
        self._runners = [asyncio.create_task(self._worker(i, pool), name=f"task-worker-{pool.name}-{i}")
                         for pool in self.pools for i in range(pool.workers)]

    async def stop(self) -> None:
        """Stops the workers; tasks they were running keep their recorded step and resume later."""
        self._stopping = True
        self._wake.set()
        for r in self._runners:
            r.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        self._runners = []
        await asyncio.to_thread(self._release_own_leases)

    def abandon(self) -> None:
        """Test aid: stop like a crash would — workers vanish, leases stay until they expire."""
        for r in self._runners:
            r.cancel()
        self._runners = []

    def wake(self) -> None:
        """A task was submitted: look now rather than at the next poll."""
        self._wake.set()

    # ------------------------------------------------------------------ claiming

    def _release_own_leases(self) -> int:
        with self.session_factory() as s, s.begin():
            return _rowcount(s, update(Task).where(Task.lease_owner == self.owner, Task.state.in_(ACTIVE_STATES))
                             .values(lease_owner=None, lease_expires=None))

    def pool_kinds(self, pool: Pool) -> list[str]:
        """The registered kinds `pool` runs."""
        if pool.kinds:
            return [k for k in pool.kinds if k in self.kinds]
        elsewhere = {k for p in self.pools for k in p.kinds}
        return [k for k in self.kinds if k not in elsewhere]

    def _busy_tenants(self, s: Session, kinds: list[str], cap: int, now: dt.datetime) -> list[str]:
        """Tenants with `cap` or more of these kinds running under a live lease (any server's)."""
        return list(s.scalars(
            select(Task.tenant_id).where(Task.kind.in_(kinds), Task.state == TaskState.RUNNING,
                                         Task.lease_owner.is_not(None), Task.lease_expires >= now,
                                         Task.tenant_id.is_not(None))
            .group_by(Task.tenant_id).having(func.count() >= cap)))

    def _claim(self, pool: Pool | None = None) -> Task | None:
        pool = pool or self.pools[0]
        kinds = self.pool_kinds(pool)
        if not kinds:
            return None
        with self._claim_locks[pool.name]:
            return self._claim_locked(pool, kinds)

    def _claim_locked(self, pool: Pool, kinds: list[str]) -> Task | None:
        now = utcnow()
        runnable = [Task.state.in_(ACTIVE_STATES), Task.kind.in_(kinds),
                    or_(Task.lease_expires.is_(None), Task.lease_expires < now)]
        with self.session_factory() as s, s.begin():
            if pool.per_tenant:
                busy = self._busy_tenants(s, kinds, pool.per_tenant, now)
                if busy:
                    runnable.append(or_(Task.tenant_id.is_(None), Task.tenant_id.not_in(busy)))
            if self._dialect in ("mysql", "mariadb", "postgresql"):
                task = s.scalars(select(Task).where(*runnable).order_by(Task.created_at).limit(1)
                                 .with_for_update(skip_locked=True)).first()
                if task is None:
                    return None
                task.lease_owner = self.owner
                task.lease_expires = _expiry(now + self.lease)
                task.state = TaskState.RUNNING
                s.flush()
                s.expunge(task)
                return task
            # SQLite has no row locks: compare-and-set on the lease, losing races to other engines.
            ids = list(s.scalars(select(Task.id).where(*runnable).order_by(Task.created_at).limit(8)))
        random.shuffle(ids)  # fewer collisions between engines polling at once
        for task_id in ids:
            with self.session_factory() as s, s.begin():
                claimed = _rowcount(s, update(Task).where(
                    Task.id == task_id, Task.state.in_(ACTIVE_STATES),
                    or_(Task.lease_expires.is_(None), Task.lease_expires < now))
                    .values(lease_owner=self.owner, lease_expires=_expiry(now + self.lease), state=TaskState.RUNNING))
                if claimed == 1:
                    task = s.get(Task, task_id)
                    assert task is not None
                    s.expunge(task)
                    return task
        return None

    async def run_one(self, pool: Pool | None = None) -> bool:
        """Claims and runs one runnable task of `pool` (default: the main pool) to its end (or to a
        retry); False when none was runnable."""
        task = await asyncio.to_thread(self._claim, pool)
        if task is None:
            return False
        await self._run(task)
        return True

    async def _worker(self, index: int, pool: Pool | None = None) -> None:
        while not self._stopping:
            try:
                ran = await self.run_one(pool)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task worker error owner=%s worker=%s", self.owner, index)
                ran = False
            if not ran:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds * (1 + random.random()))
                except TimeoutError:
                    pass

    # ------------------------------------------------------------------ guarded writes

    def _write_sync(self, task_id: str, **values: Any) -> None:
        values.setdefault("updated_at", utcnow())
        with self.session_factory() as s, s.begin():
            if _rowcount(s, update(Task).where(Task.id == task_id, Task.lease_owner == self.owner)
                         .values(**values)) != 1:
                raise LeaseLost(task_id)

    async def _write(self, task_id: str, **values: Any) -> None:
        await asyncio.to_thread(self._write_sync, task_id, **values)
        self._notify(task_id, values)

    def _notify(self, task_id: str, values: dict[str, Any]) -> None:
        if self.on_change is None:
            return
        resource = self._resources.get(task_id, "")
        try:
            self.on_change(task_id, resource)
        except Exception:
            log.exception("task change listener failed task=%s", task_id)

    def _ended(self, ctx: StepContext, outcome: str) -> None:
        if self.on_end is None:
            return
        seconds = (utcnow() - ctx.submitted).total_seconds() if ctx.submitted is not None else 0.0
        try:
            self.on_end(ctx.kind, outcome, max(0.0, seconds))
        except Exception:
            log.exception("task end listener failed task=%s", ctx.task_id)

    # ------------------------------------------------------------------ running

    async def _renew(self, task_id: str, runner: asyncio.Task[Any]) -> None:
        interval = self.lease.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.to_thread(self._write_sync, task_id, lease_expires=_expiry(utcnow() + self.lease))
            except LeaseLost:
                log.warning("task lease lost; stopping it here task=%s owner=%s", task_id, self.owner)
                runner.cancel()
                return
            except Exception:
                # The DB hiccuped: keep trying; the lease still has 2/3 of its time.
                log.exception("task lease renewal failed task=%s", task_id)

    async def _run(self, task: Task) -> None:
        kind = self.kinds[task.kind]
        self._resources[task.id] = task.resource
        ctx = StepContext(self, task.id, task.kind, task.resource, dict(task.params or {}),
                          attempts=task.attempts, submitted=task.created_at,
                          log=bind(log, {"task": task.id, "kind": task.kind, "resource": task.resource}))
        steps: list[dict[str, Any]] = [dict(x) for x in (task.steps or [])]
        done = {x["step"] for x in steps if x.get("state") == StepState.DONE}
        body = asyncio.create_task(self._run_steps(ctx, kind, steps, done))
        renew = asyncio.create_task(self._renew(task.id, body))
        try:
            await body
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # we were cancelled (stop/abandon): the lease expires or is released by stop()
            ctx.log.info("task stopped after losing its lease")
        except LeaseLost:
            ctx.log.warning("task lease lost; another worker has it")
        finally:
            renew.cancel()
            if not body.done():
                body.cancel()
            await asyncio.gather(renew, body, return_exceptions=True)
            self._resources.pop(task.id, None)
            self._wake.set()  # a tenant's slot may have freed: a passed-over task can run now

    async def _run_steps(self, ctx: StepContext, kind: TaskKind, steps: list[dict[str, Any]],
                         done: set[str]) -> None:
        total = len(kind.steps)
        for index, step in enumerate(kind.steps):
            if step.name in done:
                continue
            ctx.step = step.name
            record = next((x for x in steps if x["step"] == step.name), None)
            if record is None:
                record = {"step": step.name}
                steps.append(record)
            record.update(state=StepState.RUNNING, started=utcnow().isoformat(), finished=None, detail="")
            await self._write(ctx.task_id, steps=[dict(x) for x in steps], current_step=step.name)
            ctx.log.info("task step started step=%s", step.name)
            try:
                await step.run(ctx)
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as exc:
                await self._step_failed(ctx, kind, steps, record, exc)
                return
            record.update(state=StepState.DONE, finished=utcnow().isoformat())
            await self._write(ctx.task_id, steps=[dict(x) for x in steps], params=dict(ctx.params),
                              progress_percent=int((index + 1) * 100 / total))
            ctx.log.info("task step finished step=%s", step.name)
            if self.exit_after_step and self.exit_after_step == f"{kind.name}:{step.name}":
                ctx.log.warning("test hook: killing the server after step step=%s", step.name)
                os.kill(os.getpid(), signal.SIGKILL)
        await self._write(ctx.task_id, state=TaskState.SUCCEEDED, current_step="", progress_percent=100,
                          lease_owner=None, lease_expires=None)
        ctx.log.info("task succeeded")
        self._ended(ctx, "succeeded")

    async def _step_failed(self, ctx: StepContext, kind: TaskKind, steps: list[dict[str, Any]],
                           record: dict[str, Any], exc: Exception) -> None:
        message = exc.message if isinstance(exc, errors.RedDwarfError) else str(exc) or type(exc).__name__
        attempts = ctx.attempts + 1
        record.update(state=StepState.ERROR, detail=message[-1000:])
        if is_transient(exc) and attempts < kind.max_attempts:
            delay = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempts - 1))
            delay *= 0.5 + random.random() / 2
            ctx.log.warning("task step failed; will retry step=%s attempt=%s retry_in=%.1f error=%s",
                            ctx.step, attempts, delay, message)
            # Release the lease with an expiry in the future: no one claims it before the backoff ends.
            await self._write(ctx.task_id, steps=[dict(x) for x in steps], attempts=attempts,
                              params=dict(ctx.params), lease_owner=None,
                              lease_expires=_expiry(utcnow() + dt.timedelta(seconds=delay)))
            return
        ctx.log.error("task step failed step=%s attempts=%s error=%s", ctx.step, attempts, message,
                      exc_info=not isinstance(exc, errors.RedDwarfError))
        fault = f"{kind.name} failed at step {ctx.step}: {message}"
        details = f"step={ctx.step} attempts={attempts} error={type(exc).__name__}: {message}"[-4000:]
        if kind.compensate is not None:
            try:
                await kind.compensate(ctx)
            except (asyncio.CancelledError, LeaseLost):
                raise
            except Exception as cexc:
                ctx.log.exception("task compensation failed")
                details += f"; compensation failed: {cexc}"[-1000:]
        await self._write(ctx.task_id, steps=[dict(x) for x in steps], attempts=attempts, state=TaskState.FAILED,
                          params=dict(ctx.params), fault_message=fault, fault_details=details,
                          lease_owner=None, lease_expires=None)
        self._ended(ctx, "failed")
        if kind.on_failed is not None:
            try:
                await kind.on_failed(ctx, fault, details)
            except Exception:
                ctx.log.exception("task on_failed hook failed")


def load(session_factory: sessionmaker[Session], task_id: str) -> TaskView | None:
    with session_factory() as s:
        task = s.get(Task, task_id)
        return view(task) if task else None


async def wait_for(session_factory: sessionmaker[Session], task_id: str, states: Sequence[str] = ENDED_STATES,
                   timeout: float = 60.0, poll: float = 0.05) -> TaskView:
    """Test/CLI aid: waits until the task reaches one of `states`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        tv = await asyncio.to_thread(load, session_factory, task_id)
        if tv is not None and tv.state in states:
            return tv
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"task {task_id} still {tv.state if tv else 'absent'} after {timeout}s")
        await asyncio.sleep(poll)

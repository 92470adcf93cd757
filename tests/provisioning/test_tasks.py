"""The durable task engine on SQLite and on a real MariaDB: order, exactly-once steps, crash resume,
leases that keep two engines off one task, retries and compensation."""
from __future__ import annotations

import asyncio
import collections

import pytest
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import errors
from reddwarf.common.states import TaskState
from reddwarf.server import tasks
from reddwarf.server.models import Task


class Recorder:
    """Counts step runs per (task, step) and the most steps of one task ever running at once."""

    def __init__(self) -> None:
        self.runs: collections.Counter[tuple[str, str]] = collections.Counter()
        self.order: dict[str, list[str]] = collections.defaultdict(list)
        self.in_flight: collections.Counter[str] = collections.Counter()
        self.max_in_flight = 0

    def step(self, name: str, delay: float = 0.0) -> tasks.Step:
        async def run(ctx: tasks.StepContext) -> None:
            self.in_flight[ctx.task_id] += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight[ctx.task_id])
            try:
                self.runs[(ctx.task_id, name)] += 1
                self.order[ctx.task_id].append(name)
                await asyncio.sleep(delay)
                await ctx.save(**{f"out_{name}": True})
            finally:
                self.in_flight[ctx.task_id] -= 1
        return tasks.Step(name, run)


def submit(db: sessionmaker[Session], kind: str, n: int = 1) -> list[str]:
    ids = []
    with db() as s, s.begin():
        for i in range(n):
            ids.append(tasks.submit(s, kind, f"things/{i}", {"i": i}).id)
    return ids


async def run_one(db: sessionmaker[Session], engine: tasks.TaskEngine) -> tuple[str, tasks.TaskView]:
    """Submits one "demo" task, runs the engine until the task has ended, stops the engine."""
    (tid,) = submit(db, "demo")
    await engine.start()
    try:
        return tid, await tasks.wait_for(db, tid, timeout=20)
    finally:
        await engine.stop()


async def test_steps_run_once_in_order_and_are_recorded(state_db: sessionmaker[Session]) -> None:
    rec = Recorder()
    engine = tasks.TaskEngine(state_db, "srv-a", poll_seconds=0.05)
    engine.register(tasks.TaskKind("demo", (rec.step("one"), rec.step("two"), rec.step("three"))))
    tid, tv = await run_one(state_db, engine)
    assert tv.state == TaskState.SUCCEEDED and tv.progress_percent == 100
    assert rec.order[tid] == ["one", "two", "three"]
    assert [s["step"] for s in tv.steps] == ["one", "two", "three"]
    assert all(s["state"] == "done" and s["started"] and s["finished"] for s in tv.steps)
    with state_db() as s:
        task = s.get(Task, tid)
        assert task is not None and task.params["out_three"] is True and task.lease_owner is None


async def test_a_crashed_engine_is_resumed_from_the_recorded_step_after_its_lease_expires(
        state_db: sessionmaker[Session]) -> None:
    rec = Recorder()
    reached_two = asyncio.Event()
    hang = asyncio.Event()
    first_try = True

    async def two(ctx: tasks.StepContext) -> None:
        nonlocal first_try
        rec.runs[(ctx.task_id, "two")] += 1
        if first_try:
            first_try = False
            reached_two.set()
            await hang.wait()  # the "crash" happens here

    kind = tasks.TaskKind("demo", (rec.step("one"), tasks.Step("two", two), rec.step("three")))
    crashed = tasks.TaskEngine(state_db, "srv-a", lease_seconds=1.5, poll_seconds=0.05)
    crashed.register(kind)
    (tid,) = submit(state_db, "demo")
    await crashed.start()
    await asyncio.wait_for(reached_two.wait(), 20)
    crashed.abandon()  # like SIGKILL: nothing released

    survivor = tasks.TaskEngine(state_db, "srv-b", lease_seconds=1.5, poll_seconds=0.05)
    survivor.register(kind)
    await survivor.start()
    try:
        # Not before the lease expires...
        await asyncio.sleep(0.5)
        assert rec.runs[(tid, "three")] == 0
        tv = await tasks.wait_for(state_db, tid, timeout=20)
    finally:
        await survivor.stop()
    assert tv.state == TaskState.SUCCEEDED
    assert rec.runs[(tid, "one")] == 1  # finished steps are not repeated
    assert rec.runs[(tid, "two")] == 2  # the interrupted step is re-run (steps are idempotent)
    assert rec.runs[(tid, "three")] == 1


async def test_two_engines_never_run_one_task_at_once(state_db: sessionmaker[Session]) -> None:
    rec = Recorder()
    kind = tasks.TaskKind("demo", (rec.step("one", 0.02), rec.step("two", 0.02)))
    engines = [tasks.TaskEngine(state_db, f"srv-{i}", workers=3, poll_seconds=0.02) for i in range(2)]
    for e in engines:
        e.register(kind)
    ids = submit(state_db, "demo", 12)
    for e in engines:
        await e.start()
    try:
        for tid in ids:
            assert (await tasks.wait_for(state_db, tid, timeout=60)).state == TaskState.SUCCEEDED
    finally:
        for e in engines:
            await e.stop()
    assert rec.max_in_flight == 1
    for tid in ids:
        assert rec.runs[(tid, "one")] == 1 and rec.runs[(tid, "two")] == 1


async def test_a_renewed_lease_keeps_a_second_engine_off_a_long_step(state_db: sessionmaker[Session]) -> None:
    rec = Recorder()
    kind = tasks.TaskKind("demo", (rec.step("long", 3.5),))
    a = tasks.TaskEngine(state_db, "srv-a", lease_seconds=1.2, poll_seconds=0.05)
    b = tasks.TaskEngine(state_db, "srv-b", lease_seconds=1.2, poll_seconds=0.05)
    a.register(kind)
    b.register(kind)
    (tid,) = submit(state_db, "demo")
    await a.start()
    await asyncio.sleep(0.3)
    await b.start()
    try:
        assert (await tasks.wait_for(state_db, tid, timeout=20)).state == TaskState.SUCCEEDED
    finally:
        await a.stop()
        await b.stop()
    assert rec.runs[(tid, "long")] == 1


async def test_a_restarted_server_reclaims_its_own_stale_leases_at_once(state_db: sessionmaker[Session]) -> None:
    rec = Recorder()
    started = asyncio.Event()

    async def slow(ctx: tasks.StepContext) -> None:
        rec.runs[(ctx.task_id, "slow")] += 1
        started.set()
        await asyncio.sleep(3600)

    old = tasks.TaskEngine(state_db, "srv-a", lease_seconds=600, poll_seconds=0.05)
    old.register(tasks.TaskKind("demo", (tasks.Step("slow", slow),)))
    (tid,) = submit(state_db, "demo")
    await old.start()
    await asyncio.wait_for(started.wait(), 20)
    old.abandon()
    await asyncio.sleep(0.3)  # let the cancelled workers unwind, as a killed process would be gone

    new = tasks.TaskEngine(state_db, "srv-a", lease_seconds=600, poll_seconds=0.05)
    new.register(tasks.TaskKind("demo", (rec.step("slow"),)))
    await new.start()
    try:
        tv = await tasks.wait_for(state_db, tid, timeout=10)  # far less than the 600 s lease
    finally:
        await new.stop()
    assert tv.state == TaskState.SUCCEEDED and rec.runs[(tid, "slow")] == 2


async def test_transient_failures_are_retried_with_backoff(state_db: sessionmaker[Session]) -> None:
    calls = 0

    async def flaky(ctx: tasks.StepContext) -> None:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise errors.Unavailable("host h1 unreachable")

    engine = tasks.TaskEngine(state_db, "srv-a", poll_seconds=0.02, backoff_seconds=0.05)
    engine.register(tasks.TaskKind("demo", (tasks.Step("flaky", flaky),)))
    _, tv = await run_one(state_db, engine)
    assert tv.state == TaskState.SUCCEEDED and calls == 3


@pytest.mark.parametrize("error", [errors.InvalidArgument("volume too big for host h1"),
                                   errors.Unavailable("host h1 unreachable")])
async def test_a_failed_task_runs_compensation_and_ends_failed_with_a_fault(
        state_db: sessionmaker[Session], error: Exception) -> None:
    rec = Recorder()
    compensated: list[dict] = []
    failed: list[str] = []

    async def boom(ctx: tasks.StepContext) -> None:
        raise error

    async def compensate(ctx: tasks.StepContext) -> None:
        compensated.append(dict(ctx.params))

    async def on_failed(ctx: tasks.StepContext, message: str, details: str) -> None:
        failed.append(message)

    engine = tasks.TaskEngine(state_db, "srv-a", poll_seconds=0.02, backoff_seconds=0.01)
    engine.register(tasks.TaskKind("demo", (rec.step("alloc"), tasks.Step("boom", boom)),
                                   compensate=compensate, on_failed=on_failed, max_attempts=3))
    (tid,) = submit(state_db, "demo")
    await engine.start()
    try:
        tv = await tasks.wait_for(state_db, tid, timeout=20)
        # The FAILED row is written before on_failed runs: let the hook finish before stopping the engine.
        for _ in range(500):
            if failed:
                break
            await asyncio.sleep(0.01)
    finally:
        await engine.stop()
    assert tv.state == TaskState.FAILED
    assert "boom" in tv.fault_message and str(error) in tv.fault_message
    assert compensated == [{"i": 0, "out_alloc": True}]  # compensation sees what the steps allocated
    assert failed == [tv.fault_message]
    assert rec.runs[(tid, "alloc")] == 1

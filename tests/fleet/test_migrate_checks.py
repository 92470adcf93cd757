"""Which migrations are refused, on a real state DB (SQLite, migrated by Alembic): each refusal is the right
error naming the field, and leaves no task behind; an accepted one records source and target."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from reddwarf.common.states import HostState, InstanceStatus
from reddwarf.server import db, models, tasks
from reddwarf.server.migration import KIND, submit_migration


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    with factory() as s, s.begin():
        db.seed(s)
        s.add(models.Tenant(id="t1"))
        for hid, mode, driver, mem, state in (("san", "storage", "iscsi", 1 << 20, HostState.UP),
                                              ("a", "compute", "iscsi", 4096, HostState.UP),
                                              ("b", "compute", "iscsi", 4096, HostState.UP),
                                              ("small", "compute", "iscsi", 64, HostState.UP),
                                              ("down", "compute", "iscsi", 1 << 20, HostState.DOWN),
                                              ("loopy", "compute", "loop", 1 << 20, HostState.UP)):
            s.add(models.Host(id=hid, address=f"{hid}:1", state=state, mode=mode, volume_driver=driver,
                              memory_mb_total=mem, storage_gb_total=100, memory_overcommit=1.0,
                              storage_overcommit=1.0, initiator_iqn=f"iqn.2024-01.reddwarf:host.{hid}"
                              if driver == "iscsi" and mode == "compute" else ""))
        s.flush()
        s.add(models.Instance(id="i-san", tenant_id="t1", display_name="i-san", flavor_id="tiny", volume_size_gb=1,
                              datastore="mariadb", datastore_version="10.11", host_id="a", storage_host_id="san",
                              volume_driver="iscsi", status=InstanceStatus.ACTIVE))
        s.add(models.Instance(id="i-loop", tenant_id="t1", display_name="i-loop", flavor_id="tiny",
                              volume_size_gb=1, datastore="mariadb", datastore_version="10.11", host_id="loopy",
                              volume_driver="loop", status=InstanceStatus.ACTIVE))
    yield factory
    engine.dispose()


def task_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.scalar(select(func.count()).select_from(models.Task)) or 0)


@pytest.mark.parametrize(("iid", "host", "error", "field", "words"), [
    ("i-san", "a", InvalidArgument, "host", "on host a already"),
    ("i-san", "down", FailedPrecondition, "host", "DOWN"),
    ("i-san", "small", ResourceExhausted, "host", "no room"),
    ("i-san", "san", InvalidArgument, "host", "SAN node"),
    ("i-san", "loopy", FailedPrecondition, "host", "no iSCSI initiator"),
    ("i-san", "nowhere", NotFound, "host", "not registered"),
    ("i-loop", "a", FailedPrecondition, "instance", "loop volumes cannot move"),
    ("i-gone", "", NotFound, "instance", "does not exist"),
])
def test_a_refused_migration_names_the_cause_and_changes_nothing(sessions, iid, host, error, field, words):
    with pytest.raises(error) as exc, sessions() as s, s.begin():
        submit_migration(s, iid, host)
    assert words in exc.value.message and any(f == field for f, _ in exc.value.violations), exc.value.message
    assert task_count(sessions) == 0
    with sessions() as s:
        assert s.get(models.Host, "a") is not None
        assert all(i.host_id in ("a", "loopy") for i in s.scalars(select(models.Instance)))


def test_an_instance_in_build_or_with_a_task_running_is_not_moved(sessions):
    with sessions() as s, s.begin():
        s.get(models.Instance, "i-san").status = InstanceStatus.BUILD  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition, match="BUILD"), sessions() as s, s.begin():
        submit_migration(s, "i-san", "b")
    with sessions() as s, s.begin():
        s.get(models.Instance, "i-san").status = InstanceStatus.ACTIVE  # type: ignore[union-attr]
        tasks.submit(s, "restart_instance", "instances/i-san")
    with pytest.raises(FailedPrecondition, match="restart_instance task running"), sessions() as s, s.begin():
        submit_migration(s, "i-san", "b")
    assert task_count(sessions) == 1


def test_the_san_node_down_refuses_the_migration_before_anything_stops(sessions):
    with sessions() as s, s.begin():
        s.get(models.Host, "san").state = HostState.DOWN  # type: ignore[union-attr]
    with pytest.raises(FailedPrecondition) as exc, sessions() as s, s.begin():
        submit_migration(s, "i-san", "b")
    assert "SAN node san" in exc.value.message and "DOWN" in exc.value.message
    assert exc.value.violations[0][0] == "instance"
    assert task_count(sessions) == 0


def test_without_a_host_the_scheduler_picks_an_up_iscsi_host_with_room_other_than_the_source(sessions):
    with sessions() as s, s.begin():
        task = submit_migration(s, "i-san", "")
        assert task.kind == KIND and task.resource == "instances/i-san"
        assert task.params["source"] == "a" and task.params["target"] == "b"
        assert task.params["token_generation"] > 0
    # With b gone too, nothing fits: RESOURCE_EXHAUSTED, nothing submitted.
    with sessions() as s, s.begin():
        s.delete(s.get(models.Task, task.id))
        s.get(models.Host, "b").state = HostState.DRAINING  # type: ignore[union-attr]
    with pytest.raises(ResourceExhausted, match="no other up compute host"), sessions() as s, s.begin():
        submit_migration(s, "i-san", "")
    assert task_count(sessions) == 0

"""A flavor resize that no longer fits the instance's host, on the real netns fleet of tests/fleet/
test_migrate_san.py (server, SAN node with a REAL tgtd, compute hosts with the REAL user-space initiator, each
in its own network namespace; the fake container driver runs the guest agents as processes).

h-a and h-c take 400 MB of instances (registered with a memory overcommit that leaves that much of the
machine's memory), h-b has the machine's memory: a tiny (256 MB) instance fits on h-a, a small (512 MB) one
does not (set through RegisterHost's memory_overcommit, as an operator would). Proves: resizing a SAN instance
on h-a to small moves it to h-b with its data, the new flavor and its container's limits, the LUN admitting h-b
alone; a resize that fits stays in place and changes the limits there; a flavor no host has room for is
RESOURCE_EXHAUSTED naming the flavor, nothing changed. (The loop-volume refusal on the fleet:
tests/fleet/test_migrate_san.py.) The fixture is also tests/fleet/test_migrate_crash.py's: automatic
evacuation is off, so a killed hostd is only DOWN until it returns."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import grpc
import pytest
from sqlalchemy import select

from reddwarf.common.errors import ResourceExhausted
from reddwarf.common.states import InstanceStatus
from reddwarf.server import db, models
from reddwarf.server.migration import KIND, submit_resize
from reddwarf.v1 import admin_pb2, database_pb2, host_pb2
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until

from .test_migrate_checks import sessions, task_count
from .test_migrate_san import (
    ACTIVE,
    IQN,
    MARKER,
    Fleet,
    assert_lives_on,
    create,
    get,
    pytestmark,
    san_fleet,
    settled,
    wait_task,
)

__all__ = ["pytestmark", "sessions"]
SMALL_HOST_MB = 400


def machine_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    # h-a and h-c have room for SMALL_HOST_MB only; the host watch never evacuates (lost after "0": never).
    small = SMALL_HOST_MB / machine_memory_mb()
    with san_fleet(tmp_path_factory.mktemp("resize"), "growco", host_lost_seconds="0",
                   memory_overcommit={"h-a": small, "h-c": small}) as f:
        yield f

def only_up(f: Fleet, up: str) -> None:
    """Every compute host but `up` takes nothing new."""
    for h in f.computes:
        f.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=h != up))


def resize(f: Fleet, name: str, flavor: str) -> database_pb2.Instance:
    return f.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=name, flavor=flavor), metadata=f.md)


def limits_on(f: Fleet, host: str, iid: str) -> int:
    [c] = [c for c in f.hostd(host).ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers
           if c.id == iid]
    return c.limits.memory_mb


def test_a_resize_that_does_not_fit_the_host_moves_the_san_instance_to_one_with_room(fleet):
    only_up(fleet, "h-a")
    inst = create(fleet, "grower")
    assert inst.host == "hosts/h-a" and inst.flavor.endswith("tiny") and inst.volume.driver == "iscsi"
    for h in ("h-a", "h-b"):  # both take instances again; h-c (loop) stays drained
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=False))
    marker = uuid.uuid4().hex
    (fleet.mount("h-a", inst.id) / MARKER).write_text(marker)

    shown = resize(fleet, inst.name, "small")  # 512 MB > the 400 MB h-a has
    assert shown.task, shown
    [task] = fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=inst.name)).tasks[:1]
    assert task.kind == "migrate_instance"
    done = wait_task(fleet, task.id)
    assert done.state == admin_pb2.TASK_STATE_SUCCEEDED, done.fault.message
    moved = settled(fleet, inst.name)
    assert moved.flavor.endswith("small") and moved.host == "hosts/h-b"
    assert_lives_on(fleet, inst.id, "h-b", "h-a", marker)
    assert limits_on(fleet, "h-b", inst.id) == 512

    # Back to tiny: it fits where it is, so the limits change in place (no move).
    resize(fleet, inst.name, "tiny")
    [task] = fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=inst.name)).tasks[:1]
    assert task.kind == "resize_instance"
    assert wait_task(fleet, task.id).state == admin_pb2.TASK_STATE_SUCCEEDED
    back = settled(fleet, inst.name)
    assert back.host == "hosts/h-b" and back.flavor.endswith("tiny")
    assert limits_on(fleet, "h-b", inst.id) == 256

    # A flavor bigger than the machine: no host has room; refused naming the flavor, nothing changed.
    huge = f"huge-{uuid.uuid4().hex[:6]}"
    with db.session_factory(db.make_engine(f"sqlite:///{fleet.server.state_dir}/state.db"))() as s, s.begin():
        s.add(models.Flavor(id=huge, display_name=huge, memory_mb=4 * machine_memory_mb()))
    tasks_before = len(fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=inst.name)).tasks)
    with pytest.raises(grpc.RpcError) as exc:
        resize(fleet, inst.name, huge)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc.value.details()
    assert "has room" in (exc.value.details() or "") and "flavor" in field_violations(exc.value)
    same = get(fleet, inst.name)
    assert same.host == "hosts/h-b" and same.flavor.endswith("tiny") and same.status == ACTIVE and not same.task
    assert len(fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=inst.name)).tasks) == tasks_before
    assert one_acl(fleet, inst.id) == (IQN + "h-b",)

    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)


def one_acl(f: Fleet, iid: str) -> tuple[str, ...]:
    t = f.target().find(f"iqn.2024-01.reddwarf:vol.{iid}")
    assert t is not None
    return tuple(t.acl)


# -- the decision alone, on a real state DB (tests/fleet/test_migrate_checks.py's hosts: a and b 4096 MB,
# small 64 MB, all iscsi but loopy) ----------------------------------------------------------------------
def test_resize_decides_in_place_move_or_refusal_and_a_refusal_changes_nothing(sessions):
    def decide(iid: str, flavor: str) -> str:
        with sessions() as s, s.begin():
            row, f = s.get(models.Instance, iid), s.get(models.Flavor, flavor)
            assert row is not None and f is not None
            return submit_resize(s, row, f)

    with sessions() as s, s.begin():
        s.add(models.Flavor(id="huge", display_name="huge", memory_mb=4000))
        s.add(models.Flavor(id="vast", display_name="vast", memory_mb=5000))
        s.get(models.Instance, "i-loop").host_id = "small"  # type: ignore[union-attr]
    with pytest.raises(ResourceExhausted) as exc:  # 5000 MB fits no host
        decide("i-san", "vast")
    assert exc.value.violations[0][0] == "flavor" and "has room" in exc.value.message
    with pytest.raises(ResourceExhausted) as exc:  # a loop volume cannot move
        decide("i-loop", "tiny")
    assert exc.value.violations[0][0] == "flavor" and "cannot move" in exc.value.message
    assert task_count(sessions) == 0
    assert decide("i-san", "huge") == "resize_instance"  # 4000 MB on a (4096): fits in place
    with sessions() as s, s.begin():  # another instance on a: huge no longer fits there, b takes it
        s.delete(s.scalars(select(models.Task)).one())
        s.add(models.Instance(id="i-other", tenant_id="t1", display_name="o", flavor_id="tiny", volume_size_gb=1,
                              datastore="mariadb", datastore_version="10.11", host_id="a", storage_host_id="san",
                              volume_driver="iscsi", status=InstanceStatus.ACTIVE))
    assert decide("i-san", "huge") == KIND
    with sessions() as s:
        task = s.scalars(select(models.Task)).one()
        assert task.params["target"] == "b" and task.params["flavor"] == "huge"
        row = s.get(models.Instance, "i-san")  # the flavor changes at the move's commit point, not before
        assert row is not None and row.flavor_id == "tiny" and row.host_id == "a"

"""The instance view cache behind GetInstance and WatchInstance (server/instance_views.py: InstanceViews over
server/readcache.py), on a real SQLite state DB: what this process commits is seen on the next read, what
another process commits within the ttl, a heartbeat falling due without any write, ownership on every read."""
from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import NotFound
from reddwarf.common.pki import Identity
from reddwarf.common.states import InstanceStatus, TaskState
from reddwarf.server import db, models, tasks
from reddwarf.server.auth import Principal
from reddwarf.server.instance_views import InstanceViews
from reddwarf.server.models import utcnow
from reddwarf.server.readcache import ReadCache
from reddwarf.v1 import database_pb2

EXPIRY = 20.0
ACTIVE, SHUTDOWN = database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_SHUTDOWN


@pytest.fixture
def sessions(tmp_path) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(f"sqlite:///{tmp_path}/state.db")
    models.Base.metadata.create_all(engine)
    factory = db.session_factory(engine)
    with factory() as s, s.begin():
        s.add_all([models.Tenant(id="t1"), models.Tenant(id="t2"),
                   models.Flavor(id="small", display_name="small", memory_mb=1024)])
        s.flush()
        s.add(models.Instance(id="i1", tenant_id="t1", display_name="one", flavor_id="small", volume_size_gb=2,
                              datastore="mariadb", datastore_version="10.11", status=InstanceStatus.ACTIVE,
                              health={"serviceState": "SERVICE_STATE_RUNNING"}, health_at=utcnow()))
    yield factory
    engine.dispose()


def owner(tenant: str = "t1", admin: bool = False) -> Principal:
    return Principal(tenant, admin, Identity(role="client", id="c", serial=1))


def counted(views: InstanceViews) -> list[int]:
    """Counts the view's loads from the state DB (a cache hit does not load)."""
    loads = [0]
    real = views._load

    def load(iid: str, field: str):  # type: ignore[no-untyped-def]
        loads[0] += 1
        return real(iid, field)
    views._load = load  # type: ignore[method-assign]
    return loads


def test_a_repeated_read_is_served_from_the_cache(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    loads = counted(views)
    first = views.get(owner(), "instances/i1")
    assert first.status == ACTIVE and views.get(owner(), "i1") is first
    assert loads[0] == 1


def test_a_row_change_committed_here_is_seen_on_the_next_read(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    assert views.get(owner(), "i1").display_name == "one"
    db.update_row(sessions, models.Instance, "i1", display_name="renamed", status=InstanceStatus.ERROR,
                  fault_message="disk gone")
    pb = views.get(owner(), "i1")
    assert pb.display_name == "renamed" and pb.status == database_pb2.INSTANCE_STATUS_ERROR
    assert pb.fault.message == "disk gone"


def test_a_task_submitted_or_moved_by_an_update_statement_is_seen_on_the_next_read(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    assert views.get(owner(), "i1").status == ACTIVE
    with sessions() as s, s.begin():
        task = tasks.submit(s, "restart_instance", "instances/i1")
    assert views.get(owner(), "i1").status == database_pb2.INSTANCE_STATUS_REBOOT
    # The task engine writes with UPDATE statements (no ORM object in the session): every entry goes.
    with sessions() as s, s.begin():
        s.execute(update(models.Task).where(models.Task.id == task.id).values(current_step="stop_mysqld",
                                                                              progress_percent=40))
    pb = views.get(owner(), "i1")
    assert (pb.task_step, pb.task_progress_percent) == ("stop_mysqld", 40)
    with sessions() as s, s.begin():
        s.execute(update(models.Task).where(models.Task.id == task.id).values(state=TaskState.SUCCEEDED))
    assert views.get(owner(), "i1").status == ACTIVE


def test_an_uncommitted_change_is_not_served_and_a_rollback_leaves_the_entry_correct(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    views.get(owner(), "i1")
    with sessions() as s:
        s.get(models.Instance, "i1").display_name = "never committed"  # type: ignore[union-attr]
        s.flush()
        s.rollback()
    assert views.get(owner(), "i1").display_name == "one"


def test_another_tenant_gets_not_found_from_a_cached_entry_and_a_deleted_instance_is_not_found(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    views.get(owner(), "i1")
    with pytest.raises(NotFound) as e:
        views.get(owner("t2"), "i1")
    assert e.value.violations and e.value.violations[0][0] == "name"
    assert views.get(owner("admin", admin=True), "i1").id == "i1"
    with pytest.raises(NotFound):
        views.get(owner(), "no-such")
    db.update_row(sessions, models.Instance, "i1", deleted_at=utcnow())
    with pytest.raises(NotFound):
        views.get(owner(), "i1")
    v = views.view(owner(), "i1")  # what WatchInstance sends last
    assert v.deleted and v.pb.status == database_pb2.INSTANCE_STATUS_DELETING


def test_a_heartbeat_falling_due_turns_the_view_shutdown_without_any_write(sessions) -> None:
    views = InstanceViews(sessions, 60, EXPIRY)
    db.update_row(sessions, models.Instance, "i1", health_at=utcnow() - dt.timedelta(seconds=EXPIRY - 0.5))
    assert views.get(owner(), "i1").status == ACTIVE
    time.sleep(0.7)
    assert views.get(owner(), "i1").status == SHUTDOWN


def test_a_change_committed_by_another_process_is_seen_within_the_ttl(sessions, tmp_path) -> None:
    views = InstanceViews(sessions, 0.5, EXPIRY)
    assert views.get(owner(), "i1").display_name == "one"
    other = create_engine(f"sqlite:///{tmp_path}/state.db")  # another server's sessions: no hook of ours
    with sessionmaker(other)() as s, s.begin():
        s.get(models.Instance, "i1").display_name = "elsewhere"  # type: ignore[union-attr]
    other.dispose()
    assert views.get(owner(), "i1").display_name == "one"  # within the bound, still the cached view
    time.sleep(0.6)
    assert views.get(owner(), "i1").display_name == "elsewhere"


def test_ttl_zero_reads_the_state_db_every_time(sessions) -> None:
    views = InstanceViews(sessions, 0, EXPIRY)
    loads = counted(views)
    views.get(owner(), "i1")
    views.get(owner(), "i1")
    assert loads[0] == 2


def test_a_read_that_raced_a_commit_is_not_stored(sessions) -> None:
    cache: ReadCache[str, str] = ReadCache(60, sessions, (models.Instance,), keys_of=lambda o: (o.id,))

    def slow_load() -> str:
        with sessions() as s:
            name = s.get(models.Instance, "i1").display_name  # type: ignore[union-attr]
        # A commit lands between the read and the store (another thread's write).
        t = threading.Thread(target=db.update_row, args=(sessions, models.Instance, "i1"),
                             kwargs={"display_name": "new"})
        t.start()
        t.join()
        return name
    assert cache.get("i1", slow_load) == "one"
    assert cache.get("i1", lambda: "fresh read") == "fresh read"
    # A change to one instance drops only its own entry.
    cache.get("other", lambda: "kept")
    db.update_row(sessions, models.Instance, "i1", display_name="newer")
    assert cache.get("other", lambda: "reloaded") == "kept"
    assert cache.get("i1", lambda: "reloaded") == "reloaded"


def test_through_a_real_server_reads_follow_every_change_and_watch_sees_build_active_and_the_end(tmp_path) -> None:
    """End to end on a fake-driver cluster: a rename and a task are seen by the very next GetInstance (the cache
    is dropped at commit), a watcher's events go BUILD → ACTIVE, and the stream ends after the delete."""
    import grpc

    from tests.fixtures.cluster import start_cluster
    with start_cluster(tmp_path, driver="fake") as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="cached", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
        stream = c.instances.WatchInstance(database_pb2.WatchInstanceRequest(name=inst.name), metadata=c.md,
                                           timeout=120)
        seen = []
        for ev in stream:
            seen.append(ev.instance.status)
            if ev.instance.status == ACTIVE and not ev.instance.task:
                break
        assert seen[0] == database_pb2.INSTANCE_STATUS_BUILD and seen[-1] == ACTIVE
        get = database_pb2.GetInstanceRequest(name=inst.name)
        assert c.instances.GetInstance(get, metadata=c.md).display_name == "cached"
        c.instances.UpdateInstance(database_pb2.UpdateInstanceRequest(
            instance=database_pb2.Instance(name=inst.name, display_name="renamed"),
            update_mask={"paths": ["display_name"]}), metadata=c.md)
        assert c.instances.GetInstance(get, metadata=c.md).display_name == "renamed"
        c.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=inst.name), metadata=c.md)
        assert c.instances.GetInstance(get, metadata=c.md).status in (database_pb2.INSTANCE_STATUS_REBOOT, ACTIVE)
        deadline = time.monotonic() + 60
        while c.instances.GetInstance(get, metadata=c.md).task:
            assert time.monotonic() < deadline, "restart never finished"
            time.sleep(0.1)
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
        assert c.instances.GetInstance(get, metadata=c.md).status == database_pb2.INSTANCE_STATUS_DELETING
        last = None
        for ev in stream:  # the same stream: it follows the delete and ends
            last = ev
        assert last is not None and last.instance.status == database_pb2.INSTANCE_STATUS_DELETING
        with pytest.raises(grpc.RpcError) as e:
            c.instances.GetInstance(get, metadata=c.md)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND

"""Two real servers on one PostgreSQL state DB, one hostd with the fake drivers (the guest agents are real
agent processes with the fake datastore: seconds, no root), and kill -9 of one server:

- instances created through either server end ACTIVE; each guest's stream is recorded (agent_streams);
- a command asked of either server reaches every guest, whichever server holds its stream (the relay);
- a WatchInstance client on one server sees a change made through the other;
- after kill -9 of the server holding more guests they are on the survivor within seconds, the survivor
  reaches every guest, a new watcher works there, and nothing was created twice.

tests/ha/test_server_kill.py is the same fault with a real LXC instance, backups and several clients.
"""
from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.postgres import available, postgres_server
from tests.fixtures.waiting import until
from tests.ha.twoservers import TwoServers, two_servers

pytestmark = pytest.mark.skipif(not available(), reason="postgresql-15 or the postgres user is missing")


def _ready(inst: database_pb2.Instance) -> bool:
    return inst.status in (database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_ERROR) and not inst.task


def test_commands_reach_guests_on_the_other_server_and_guests_move_when_it_is_killed(tmp_path: Path) -> None:
    with postgres_server() as pg, two_servers(tmp_path, pg, "fake") as ha:
        _exercise(ha)


def _exercise(ha: TwoServers) -> None:
    c, md = ha.c, ha.c.md
    with ha.channel(2) as ch2:
        inst1, inst2 = c.instances, database_pb2_grpc.InstancesStub(ch2)
        dbs1, dbs2 = database_pb2_grpc.DatabasesStub(c.channel), database_pb2_grpc.DatabasesStub(ch2)
        names = []
        for i in range(4):
            stub = inst1 if i % 2 == 0 else inst2
            names.append(stub.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
                display_name=f"ha-{i}", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=md).name)
        for n in names:
            done = until(lambda n=n: inst2.GetInstance(database_pb2.GetInstanceRequest(name=n), metadata=md),
                         _ready, timeout=90, what=f"{n} ACTIVE", interval=0.3)
            assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE, done.fault.message
        ids = [inst2.GetInstance(database_pb2.GetInstanceRequest(name=n), metadata=md).id for n in names]
        holders = until(ha.holders, lambda h: all(i in h for i in ids), timeout=30, what="streams recorded")
        # Every guest is asked through both servers: one of the two does not hold its stream (the relay).
        for n in names:
            for which, dbs in ((1, dbs1), (2, dbs2)):
                dbs.CreateDatabase(database_pb2.CreateDatabaseRequest(parent=n, database=common_pb2.Database(
                    database=f"before{which}")), metadata=md, timeout=30)
        # Watch one instance on s2, change it through s1: s2's watcher sees it (and the other way round).
        for watching, changing in ((inst2, inst1), (inst1, inst2)):
            watch = watching.WatchInstance(database_pb2.WatchInstanceRequest(name=names[0]), metadata=md,
                                           timeout=120)
            next(watch)
            value = uuid.uuid4().hex[:8]
            changing.UpdateInstance(database_pb2.UpdateInstanceRequest(
                instance=database_pb2.Instance(name=names[0], tags={"moved": value}),
                update_mask={"paths": ["tags"]}), metadata=md)
            assert next(watch).instance.tags.get("moved") == value
            watch.cancel()

        # The server holding more guests dies.
        victim = 1 if sum(h == "s1" for h in holders.values()) >= sum(h == "s2" for h in holders.values()) else 2
        survivor = f"s{3 - victim}"
        inst, dbs = (inst2, dbs2) if victim == 1 else (inst1, dbs1)
        moving = [i for i in ids if holders[i] == f"s{victim}"]
        killed_at = time.monotonic()
        ha.kill(victim)
        until(ha.holders, lambda h: all(h.get(i) == survivor for i in ids), timeout=20,
              what=f"every guest on {survivor}", interval=0.1)
        moved_in = time.monotonic() - killed_at
        assert moved_in < 10, moved_in
        # The survivor reaches every guest, including those whose stream died with the victim.
        for n in names:
            dbs.CreateDatabase(database_pb2.CreateDatabaseRequest(parent=n, database=common_pb2.Database(
                database="after")), metadata=md, timeout=30)
            listed = dbs.ListDatabases(database_pb2.ListDatabasesRequest(parent=n), metadata=md, timeout=30)
            assert {"before1", "before2", "after"} <= {d.database for d in listed.databases}
        watch = inst.WatchInstance(database_pb2.WatchInstanceRequest(name=names[1]), metadata=md, timeout=60)
        assert next(watch).instance.name == names[1]
        watch.cancel()
        listed_all = inst.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
        assert sorted(i.name for i in listed_all) == sorted(names)  # each create made exactly one
        assert all(i.status == database_pb2.INSTANCE_STATUS_ACTIVE for i in listed_all)
        print(f"{len(moving)} guests moved from s{victim} to {survivor} in {moved_in:.1f}s")
        for n in names:
            inst.DeleteInstance(database_pb2.DeleteInstanceRequest(name=n), metadata=md)
        until(lambda: inst.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances,
              lambda x: not x, timeout=60, what="instances deleted")
        survivor_log = ha.log2 if victim == 1 else ha.c.server.log_path
        assert "Traceback" not in survivor_log.read_text(errors="replace")

"""The server SIGKILLed in the middle of a resize and of a restore (right after a recorded step, by the
test-only hook), then restarted on the same state: the operation finishes exactly once, no data lost."""
from __future__ import annotations

import os

import pymysql
import pytest

from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.cluster import start_cluster
from tests.fixtures.server import launch, stop_process, wait_ready
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]



def get(c, name):
    return c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)


@pytest.mark.parametrize("hook", ["resize_instance:set_limits", "create_instance:prepare"])
def test_server_killed_mid_resize_or_restore_finishes_once(tmp_path, hook):
    with start_cluster(tmp_path, server_env={"REDDWARF_TEST_EXIT_AFTER_STEP": hook}) as c:
        bk = database_pb2_grpc.BackupsStub(c.channel)
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="src", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database="shop")],
            users=[common_pb2.User(user="app", password="app-pw-123", databases=["shop"])]), metadata=c.md)
        s = c.server
        proc = None
        if hook.startswith("create_instance"):
            c.server.proc.wait(timeout=120)  # the source's own create trips the hook first
            proc, log = launch(s.state_dir, s.api, s.agent, s.enroll, {"REDDWARF_TEST_EXIT_AFTER_STEP": hook})
            wait_ready(s.api, s.admin_files, proc, log)
        try:
            inst = until(lambda: get(c, inst.name), lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE)
            ep = inst.endpoints[0]
            with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123", database="shop",
                                 autocommit=True) as conn:
                conn.cursor().execute("CREATE TABLE t (id INT PRIMARY KEY)")
                conn.cursor().execute("INSERT INTO t VALUES (1), (2), (3)")
            if hook.startswith("resize"):
                c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=inst.name, flavor="small"),
                                           metadata=c.md)
                c.server.proc.wait(timeout=120)
                target = inst
            else:
                b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
                    display_name="b", instance=inst.name)), metadata=c.md)
                until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
                      lambda x: x.status == database_pb2.BACKUP_STATUS_COMPLETED)
                target = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
                    instance=database_pb2.Instance(display_name="copy", flavor="tiny",
                                                   volume=database_pb2.Volume(size_gb=1)),
                    restore_from_backup=b.name), metadata=c.md)
                proc.wait(timeout=120)  # killed right after the restored instance's prepare
            proc2, log2 = launch(s.state_dir, s.api, s.agent, s.enroll, {"REDDWARF_TEST_EXIT_AFTER_STEP": ""})
            try:
                wait_ready(s.api, s.admin_files, proc2, log2)
                done = until(lambda: get(c, target.name),
                             lambda i: i.status in (database_pb2.INSTANCE_STATUS_ACTIVE, database_pb2.INSTANCE_STATUS_ERROR) and not i.task)
                assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE, done.fault.message
                if hook.startswith("resize"):
                    assert done.flavor == "flavors/small"
                    cg = f"/sys/fs/cgroup/memory/lxc.payload.{c.hostd.prefix}{done.id}/memory.limit_in_bytes"
                    with open(cg) as f:
                        assert int(f.read()) == 512 * 1024 * 1024
                else:
                    assert done.restored_from
                ep = done.endpoints[0]
                with pymysql.connect(host=ep.host, port=ep.port, user="app", password="app-pw-123",
                                     database="shop") as conn, conn.cursor() as cur:
                    cur.execute("SELECT id FROM t ORDER BY id")
                    assert cur.fetchall() == ((1,), (2,), (3,))
                containers = list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*"))
                assert len(containers) == (1 if hook.startswith("resize") else 2)
            finally:
                stop_process(proc2)
        finally:
            if proc is not None:
                stop_process(proc)

"""Crash-safe provisioning against the fake hostd: the server killed right after a create step resumes the
create when restarted, with exactly one container and one volume, and a delete then leaves nothing. The
flow of tests/provisioning/test_e2e.py's LXC test without root; two of its four steps here (a replayed hostd
side effect; the agent reconnecting after prepare, its token spent), each ~5 s on a quiet machine."""
from __future__ import annotations

import grpc
import pytest

from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.server import launch, stop_process, wait_ready
from tests.fixtures.waiting import until


def on_host(c: Cluster) -> tuple[list[str], list[str]]:
    """(container directories, volume directories) of this cluster's hostd."""
    return (sorted(p.name for p in c.hostd.lxc_path.glob(f"{c.hostd.prefix}*")),
            sorted(p.name for p in c.hostd.storage_path.glob("*.vol")))


@pytest.mark.parametrize("step", ["create_container", "prepare"])
def test_server_killed_mid_create_resumes_without_duplicates(tmp_path, step):
    env = {"REDDWARF_TEST_EXIT_AFTER_STEP": f"create_instance:{step}"}
    with start_cluster(tmp_path, server_env=env, driver="fake") as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="crashy", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
        c.server.proc.wait(timeout=60)  # the hook killed the server right after the step was recorded
        s = c.server
        proc, log_path = launch(s.state_dir, s.api, s.agent, s.enroll, {"REDDWARF_TEST_EXIT_AFTER_STEP": ""})
        try:
            wait_ready(s.api, s.admin_files, proc, log_path)
            done = until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name),
                                                         metadata=c.md),
                         lambda i: i.status in (database_pb2.INSTANCE_STATUS_ACTIVE,
                                                database_pb2.INSTANCE_STATUS_ERROR),
                         timeout=60, what="create finished", interval=0.1)
            assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE, done.fault.message
            assert on_host(c) == ([f"{c.hostd.prefix}{inst.id}"], [f"{inst.id}.vol"])
            c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)

            def gone() -> bool:
                try:
                    c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
                except grpc.RpcError as err:
                    return err.code() == grpc.StatusCode.NOT_FOUND
                return False
            until(gone, bool, timeout=60, what="instance deleted", interval=0.1)
            assert on_host(c) == ([], [])
        finally:
            stop_process(proc)

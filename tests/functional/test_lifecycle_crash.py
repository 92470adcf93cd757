"""Stop and start are crash-safe like create: the server killed right after a recorded step of either
resumes it when restarted (the fake hostd; about 10 s): the stopped instance ends SHUTDOWN with its
container stopped, the started one ACTIVE with it running, one container and one volume throughout."""
from __future__ import annotations

import subprocess

import grpc
import pytest

from reddwarf.v1 import database_pb2, host_pb2
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.server import launch, stop_process, wait_ready
from tests.fixtures.waiting import until
from tests.functional.test_crash_recovery import on_host
from tests.functional.test_instance_flows import hostd, wait_active

HOOK = "REDDWARF_TEST_EXIT_AFTER_STEP"


def restart(c: Cluster, hook: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """Starts the server again on its state dir, killing itself after `hook` ("" for none)."""
    s = c.server
    proc, log_path = launch(s.state_dir, s.api, s.agent, s.enroll, {HOOK: hook})
    procs.append(proc)
    wait_ready(s.api, s.admin_files, proc, log_path)


def status(c: Cluster, name: str) -> database_pb2.Instance:
    return c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)


@pytest.mark.timeout(240)
def test_server_killed_mid_stop_and_mid_start_resumes_both(tmp_path):
    procs: list[subprocess.Popen[bytes]] = []
    with start_cluster(tmp_path, server_env={HOOK: "stop_instance:stop_datastore"}, driver="fake") as c:
        try:
            inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
                display_name="crashy", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
            wait_active(c, inst.name)
            c.instances.StopInstance(database_pb2.StopInstanceRequest(name=inst.name), metadata=c.md)
            c.server.proc.wait(timeout=60)  # killed right after stop_datastore was recorded
            restart(c, "start_instance:start_container", procs)
            stopped = until(lambda: status(c, inst.name), lambda i: not i.task, timeout=60, what="stop resumed",
                            interval=0.1)
            assert stopped.status == database_pb2.INSTANCE_STATUS_SHUTDOWN and not stopped.HasField("fault")
            ctr = hostd(c).GetContainer(host_pb2.ContainerRef(id=inst.id))
            assert ctr.state == host_pb2.CONTAINER_STATE_STOPPED

            c.instances.StartInstance(database_pb2.StartInstanceRequest(name=inst.name), metadata=c.md)
            procs[-1].wait(timeout=60)  # killed right after start_container was recorded
            restart(c, "", procs)
            started = wait_active(c, inst.name)
            assert started.health.accepting_connections
            assert hostd(c).GetContainer(host_pb2.ContainerRef(id=inst.id)).state == \
                host_pb2.CONTAINER_STATE_RUNNING
            assert on_host(c) == ([f"{c.hostd.prefix}{inst.id}"], [f"{inst.id}.vol"])

            c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)

            def gone() -> bool:
                try:
                    status(c, inst.name)
                except grpc.RpcError as err:
                    return err.code() == grpc.StatusCode.NOT_FOUND
                return False
            until(gone, bool, timeout=60, what="instance deleted", interval=0.1)
            assert on_host(c) == ([], [])
        finally:
            for p in procs:
                stop_process(p)

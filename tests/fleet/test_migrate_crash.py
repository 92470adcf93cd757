"""Migration survives a hostd SIGKILLed in the middle of it, on the real netns fleet of tests/fleet/
test_resize_migrates.py (server, SAN node with a REAL tgtd, compute hosts with the REAL user-space initiator,
each in its own network namespace; fake container driver). Automatic evacuation is off there, so a killed
hostd is only DOWN until it comes back. (The server killed mid-migration: tests/fleet/test_migrate_san.py.)

Before the move, a writer appends ids to the volume, each acknowledged only once fsync'd. Whichever way the
move ends (finished on the target once the hostd is back, or rolled back to the source), the instance is ACTIVE
on exactly one host with every acknowledged id, and at every point we look the LUN admits one initiator and
holds sessions only from it: never two writers."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, host_pb2
from tests.fixtures.server import stop_process
from tests.fixtures.waiting import until

from .test_migrate_san import ACTIVE, IQN, Fleet, create, get, pytestmark, wait_task
from .test_resize_migrates import fleet, only_up

__all__ = ["fleet", "pytestmark"]
LOG = "acked-ids.txt"
_restarted: list[subprocess.Popen[bytes]] = []


@pytest.fixture(scope="module", autouse=True)
def restarted_hostds(fleet: Fleet) -> Iterator[None]:
    """hostd processes a test started again; stopped before the fleet goes."""
    yield
    for proc in _restarted:
        stop_process(proc)


def write_acked(path: Path, n: int) -> list[str]:
    """n ids appended to the volume, each fsync'd before it counts as acknowledged."""
    acked = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        for _ in range(n):
            i = uuid.uuid4().hex
            os.write(fd, f"{i}\n".encode())
            os.fsync(fd)
            acked.append(i)
    finally:
        os.close(fd)
    return acked


def one_writer(f: Fleet, iid: str) -> set[str]:
    """The LUN's ACL names one initiator and its sessions are that initiator's only; returns the ACL."""
    t = f.target().find(f"iqn.2024-01.reddwarf:vol.{iid}")
    assert t is not None
    assert len(t.acl) <= 1, t.acl
    assert {s.initiator for s in t.sessions} <= set(t.acl), (t.acl, t.sessions)
    return set(t.acl)


def kill_hostd(f: Fleet, host: str) -> list[str]:
    """SIGKILLs that host's hostd alone (its guests and initiator daemons live on); returns its argv."""
    proc = f.computes[host].proc
    with open(f"/proc/{proc.pid}/cmdline", "rb") as cmd:
        argv = [a.decode() for a in cmd.read().split(b"\0") if a]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return argv


def restart_hostd(f: Fleet, host: str, argv: list[str]) -> None:
    h = f.computes[host]
    with open(h.log_path, "ab") as logf:
        proc = subprocess.Popen(f.net[host.removeprefix("h-")].argv(argv), stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    _restarted.append(proc)
    f.computes[host] = dataclasses.replace(h, proc=proc)

    def answers() -> bool:
        try:
            f.hostd(host).GetCapacity(host_pb2.GetCapacityRequest(), timeout=5)
            return True
        except grpc.RpcError:
            return False
    until(answers, lambda ok: ok, timeout=60, what=f"{host} answering again", interval=0.5)


@pytest.mark.parametrize("victim", ["target", "source"])
def test_a_hostd_killed_mid_migration_finishes_once_or_rolls_back_with_every_acked_write(fleet, victim):
    for h in ("h-a", "h-b"):  # a hostd an earlier case killed is back UP
        until(lambda h=h: fleet.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{h}")).state,
              lambda st: st != admin_pb2.HOST_STATE_DOWN, timeout=30, what=f"{h} not DOWN", interval=0.3)
    only_up(fleet, "h-a")
    inst = create(fleet, f"crash-{victim}")
    for h in ("h-a", "h-b"):
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=False))
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=True))
    acked = write_acked(fleet.mount("h-a", inst.id) / LOG, 50)
    assert one_writer(fleet, inst.id) == {IQN + "h-a"}

    task = fleet.admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name, host="h-b"))
    killed = "h-b" if victim == "target" else "h-a"
    if victim == "source":  # after mysqld's clean stop, while the source is to stop and let go of the volume
        until(lambda: fleet.admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{task.id}")),
              lambda t: any(s.step == "stop_datastore" for s in t.steps), timeout=60,
              what="stop_datastore done", interval=0.05)
    argv = kill_hostd(fleet, killed)
    # While it is away: never two writers.
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        one_writer(fleet, inst.id)
        time.sleep(0.3)
    restart_hostd(fleet, killed, argv)

    done = wait_task(fleet, task.id, timeout=100)
    inst_now = until(lambda: get(fleet, inst.name), lambda i: i.status == ACTIVE and not i.task, timeout=60,
                     what="ACTIVE", interval=0.3)
    home = inst_now.host.removeprefix("hosts/")
    other = "h-a" if home == "h-b" else "h-b"
    print(f"victim {victim}: the move {'finished' if home == 'h-b' else 'rolled back'}")
    if done.state == admin_pb2.TASK_STATE_SUCCEEDED:
        assert home == "h-b" and [s.step for s in done.steps].count("activate") == 1
    else:  # rolled back, saying why
        assert home == "h-a" and done.fault.message
    assert one_writer(fleet, inst.id) == {IQN + home}
    t = fleet.target().find(f"iqn.2024-01.reddwarf:vol.{inst.id}")
    assert t is not None and [s.initiator for s in t.sessions] == [IQN + home]
    lines = (fleet.mount(home, inst.id) / LOG).read_text().split()
    assert lines == acked  # every acknowledged id, once, in order
    assert not os.path.ismount(fleet.mount(other, inst.id))
    hostd = fleet.hostd(other)
    until(lambda: [c.id for c in hostd.ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers],
          lambda cs: inst.id not in cs, timeout=30, what=f"no container of it on {other}", interval=0.5)
    assert inst.id not in [v.id for v in hostd.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes]

    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)


def test_a_hostd_back_from_down_is_told_by_the_server_to_drop_what_lives_elsewhere(fleet):
    """What a target that died in the middle of a move may keep (here its container of the instance, made as
    the move would have) is removed by the server once the host answers again; the instance, on its source,
    is not touched."""
    for h in ("h-a", "h-b"):
        until(lambda h=h: fleet.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{h}")).state,
              lambda st: st != admin_pb2.HOST_STATE_DOWN, timeout=30, what=f"{h} not DOWN", interval=0.3)
    only_up(fleet, "h-a")
    inst = create(fleet, "homebody")
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-b", drain=False))
    acked = write_acked(fleet.mount("h-a", inst.id) / LOG, 20)
    hb = fleet.hostd("h-b")
    hb.CreateContainer(host_pb2.CreateContainerRequest(container=host_pb2.Container(
        id=inst.id, limits=common_pb2.Limits(memory_mb=256, cpu_shares=256, cpu_limit_millicores=500, max_processes=512, io_weight=500), bootstrap=host_pb2.AgentBootstrap(
            server_address="127.0.0.1:1", enroll_address="127.0.0.1:1", ca_pem=fleet.server.ca.cert_pem.decode(), enrollment_token="x",
            instance_id=inst.id, heartbeat_seconds=5))), timeout=60)
    assert inst.id in [c.id for c in hb.ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers]

    argv = kill_hostd(fleet, "h-b")
    until(lambda: fleet.admin.GetHost(admin_pb2.GetHostRequest(name="hosts/h-b")).state,
          lambda st: st == admin_pb2.HOST_STATE_DOWN, timeout=30, what="h-b DOWN", interval=0.3)
    restart_hostd(fleet, "h-b", argv)
    until(lambda: [c.id for c in fleet.hostd("h-b").ListContainers(host_pb2.ListContainersRequest(),
                                                                    timeout=30).containers],
          lambda cs: inst.id not in cs, timeout=30, what="the stray container removed", interval=0.5)
    assert fleet.admin.GetHost(admin_pb2.GetHostRequest(name="hosts/h-b")).state == admin_pb2.HOST_STATE_UP
    same = get(fleet, inst.name)
    assert same.status == ACTIVE and same.host == "hosts/h-a"
    assert one_writer(fleet, inst.id) == {IQN + "h-a"}
    assert (fleet.mount("h-a", inst.id) / LOG).read_text().split() == acked

    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)

"""Migrating an instance whose data is a SAN LUN between two compute hosts, through the server's public API:
the real server, a SAN node (hostd in storage mode with its own REAL tgtd) and two compute hosts (hostd with
the iscsi volume driver and the REAL user-space initiator, qemu-storage-daemon), each in its own network
namespace. The fake container driver runs the guest agents as plain processes in their host's namespace, with
the fake datastore writing to the iSCSI-backed datadir; a real MariaDB is tests/fleet's LXC test's business.

Proves: after a migration the instance is ACTIVE on the target with the same volume contents, the LUN admits
the target's initiator alone (the source holds no session, no container, no mount), a server SIGKILLed right
after the commit point finishes the move once when it comes back, and refusals change nothing."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.common.errors import RedDwarfError
from reddwarf.hostd import qsd
from reddwarf.hostd.iscsi import Chap, Locator, TargetHost
from reddwarf.server import db, models
from reddwarf.server.sealing import PasswordSealer
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.cluster import host_files
from tests.fixtures.errors import field_violations
from tests.fixtures.fleet import clear_dead_host, recorded_host_files
from tests.fixtures.hostd import RunningHostd, start_hostd
from tests.fixtures.mariadb import free_port
from tests.fixtures.netns import HostNetwork, host_network
from tests.fixtures.server import RunningServer, launch, start_server, stop_process, wait_ready
from tests.fixtures.waiting import until

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="tgtd, namespaces, FUSE and loop devices need root"),
    pytest.mark.skipif(shutil.which("tgtd") is None, reason="tgt is not installed"),
    pytest.mark.skipif(not qsd.available(), reason="qemu-storage-daemon with qemu-block-extra is not installed"),
]
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE
IQN = "iqn.2024-01.reddwarf:host."
MARKER = "migrate-marker.txt"


class Fleet:
    def __init__(self, net: HostNetwork, server: RunningServer, env: dict[str, str], san: RunningHostd,
                 computes: dict[str, RunningHostd], control_port: int, md: tuple[tuple[str, str], ...]) -> None:
        self.net, self.server, self.env, self.san, self.computes = net, server, env, san, computes
        self.control_port, self.md = control_port, md
        self.proc = server.proc  # the server process now (a test restarts it)

    @property
    def instances(self) -> database_pb2_grpc.InstancesStub:
        return database_pb2_grpc.InstancesStub(self.server.channel())

    @property
    def admin(self) -> admin_pb2_grpc.AdminStub:
        return admin_pb2_grpc.AdminStub(self.server.channel(self.server.admin_files))

    def target(self) -> TargetHost:
        return TargetHost(f"{self.net['san'].address}:3260", self.control_port)

    def hostd(self, host_id: str) -> host_pb2_grpc.HostAgentStub:
        return host_pb2_grpc.HostAgentStub(self.computes[host_id].channel(self.server.server_files))

    def mount(self, host_id: str, iid: str) -> Path:
        return self.computes[host_id].root / "state" / "mnt" / iid

    def restart_server(self, extra: dict[str, str]) -> None:
        stop_process(self.proc)
        s = self.server
        self.proc, log_path = launch(s.state_dir, s.api, s.agent, s.enroll, {**self.env, **extra})
        wait_ready(s.api, s.admin_files, self.proc, log_path)


@contextlib.contextmanager
def san_fleet(root: Path, tenant: str, host_lost_seconds: str = "4",
              memory_overcommit: dict[str, float] | None = None) -> Iterator[Fleet]:
    """The server, a SAN node and compute hosts h-a, h-b (iscsi, user-space initiator) and h-c (loop volumes),
    each in its own network namespace, and `tenant` with a token. The host watch probes every second; a host
    silent for `host_lost_seconds` is lost ("0": never evacuated)."""
    control_port = 20000 + free_port() % 10000
    overcommit = memory_overcommit or {}
    with host_network(["san", "a", "b", "c"]) as net:
        env = {"REDDWARF_CAPACITY_REFRESH_SECONDS": "3600", "REDDWARF_SAN_REATTACH_SECONDS": "0",
               "REDDWARF_HOST_CHECK_SECONDS": "1", "REDDWARF_HOST_LOST_SECONDS": host_lost_seconds,
               "REDDWARF_AGENT_LISTEN": f"{net.gateway}:{free_port()}",
               "REDDWARF_ENROLL_LISTEN": f"{net.gateway}:{free_port()}"}
        with start_server(root, extra_env=env) as server:
            f: Fleet | None = None
            admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
            try:
                with start_hostd(root / "san", host_files(server.ca, root / "san-tls", "h-san"), host_id="h-san",
                                 listen_host=net["san"].address, wrap=tuple(net["san"].argv([])),
                                 extra_args=("--mode", "storage", "--iscsi-portal", f"{net['san'].address}:3260",
                                             "--iscsi-control-port", str(control_port))) as sanh, \
                        start_hostd(root / "a", recorded_host_files(admin, root / "a-tls", "h-a"), host_id="h-a",
                                    listen_host=net["a"].address, wrap=tuple(net["a"].argv([])), driver="fake",
                                    volume_driver="iscsi", extra_args=("--iscsi-initiator", "userspace")) as a, \
                        start_hostd(root / "b", recorded_host_files(admin, root / "b-tls", "h-b"), host_id="h-b",
                                    listen_host=net["b"].address, wrap=tuple(net["b"].argv([])), driver="fake",
                                    volume_driver="iscsi", extra_args=("--iscsi-initiator", "userspace")) as b, \
                        start_hostd(root / "c", recorded_host_files(admin, root / "c-tls", "h-c"), host_id="h-c",
                                    listen_host=net["c"].address, wrap=tuple(net["c"].argv([])),
                                    driver="fake") as c:
                    for h in (sanh, a, b, c):
                        admin.RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(
                            id=h.host_id, address=h.address, memory_overcommit=overcommit.get(h.host_id, 0.0))))
                    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tenant)))
                    token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tenant}")).secret
                    f = Fleet(net, server, env, sanh, {"h-a": a, "h-b": b, "h-c": c}, control_port,
                              (("authorization", f"Bearer {token}"),))
                    try:
                        yield f
                    finally:
                        stop_process(f.proc)  # a restarted server; the fixture stops the first one
            finally:
                for host in ("a", "b"):
                    run_dir = root / host / "state" / "iscsi"  # sessions a failed test left
                    if run_dir.is_dir():
                        ini = qsd.UserspaceInitiator(str(run_dir))
                        for vid in os.listdir(run_dir):
                            ini.logout(vid)
                subprocess.run([sys.executable, "-m", "reddwarf.hostd.main", "stop-target", "--host-id", "h-san",
                                "--state-dir", str(root / "san" / "state"), "--iscsi-control-port",
                                str(control_port), "--iscsi-portal", f"{net['san'].address}:3260"],
                               check=False, timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    with san_fleet(tmp_path_factory.mktemp("migrate"), "moveco") as f:
        # h-c keeps its volumes on its own disk (the fake driver's loop files); it takes nothing unless a
        # test says so.
        f.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=True))
        yield f

def get(f: Fleet, name: str) -> database_pb2.Instance:
    return f.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=f.md)


def settled(f: Fleet, name: str, timeout: float = 120) -> database_pb2.Instance:
    inst = until(lambda: get(f, name), lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR)
                 and not i.task, timeout=timeout, what="settled", interval=0.2)
    assert inst.status == ACTIVE, inst.fault.message
    return inst


def wait_task(f: Fleet, task_id: str, timeout: float = 120) -> admin_pb2.Task:
    return until(lambda: f.admin.GetTask(admin_pb2.GetTaskRequest(name=f"tasks/{task_id}")),
                 lambda t: t.state in (admin_pb2.TASK_STATE_SUCCEEDED, admin_pb2.TASK_STATE_FAILED),
                 timeout=timeout, what="the migrate task ended", interval=0.2)


def assert_lives_on(f: Fleet, iid: str, host: str, other: str, marker: str) -> None:
    """ACTIVE on `host`, the LUN admitting its initiator alone, nothing of it left on `other`."""
    inst = get(f, f"instances/{iid}")
    assert inst.status == ACTIVE and inst.host == f"hosts/{host}" and inst.volume.driver == "iscsi"
    t = f.target().find(f"iqn.2024-01.reddwarf:vol.{iid}")
    assert t is not None and t.acl == (IQN + host,)
    assert [s.initiator for s in t.sessions] == [IQN + host]
    assert (f.mount(host, iid) / MARKER).read_text() == marker  # the same volume, the same bytes
    assert not os.path.ismount(f.mount(other, iid))
    gone = f.hostd(other)
    assert [c.id for c in gone.ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers] == []
    assert [v.id for v in gone.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes] == []
    assert [c.id for c in f.hostd(host).ListContainers(host_pb2.ListContainersRequest(),
                                                       timeout=30).containers] == [iid]


def cli_env(f: Fleet) -> dict[str, str]:
    files = f.server.admin_files
    return {"REDDWARF_ENDPOINT": f.server.api, "REDDWARF_CA": str(files.ca), "REDDWARF_CERT": str(files.cert),
            "REDDWARF_KEY": str(files.key), "REDDWARF_CONFIG": "/nonexistent"}


def test_host_list_and_show_give_each_host_s_mode_and_its_iscsi_side(fleet):
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "admin", "host", "list"], env=cli_env(fleet))
    assert r.exit_code == 0, r.output
    hosts = {h["id"]: h for h in json.loads(r.output)}
    assert hosts["h-san"]["mode"] == "storage" and hosts["h-a"]["mode"] == "compute"
    assert hosts["h-a"]["volume_driver"] == "iscsi" and hosts["h-c"].get("volume_driver") != "iscsi"
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "admin", "host", "show", "h-san"], env=cli_env(fleet))
    assert r.exit_code == 0, r.output
    san = json.loads(r.output)
    assert san["iscsi_portal"] == f"{fleet.net['san'].address}:3260" and not san.get("initiator_iqn")
    a = fleet.admin.GetHost(admin_pb2.GetHostRequest(name="hosts/h-a"))
    assert a.initiator_iqn == IQN + "h-a" and a.iscsi_portal == "" and a.mode == "compute"


def test_migrate_moves_the_instance_with_its_data_and_a_crash_after_the_commit_point_finishes_once(fleet):
    inst = fleet.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="mover", flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
        metadata=fleet.md)
    inst = settled(fleet, inst.name)
    source = inst.host.removeprefix("hosts/")
    target = "h-b" if source == "h-a" else "h-a"
    marker = uuid.uuid4().hex
    (fleet.mount(source, inst.id) / MARKER).write_text(marker)

    # Refused: to the host it is on, to the SAN node; nothing starts.
    for host, code, words in ((source, grpc.StatusCode.INVALID_ARGUMENT, "already"),
                              ("h-san", grpc.StatusCode.INVALID_ARGUMENT, "SAN node")):
        with pytest.raises(grpc.RpcError) as exc:
            fleet.admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name, host=host))
        assert exc.value.code() == code and words in (exc.value.details() or "")
    assert get(fleet, inst.name).host == f"hosts/{source}"

    # The CLI, naming the target.
    f = fleet.server.admin_files
    env = {"REDDWARF_ENDPOINT": fleet.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "admin", "instance", "migrate", inst.id, "--host", target],
                           env=env)
    assert r.exit_code == 0, r.output
    task = wait_task(fleet, json.loads(r.output)["id"])
    assert task.state == admin_pb2.TASK_STATE_SUCCEEDED, task.fault.message
    settled(fleet, inst.name)
    assert_lives_on(fleet, inst.id, target, source, marker)

    # Back again without naming a host (the scheduler's only choice), the server SIGKILLed right after the
    # volume moved: the restarted server finishes the move, once.
    fleet.restart_server({"REDDWARF_TEST_EXIT_AFTER_STEP": "migrate_instance:move_volume"})
    task = fleet.admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name))
    fleet.proc.wait(timeout=120)
    fleet.restart_server({"REDDWARF_TEST_EXIT_AFTER_STEP": ""})
    task = wait_task(fleet, task.id)
    assert task.state == admin_pb2.TASK_STATE_SUCCEEDED, task.fault.message
    assert [s.step for s in task.steps][-1] == "activate"
    settled(fleet, inst.name)
    assert_lives_on(fleet, inst.id, source, target, marker)

    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)


def create(f: Fleet, name: str) -> database_pb2.Instance:
    inst = f.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=name, flavor="tiny", volume=database_pb2.Volume(size_gb=1))),
        metadata=f.md)
    return settled(f, inst.name)


def host_state(f: Fleet, host: str) -> int:
    return f.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{host}")).state


def test_a_migration_whose_target_is_drained_while_the_server_is_down_rolls_back_to_the_source(fleet):
    inst = create(fleet, "homebody")
    source = inst.host.removeprefix("hosts/")
    target = "h-b" if source == "h-a" else "h-a"
    marker = uuid.uuid4().hex
    (fleet.mount(source, inst.id) / MARKER).write_text(marker)
    # The server dies right after the source let go of the volume...
    fleet.restart_server({"REDDWARF_TEST_EXIT_AFTER_STEP": "migrate_instance:detach_source"})
    task = fleet.admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name, host=target))
    fleet.proc.wait(timeout=120)
    # ... and meanwhile the target is drained (as an operator would, from another server sharing the DB).
    with db.session_factory(db.make_engine(f"sqlite:///{fleet.server.state_dir}/state.db"))() as s, s.begin():
        h = s.get(models.Host, target)
        assert h is not None
        h.state = "draining"
    fleet.restart_server({"REDDWARF_TEST_EXIT_AFTER_STEP": ""})
    try:
        done = wait_task(fleet, task.id)
        assert done.state == admin_pb2.TASK_STATE_FAILED
        assert f"target host {target} is DRAINING" in done.fault.message, done.fault.message
        back = settled(fleet, inst.name)
        assert back.host == f"hosts/{source}"
        assert_lives_on(fleet, inst.id, source, target, marker)
    finally:
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{target}", drain=False))
    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)


def test_drain_migrates_every_instance_off_the_host(fleet):
    inst = create(fleet, "drained")
    source = inst.host.removeprefix("hosts/")
    other = "h-b" if source == "h-a" else "h-a"
    marker = uuid.uuid4().hex
    (fleet.mount(source, inst.id) / MARKER).write_text(marker)
    h = fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{source}", drain=True))
    assert h.state == admin_pb2.HOST_STATE_DRAINING
    [task] = fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=inst.name)).tasks[:1]
    assert task.kind == "migrate_instance"
    assert wait_task(fleet, task.id).state == admin_pb2.TASK_STATE_SUCCEEDED
    settled(fleet, inst.name)
    assert_lives_on(fleet, inst.id, other, source, marker)
    assert fleet.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{source}")).instances == []
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{source}", drain=False))
    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)


def test_evacuating_a_host_by_hand_puts_an_instance_on_a_local_volume_in_error_saying_why(fleet):
    for h in ("h-a", "h-b"):
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=True))
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=False))
    try:
        inst = create(fleet, "local")
    finally:
        for h in ("h-a", "h-b"):
            fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=False))
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=True))
    assert inst.host == "hosts/h-c" and inst.volume.driver != "iscsi"
    # Its migration is refused, naming the cause.
    with pytest.raises(grpc.RpcError) as exc:
        fleet.admin.MigrateInstance(admin_pb2.MigrateInstanceRequest(instance=inst.name, host="h-a"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "cannot move" in (exc.value.details() or "")
    # A SAN node is not evacuated.
    with pytest.raises(grpc.RpcError) as exc:
        fleet.admin.EvacuateHost(admin_pb2.EvacuateHostRequest(name="hosts/h-san"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    f = fleet.server.admin_files
    env = {"REDDWARF_ENDPOINT": fleet.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    r = CliRunner().invoke(cli.app, ["--json", "admin", "host", "evacuate", "h-c"], env=env)
    assert r.exit_code == 0, r.output
    shown = json.loads(r.output)
    assert shown["kind"] == "evacuate_host" and shown["resource"] == "hosts/h-c"
    assert wait_task(fleet, shown["id"]).state == admin_pb2.TASK_STATE_SUCCEEDED
    broken = get(fleet, inst.name)
    assert broken.status == database_pb2.INSTANCE_STATUS_ERROR and broken.host == "hosts/h-c"
    assert "cannot be evacuated" in broken.fault.message and "host h-c was lost" in broken.fault.message
    # h-c is alive: once fenced it answers the watch, keeps what is still its own, gets a new certificate
    # and is UP again.
    until(lambda: host_state(fleet, "h-c"), lambda st: st == admin_pb2.HOST_STATE_UP, timeout=60,
          what="h-c rejoined", interval=0.3)
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=True))  # it takes nothing again
    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
    until(lambda: fleet.hostd("h-c").ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers,
          lambda cs: len(cs) == 0, timeout=60, what="its container deleted", interval=0.3)


def set_overcommit(f: Fleet, host: str, ratio: float) -> None:
    """What an operator's overcommit does to the scheduler: the host's memory counts `ratio` times."""
    with db.session_factory(db.make_engine(f"sqlite:///{f.server.state_dir}/state.db"))() as s, s.begin():
        h = s.get(models.Host, host)
        assert h is not None
        h.memory_overcommit = ratio


def memory_total(f: Fleet, host: str) -> int:
    return f.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{host}")).capacity.memory_mb_total


def test_a_resize_that_does_not_fit_a_loop_volume_s_host_is_refused_and_changes_nothing(fleet):
    # (A SAN instance moves instead: tests/fleet/test_resize_migrates.py.)
    # An instance on h-c's loop volume: no room there, and it cannot move; refused, nothing changes.
    for h in ("h-a", "h-b"):
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=True))
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=False))
    try:
        local = create(fleet, "rooted")
    finally:
        for h in ("h-a", "h-b"):
            fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name=f"hosts/{h}", drain=False))
        fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-c", drain=True))
    assert local.host == "hosts/h-c"
    tasks_before = len(fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=local.name)).tasks)
    set_overcommit(fleet, "h-c", (256 + 100) / memory_total(fleet, "h-c"))
    try:
        with pytest.raises(grpc.RpcError) as exc:
            fleet.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(
                name=local.name, flavor="flavors/small"), metadata=fleet.md)
    finally:
        set_overcommit(fleet, "h-c", 1.0)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "cannot move" in (exc.value.details() or "") and "flavor small" in (exc.value.details() or "")
    assert "flavor" in field_violations(exc.value)
    same = get(fleet, local.name)
    assert same.flavor == "flavors/tiny" and same.host == "hosts/h-c" and same.status == ACTIVE
    assert len(fleet.admin.ListTasks(admin_pb2.ListTasksRequest(resource=local.name)).tasks) == tasks_before
    fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=local.name), metadata=fleet.md)
    until(lambda: fleet.hostd("h-c").ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers,
          lambda cs: len(cs) == 0, timeout=60, what="its container deleted", interval=0.3)


def netns_pids(f: Fleet, host: str) -> list[int]:
    """Every process in that host's network namespace: its hostd, its guests, its initiator daemons."""
    ns = os.stat(f.net[host].netns_path).st_ino
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if os.stat(f"/proc/{d}/ns/net").st_ino == ns:
                    pids.append(int(d))
            except OSError:
                continue
    return pids


def test_a_lost_host_is_fenced_its_instance_comes_back_elsewhere_and_the_host_rejoins_empty(fleet):
    # The instance on h-b (h-a takes nothing new while it is created).
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-a", drain=True))
    inst = create(fleet, "survivor")
    fleet.admin.DrainHost(admin_pb2.DrainHostRequest(name="hosts/h-a", drain=False))
    assert inst.host == "hosts/h-b"
    marker = uuid.uuid4().hex
    fd = os.open(fleet.mount("h-b", inst.id) / MARKER, os.O_WRONLY | os.O_CREAT | os.O_SYNC, 0o644)
    os.write(fd, marker.encode())
    os.fsync(fd)
    os.close(fd)
    hostd_pid = fleet.computes["h-b"].proc.pid
    with open(f"/proc/{hostd_pid}/cmdline", "rb") as cmd:
        argv = [a.decode() for a in cmd.read().split(b"\0") if a]  # nsenter exec'd it: back into the netns

    # Every process of h-b dies at once: hostd, the guest, the initiator.
    pids = netns_pids(fleet, "b")
    assert hostd_pid in pids and len(pids) >= 3
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    fleet.computes["h-b"].proc.wait(timeout=30)

    until(lambda: host_state(fleet, "h-b"), lambda st: st == admin_pb2.HOST_STATE_FENCED, timeout=60,
          what="h-b fenced", interval=0.2)
    back = until(lambda: get(fleet, inst.name), lambda i: i.host == "hosts/h-a" and i.status == ACTIVE
                 and not i.task, timeout=120, what="ACTIVE on h-a", interval=0.3)
    assert back.status == ACTIVE
    t = fleet.target().find(f"iqn.2024-01.reddwarf:vol.{inst.id}")
    assert t is not None and t.acl == (IQN + "h-a",)
    assert [s.initiator for s in t.sessions] == [IQN + "h-a"]
    assert (fleet.mount("h-a", inst.id) / MARKER).read_text() == marker
    # h-b's certificate is revoked, and its initiator cannot log in to the LUN again, even with the right CHAP.
    certs = fleet.admin.ListCertificates(admin_pb2.ListCertificatesRequest()).certificates
    assert [c.revoked for c in certs if c.identity == "spiffe://reddwarf/host/h-b"] == [True]
    server_state = fleet.server.state_dir
    sealer = PasswordSealer((server_state / "secret").read_bytes())
    with db.session_factory(db.make_engine(f"sqlite:///{server_state}/state.db"))() as s:
        row = s.get(models.Instance, inst.id)
        assert row is not None
        chap, locator = Chap(f"rd-{inst.id[:24]}", sealer.unseal(row.volume_chap)), Locator.parse(row.volume_locator)
    probe = qsd.UserspaceInitiator(str(fleet.computes["h-b"].root / "probe"))
    try:
        with pytest.raises(RedDwarfError):
            probe.login(inst.id, locator, IQN + "h-b", chap)
    finally:
        probe.logout(inst.id)

    # h-b comes back (its hostd restarted on the same state, the dead initiator's mounts cleared as a reboot
    # would): it gives up the instance's container and volume, gets a new certificate and is UP again.
    b = fleet.computes["h-b"]
    clear_dead_host(b.root)
    with open(b.log_path, "ab") as logf:
        proc = subprocess.Popen(fleet.net["b"].argv(argv), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        until(lambda: host_state(fleet, "h-b"), lambda st: st == admin_pb2.HOST_STATE_UP, timeout=90,
              what="h-b rejoined", interval=0.5)
        hb = fleet.hostd("h-b")
        assert hb.ListContainers(host_pb2.ListContainersRequest(), timeout=30).containers == []
        assert hb.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30).volumes == []
        live = [c for c in fleet.admin.ListCertificates(admin_pb2.ListCertificatesRequest()).certificates
                if c.identity == "spiffe://reddwarf/host/h-b" and not c.revoked]
        assert len(live) == 1
        # The volume was not touched: still ACTIVE on h-a with its bytes.
        assert get(fleet, inst.name).status == ACTIVE
        assert (fleet.mount("h-a", inst.id) / MARKER).read_text() == marker
        fleet.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=fleet.md)
        until(lambda: fleet.target().targets(), lambda t: t == [], timeout=120, what="the LUN gone", interval=0.2)
    finally:
        stop_process(proc)



"""An instance's life through the server's public API, end to end against the fake hostd: create → ACTIVE,
get/list, databases, users and root through the guest agent, restart, resize (flavor and volume), a backup
(refused: the fake datastore has none), a guest that dies and is brought back, and delete with nothing
left behind on the host.

The steps share one instance (module-scoped fixtures) and are chained with pytest-dependency: when the
create fails, the steps that need the instance are skipped instead of failing after it.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import grpc
import pytest

from reddwarf.common import states
from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, database_pb2_grpc, host_pb2, host_pb2_grpc
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until

ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE


def get(c: Cluster, name: str) -> database_pb2.Instance:
    return c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)


def wait_active(c: Cluster, name: str, timeout: float = 60) -> database_pb2.Instance:
    """The instance once ACTIVE; fails at once, with its fault, if it goes to ERROR."""
    inst = until(lambda: get(c, name),
                 lambda i: i.status in (ACTIVE, database_pb2.INSTANCE_STATUS_ERROR) and not i.task,
                 timeout=timeout, what=f"{name} ACTIVE", interval=0.1)
    assert inst.status == ACTIVE, f"{name} went to ERROR: {inst.fault.message}"
    return inst


def latest_task(c: Cluster, iid: str) -> admin_pb2.Task:
    return c.admin.ListTasks(admin_pb2.ListTasksRequest(resource=f"instances/{iid}")).tasks[0]


def wait_task(c: Cluster, iid: str, kind: str, timeout: float = 60) -> admin_pb2.Task:
    """The instance's latest task of that kind, once ended; fails with its fault unless it succeeded."""
    running = (admin_pb2.TASK_STATE_PENDING, admin_pb2.TASK_STATE_RUNNING)
    task = until(lambda: latest_task(c, iid), lambda t: t.kind == kind and t.state not in running,
                 timeout=timeout, what=f"{kind} ended", interval=0.1)
    assert task.state == admin_pb2.TASK_STATE_SUCCEEDED, f"{kind} failed: {task.fault.message}"
    return task


def hostd(c: Cluster) -> host_pb2_grpc.HostAgentStub:
    """hostd's own API, as the control server calls it (its certificate)."""
    return host_pb2_grpc.HostAgentStub(c.hostd.channel(c.server.server_files))


def container_dir(c: Cluster, iid: str) -> Path:
    return c.hostd.lxc_path / f"{c.hostd.prefix}{iid}"


def agent_actions(c: Cluster, iid: str) -> list[str]:
    """What the guest's fake datastore was asked to do (reddwarf.agent.fake's action log)."""
    log = container_dir(c, iid) / "rootfs/var/lib/reddwarf-agent/fake-actions.log"
    return log.read_text().splitlines() if log.exists() else []


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def shop(cluster: Cluster) -> database_pb2.Instance:
    """The shared instance, as CreateInstance answered it (BUILD); the first step waits for it."""
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="shop", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        databases=[common_pb2.Database(database="shop")],
        users=[common_pb2.User(user="app", password="s3cret-pw", databases=["shop"])]), metadata=cluster.md)
    assert inst.status == database_pb2.INSTANCE_STATUS_BUILD
    return inst


@pytest.mark.dependency(name="active")
def test_create_reaches_active_with_a_running_guest(cluster, shop):
    inst = wait_active(cluster, shop.name)
    assert inst.health.accepting_connections and inst.endpoints[0].port > 0
    h = hostd(cluster)
    ctr = h.GetContainer(host_pb2.ContainerRef(id=shop.id))
    assert ctr.driver == "fake" and ctr.state == host_pb2.CONTAINER_STATE_RUNNING and pid_alive(ctr.init_pid)
    assert ctr.port == inst.endpoints[0].port and ctr.volume_id == shop.id
    vol = h.GetVolume(host_pb2.VolumeRef(id=shop.id))
    assert vol.size_gb == 1 and vol.attached_to == shop.id
    # the guest was configured exactly as FirstBoot configures a real one, its one-time token kept 0600
    cfg_path = container_dir(cluster, shop.id) / "rootfs/etc/reddwarf/agent.json"
    cfg = json.loads(cfg_path.read_text())
    assert cfg["instance_id"] == shop.id and cfg["mysql_port"] == ctr.port and cfg["driver"] == "fake"
    assert os.stat(cfg_path).st_mode & 0o077 == 0
    assert agent_actions(cluster, shop.id) == ["prepare"]


@pytest.mark.dependency(depends=["active"])
def test_the_build_ran_without_the_flavors_caps_and_active_has_them(cluster, shop):
    """build_boost (on by default): the container was made without the CPU and IO caps, which the activate
    step set before the instance turned ACTIVE."""
    with sqlite3.connect(cluster.server.state_dir / "state.db") as db:
        params = [json.loads(p) for (p,) in db.execute(
            "SELECT params FROM tasks WHERE resource = ? AND kind = 'create_instance'", (f"instances/{shop.id}",))]
    assert params and params[0].get("build_boost") is True
    limits = hostd(cluster).GetContainer(host_pb2.ContainerRef(id=shop.id)).limits
    flavor = database_pb2_grpc.CatalogStub(cluster.channel).GetFlavor(
        database_pb2.GetFlavorRequest(name="flavors/tiny"), metadata=cluster.md)
    assert flavor.limits.cpu_limit_millicores > 0 and flavor.limits.io_iops > 0
    assert limits == flavor.limits


@pytest.mark.dependency(depends=["active"])
def test_the_initial_database_and_user_were_prepared(cluster, shop):
    c = cluster
    dbs = c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases
    assert [d.database for d in dbs] == ["shop"]
    users = c.users.ListUsers(database_pb2.ListUsersRequest(parent=shop.name), metadata=c.md).users
    assert [u.user for u in users] == ["app"]
    # the users' passwords were handed to the guest once and are not kept by the server
    assert b"s3cret-pw" not in b"".join(p.read_bytes() for p in c.server.state_dir.glob("state.db*"))


@pytest.mark.dependency(depends=["active"])
def test_get_and_list_show_the_instance_to_its_tenant_only(cluster, shop):
    c = cluster
    inst = get(c, shop.name)
    assert (inst.display_name, inst.flavor, inst.volume.size_gb, inst.datastore) == \
        ("shop", "flavors/tiny", 1, "mariadb")
    listed = c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=c.md).instances
    assert shop.name in {i.name for i in listed}
    other = c.other_tenant_md()
    assert not c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=other).instances
    with pytest.raises(grpc.RpcError) as e:
        c.instances.GetInstance(database_pb2.GetInstanceRequest(name=shop.name), metadata=other)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.dependency(depends=["active"])
def test_databases_are_created_listed_and_deleted_through_the_agent(cluster, shop):
    c = cluster
    c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=shop.name, database=common_pb2.Database(database="reports")), metadata=c.md)
    with pytest.raises(grpc.RpcError) as e:
        c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=shop.name, database=common_pb2.Database(database="reports")), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    with pytest.raises(grpc.RpcError) as e:
        c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=shop.name, database=common_pb2.Database(database="x`; DROP DATABASE shop; --")), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["database.database"]
    dbs = c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases
    assert {d.database for d in dbs} == {"shop", "reports"}
    c.databases.DeleteDatabase(database_pb2.DeleteDatabaseRequest(name=f"{shop.name}/databases/reports"),
                               metadata=c.md)
    dbs = c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases
    assert {d.database for d in dbs} == {"shop"}
    assert "create_database reports" in agent_actions(c, shop.id)
    assert "delete_database reports" in agent_actions(c, shop.id)


@pytest.mark.dependency(depends=["active"])
def test_users_are_created_read_listed_and_deleted_through_the_agent(cluster, shop):
    c = cluster
    c.users.CreateUser(database_pb2.CreateUserRequest(parent=shop.name, user=common_pb2.User(
        user="analyst", password="an-4lyst-pw", databases=["shop"])), metadata=c.md)
    got = c.users.GetUser(database_pb2.GetUserRequest(name=f"{shop.name}/users/analyst@%"), metadata=c.md)
    assert got.user == "analyst" and list(got.databases) == ["shop"]
    users = c.users.ListUsers(database_pb2.ListUsersRequest(parent=shop.name), metadata=c.md).users
    assert {u.user for u in users} == {"app", "analyst"}
    c.users.DeleteUser(database_pb2.DeleteUserRequest(name=f"{shop.name}/users/analyst@%"), metadata=c.md)
    with pytest.raises(grpc.RpcError) as e:
        c.users.GetUser(database_pb2.GetUserRequest(name=f"{shop.name}/users/analyst@%"), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    users = c.users.ListUsers(database_pb2.ListUsersRequest(parent=shop.name), metadata=c.md).users
    assert {u.user for u in users} == {"app"}


@pytest.mark.dependency(depends=["active"])
def test_root_is_enabled_once_and_disabled(cluster, shop):
    c = cluster
    creds = c.root.EnableRoot(database_pb2.EnableRootRequest(name=shop.name), metadata=c.md)
    assert creds.user == "root" and len(creds.password) >= 16
    assert c.root.GetRootStatus(database_pb2.GetRootStatusRequest(name=shop.name), metadata=c.md).enabled
    assert creds.password.encode() not in (c.server.state_dir / "state.db").read_bytes()
    c.root.DisableRoot(database_pb2.DisableRootRequest(name=shop.name), metadata=c.md)


@pytest.mark.dependency(depends=["active"])
def test_restart_restarts_the_datastore_through_the_agent(cluster, shop):
    c = cluster
    before = len(agent_actions(c, shop.id))
    inst = c.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=shop.name), metadata=c.md)
    assert states.from_pb(states.InstanceStatus, inst.status) == "REBOOT"
    wait_task(c, shop.id, "restart_instance")
    wait_active(c, shop.name)
    assert agent_actions(c, shop.id)[before:] == ["stop", "start"]


@pytest.mark.dependency(depends=["active"])
def test_resize_sets_the_flavors_limits_on_the_host_and_in_the_guest(cluster, shop):
    c = cluster
    with pytest.raises(grpc.RpcError) as e:
        c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=shop.name, flavor="tiny"), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == ["flavor"]
    c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=shop.name, flavor="small"), metadata=c.md)
    wait_task(c, shop.id, "resize_instance")
    assert wait_active(c, shop.name).flavor == "flavors/small"
    assert hostd(c).GetContainer(host_pb2.ContainerRef(id=shop.id)).limits.memory_mb == 512
    spec = json.loads((container_dir(c, shop.id) / "spec.json").read_text())
    assert spec["limits"]["memory_mb"] == 512
    assert "apply_limits 512" in agent_actions(c, shop.id)


@pytest.mark.dependency(depends=["active"])
def test_resize_volume_grows_the_hosts_volume(cluster, shop):
    c = cluster
    c.instances.ResizeVolume(database_pb2.ResizeVolumeRequest(name=shop.name, size_gb=2), metadata=c.md)
    wait_task(c, shop.id, "resize_volume")
    assert wait_active(c, shop.name).volume.size_gb == 2
    vol = hostd(c).GetVolume(host_pb2.VolumeRef(id=shop.id))
    assert vol.size_gb == 2 and vol.attached_to == shop.id


@pytest.mark.dependency(depends=["active"])
def test_a_backup_fails_cleanly_as_the_fake_datastore_has_none(cluster, shop):
    """The fake datastore cannot back up (reddwarf.agent.main wires backups for mysql only): the backup
    task runs through the agent and ends FAILED with the guest's reason, nothing stored, the instance
    ACTIVE again."""
    c = cluster
    bk = database_pb2_grpc.BackupsStub(c.channel)
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name="nope", instance=shop.name)), metadata=c.md)
    done = until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=c.md),
                 lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED),
                 timeout=60, what="backup ended", interval=0.1)
    assert done.status == database_pb2.BACKUP_STATUS_FAILED
    assert "not available" in done.fault.message, done.fault.message
    store = c.server.state_dir / "backups"
    assert not [p for p in store.rglob("*") if b.id in p.name]
    wait_active(c, shop.name)


@pytest.mark.dependency(depends=["active"])
def test_a_guest_that_dies_is_started_again_by_hostd(cluster, shop):
    c = cluster
    h = hostd(c)
    pid = h.GetContainer(host_pb2.ContainerRef(id=shop.id)).init_pid
    killed = time.time()
    os.kill(pid, signal.SIGKILL)  # the agent is the container's init: the "container" stops with it
    ctr = until(lambda: h.GetContainer(host_pb2.ContainerRef(id=shop.id)),
                lambda x: x.state == host_pb2.CONTAINER_STATE_RUNNING and x.init_pid not in (0, pid),
                timeout=30, what="container started again", interval=0.1)
    assert pid_alive(ctr.init_pid) and not pid_alive(pid)
    # the restarted agent reconnects with the certificate it enrolled for (the token was one-time) and
    # reports its health again
    until(lambda: get(c, shop.name), lambda i: i.status == ACTIVE and i.health.observed.seconds > killed,
          timeout=30, what="a health report from the new agent", interval=0.2)
    # and answers commands (its fake datastore's databases lived in the dead process: not compared)
    c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md)


@pytest.mark.dependency(depends=["active"])
def test_delete_leaves_nothing_on_the_host_and_revokes_the_guest(cluster, shop):
    c = cluster
    h = hostd(c)
    pid = h.GetContainer(host_pb2.ContainerRef(id=shop.id)).init_pid
    vol = h.GetVolume(host_pb2.VolumeRef(id=shop.id))
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=shop.name), metadata=c.md)

    def gone() -> bool:
        try:
            get(c, shop.name)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            return True
        return False
    until(gone, bool, timeout=60, what="instance gone", interval=0.1)
    assert not pid_alive(pid)
    assert not container_dir(c, shop.id).exists() and not os.path.exists(vol.locator)
    assert not list((c.hostd.root / "state" / "mnt").iterdir())
    assert not h.ListContainers(host_pb2.ListContainersRequest()).containers
    assert not h.ListVolumes(host_pb2.ListVolumesRequest()).volumes
    certs = c.admin.ListCertificates(admin_pb2.ListCertificatesRequest(page_size=1000)).certificates
    mine = [x for x in certs if x.identity.endswith(shop.id)]
    assert mine and all(x.revoked for x in mine)


def test_a_create_refused_up_front_makes_nothing(cluster):
    c = cluster
    before = len(list(c.hostd.lxc_path.iterdir()))
    with pytest.raises(grpc.RpcError) as e:
        c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="bad", flavor="huge", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "instance.flavor" in field_violations(e.value)
    assert len(list(c.hostd.lxc_path.iterdir())) == before


def test_delete_while_building_is_refused_until_the_create_ends(cluster):
    c = cluster
    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="short-lived", flavor="tiny", volume=database_pb2.Volume(size_gb=1))), metadata=c.md)
    with pytest.raises(grpc.RpcError) as e:
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_active(c, inst.name)
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    wait_task(c, inst.id, "delete_instance")
    assert not container_dir(c, inst.id).exists()
    assert not (c.hostd.storage_path / f"{inst.id}.vol").exists()

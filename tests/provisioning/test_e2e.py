"""Provisioning end to end, all real: the server process, a hostd process, an LXC container from the
template with the guest agent as PID 1, MariaDB inside, its data on a loop volume.

The tests that use the shared instance depend on its create (pytest-dependency): if it does not reach
ACTIVE, they are skipped rather than failing one after another."""
from __future__ import annotations

import os
import subprocess
import time

import grpc
import pymysql
import pytest

from reddwarf.common import states
from reddwarf.v1 import admin_pb2, common_pb2, database_pb2
from tests.fixtures.cluster import start_cluster
from tests.fixtures.errors import field_violations as fields
from tests.fixtures.server import launch, stop_process, wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]


def wait_status(c, name, wanted=("ACTIVE",), timeout=240, md=None):
    deadline = time.monotonic() + timeout
    while True:
        i = c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=md or c.md)
        st = states.from_pb(states.InstanceStatus, i.status)
        if st in wanted:
            return i
        if st == "ERROR" and "ERROR" not in wanted:
            raise AssertionError(f"instance went to ERROR: {i.fault.message}")
        if time.monotonic() > deadline:
            raise AssertionError(f"instance still {st} ({i.task_step}) after {timeout}s")
        time.sleep(0.5)


def wait_task(c, inst, timeout=240):
    """Waits for the instance's latest task to end; fails with its fault if it did not succeed."""
    deadline = time.monotonic() + timeout
    while True:
        ts = c.admin.ListTasks(admin_pb2.ListTasksRequest(resource=f"instances/{inst.id}")).tasks
        latest = ts[0]
        if latest.state not in (admin_pb2.TASK_STATE_PENDING, admin_pb2.TASK_STATE_RUNNING):
            assert latest.state == admin_pb2.TASK_STATE_SUCCEEDED, f"{latest.kind} failed: {latest.fault.message}"
            return latest
        assert time.monotonic() < deadline, f"{latest.kind} still at {latest.current_step}"
        time.sleep(0.3)


def create(c, name="shop", flavor="tiny", **kw):
    return c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name=name, flavor=flavor, volume=database_pb2.Volume(size_gb=1)),
        **kw), metadata=c.md)


def host_leftovers(c, iid: str) -> list[str]:
    left = []
    if list(c.hostd.lxc_path.glob(f"*{iid}*")):
        left.append("container")
    if list(c.hostd.storage_path.glob(f"{iid}*")):
        left.append("volume file")
    if iid in subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout:
        left.append("loop device")
    with open("/proc/mounts") as f:
        if iid in f.read():
            left.append("mount")
    return left


@pytest.fixture(scope="module")
def shop_created(cluster):
    """The shared instance as CreateInstance answered it (BUILD); test_create_reaches_active waits for it."""
    inst = create(cluster, databases=[common_pb2.Database(database="shop")],
                  users=[common_pb2.User(user="app", password="s3cret-pw", databases=["shop"])])
    assert inst.status == database_pb2.INSTANCE_STATUS_BUILD
    return inst


@pytest.fixture
def shop(cluster, shop_created):
    """The shared instance, ACTIVE (at once after test_create_reaches_active; a test run alone waits)."""
    return wait_status(cluster, shop_created.name)


@pytest.mark.dependency(name="shop")
def test_create_reaches_active(cluster, shop_created):
    inst = wait_status(cluster, shop_created.name)
    assert inst.status == database_pb2.INSTANCE_STATUS_ACTIVE


def connect(inst, user, password, **kw):
    ep = inst.endpoints[0]
    return pymysql.connect(host=ep.host, port=ep.port, user=user, password=password, connect_timeout=5, **kw)


@pytest.mark.dependency(depends=["shop"])
def test_created_instance_serves_its_user_and_database(cluster, shop):
    assert shop.endpoints[0].port > 0 and shop.health.accepting_connections
    with connect(shop, "app", "s3cret-pw", database="shop") as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE t (id INT PRIMARY KEY)")
        cur.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        cur.execute("SHOW DATABASES")
        assert {r[0] for r in cur.fetchall()} == {"shop", "information_schema"}
    # the users' passwords are not kept by the server
    db = (cluster.server.state_dir / "state.db").read_bytes()
    assert b"s3cret-pw" not in db


@pytest.mark.dependency(depends=["shop"])
def test_watch_reports_the_current_state_first(cluster, shop):
    stream = cluster.instances.WatchInstance(database_pb2.WatchInstanceRequest(name=shop.name), metadata=cluster.md,
                                             timeout=5)
    first = next(iter(stream))
    assert first.instance.status == database_pb2.INSTANCE_STATUS_ACTIVE and first.change == "initial"
    stream.cancel()


@pytest.mark.dependency(depends=["shop"])
def test_databases_users_and_grants_through_the_api(cluster, shop):
    c = cluster
    c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
        parent=shop.name, database=common_pb2.Database(database="reports", character_set="utf8mb4")), metadata=c.md)
    dbs = c.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases
    assert {"shop", "reports"} <= {d.database for d in dbs}
    c.users.CreateUser(database_pb2.CreateUserRequest(parent=shop.name, user=common_pb2.User(
        user="analyst", password="an-4lyst-pw", databases=["reports"])), metadata=c.md)
    with connect(shop, "analyst", "an-4lyst-pw") as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES")
        assert {r[0] for r in cur.fetchall()} == {"reports", "information_schema"}
    c.users.UpdateUser(database_pb2.UpdateUserRequest(name=f"{shop.name}/users/analyst@%", password="n3w-pw-xx"),
                       metadata=c.md)
    with pytest.raises(pymysql.err.OperationalError):
        connect(shop, "analyst", "an-4lyst-pw")
    connect(shop, "analyst", "n3w-pw-xx").close()
    c.users.DeleteUser(database_pb2.DeleteUserRequest(name=f"{shop.name}/users/analyst@%"), metadata=c.md)
    c.databases.DeleteDatabase(database_pb2.DeleteDatabaseRequest(name=f"{shop.name}/databases/reports"), metadata=c.md)


@pytest.mark.dependency(depends=["shop"])
@pytest.mark.parametrize("bad", ["x`; DROP DATABASE shop; --", "mysql", "a" * 65, "x'y", "ﬀ\u0000"])
def test_hostile_names_are_refused_and_change_nothing(cluster, shop, bad):
    c = cluster
    before = {d.database for d in c.databases.ListDatabases(
        database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases}
    with pytest.raises(grpc.RpcError) as e:
        c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=shop.name, database=common_pb2.Database(database=bad)), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(e.value) == ["database.database"]
    with pytest.raises(grpc.RpcError) as e:
        c.users.CreateUser(database_pb2.CreateUserRequest(parent=shop.name, user=common_pb2.User(
            user="u1", password="pw-pw-pw", databases=[bad])), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {d.database for d in c.databases.ListDatabases(
        database_pb2.ListDatabasesRequest(parent=shop.name), metadata=c.md).databases}
    assert before == after


@pytest.mark.dependency(depends=["shop"])
def test_root_enable_returns_a_password_once_and_disable_locks_it(cluster, shop):
    c = cluster
    creds = c.root.EnableRoot(database_pb2.EnableRootRequest(name=shop.name), metadata=c.md)
    assert creds.user == "root" and len(creds.password) >= 16
    connect(shop, "root", creds.password).close()
    assert c.root.GetRootStatus(database_pb2.GetRootStatusRequest(name=shop.name), metadata=c.md).enabled
    assert creds.password.encode() not in (c.server.state_dir / "state.db").read_bytes()
    c.root.DisableRoot(database_pb2.DisableRootRequest(name=shop.name), metadata=c.md)
    with pytest.raises(pymysql.err.OperationalError):
        connect(shop, "root", creds.password)


@pytest.mark.dependency(depends=["shop"])
def test_other_tenants_cannot_see_or_touch_the_instance(cluster, shop):
    md = cluster.other_tenant_md()
    with pytest.raises(grpc.RpcError) as e:
        cluster.instances.GetInstance(database_pb2.GetInstanceRequest(name=shop.name), metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    assert not cluster.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
    with pytest.raises(grpc.RpcError) as e:
        cluster.root.EnableRoot(database_pb2.EnableRootRequest(name=shop.name), metadata=md)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.dependency(depends=["shop"])
def test_resize_changes_limits_live(cluster, shop):
    c = cluster
    with pytest.raises(grpc.RpcError) as e:
        c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=shop.name, flavor="tiny"), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(e.value) == ["flavor"]
    c.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(name=shop.name, flavor="small"), metadata=c.md)
    wait_task(c, shop)
    inst = wait_status(c, shop.name)
    assert inst.flavor == "flavors/small"
    cg = f"/sys/fs/cgroup/memory/lxc.payload.{c.hostd.prefix}{shop.id}/memory.limit_in_bytes"
    with open(cg) as f:
        assert int(f.read()) == 512 * 1024 * 1024
    with connect(inst, "app", "s3cret-pw", database="shop") as conn, conn.cursor() as cur:
        cur.execute("SELECT @@innodb_buffer_pool_size")
        assert cur.fetchone()[0] >= 128 * 1024 * 1024


@pytest.mark.parametrize("change,field,code", [
    (dict(flavor="huge"), "instance.flavor", grpc.StatusCode.NOT_FOUND),
    (dict(volume=database_pb2.Volume(size_gb=100000)), "instance.volume.size_gb", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(display_name=""), "instance.display_name", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(datastore="postgres"), "instance.datastore", grpc.StatusCode.NOT_FOUND),
])
def test_bad_create_requests_are_refused_and_make_nothing(cluster, change, field, code):
    before = len(cluster.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=cluster.md).instances)
    inst = database_pb2.Instance(display_name="bad", flavor="tiny", volume=database_pb2.Volume(size_gb=1))
    for k, v in change.items():
        if k == "volume":
            inst.volume.CopyFrom(v)
        else:
            setattr(inst, k, v)
    with pytest.raises(grpc.RpcError) as e:
        cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=inst), metadata=cluster.md)
    assert e.value.code() == code and field in fields(e.value)
    after = len(cluster.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=cluster.md).instances)
    assert before == after


def test_duplicate_initial_users_are_refused(cluster):
    with pytest.raises(grpc.RpcError) as e:
        create(cluster, databases=[common_pb2.Database(database="d")],
               users=[common_pb2.User(user="u", password="pw-pw-pw"), common_pb2.User(user="u", password="pw-pw-pw")])
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fields(e.value) == ["users[1].user"]


def test_over_quota_is_resource_exhausted(cluster):
    tid, token = cluster.new_tenant()
    cluster.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{tid}", quota=admin_pb2.Quota(
        instances=5, memory_mb=100, volume_gb=10, backups=1)))
    with pytest.raises(grpc.RpcError) as e:
        cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="big", flavor="tiny")), metadata=(("authorization", f"Bearer {token}"),))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and fields(e.value) == ["instance.flavor"]


def test_delete_removes_everything_and_revokes_the_guest(cluster):
    c = cluster
    inst = create(c, name="short-lived")
    with pytest.raises(grpc.RpcError) as e:  # a delete while BUILD is refused until the create ends
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    wait_status(c, inst.name)
    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    deadline = time.monotonic() + 120
    while True:
        try:
            c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            break
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert host_leftovers(c, inst.id) == []
    certs = c.admin.ListCertificates(admin_pb2.ListCertificatesRequest(page_size=1000)).certificates
    mine = [x for x in certs if x.identity.endswith(inst.id)]
    assert mine and all(x.revoked for x in mine)


# crashes after each kind of hostd side effect, after the one-time enrollment token was used, and after prepare
@pytest.mark.parametrize("step", ["create_volume", "create_container", "wait_agent", "prepare"])
def test_server_killed_mid_create_resumes_without_duplicates(tmp_path, step):
    env = {"REDDWARF_TEST_EXIT_AFTER_STEP": f"create_instance:{step}"}
    with start_cluster(tmp_path, server_env=env) as c:
        inst = create(c, name="crashy")
        c.server.proc.wait(timeout=120)  # the hook killed the server right after the step was recorded
        env2 = {"REDDWARF_TEST_EXIT_AFTER_STEP": ""}
        s = c.server
        proc, log_path = launch(s.state_dir, s.api, s.agent, s.enroll, env2)
        try:
            wait_ready(s.api, s.admin_files, proc, log_path)
            done = wait_status(c, inst.name)
            assert done.status == database_pb2.INSTANCE_STATUS_ACTIVE
            containers = list(c.hostd.lxc_path.glob(f"{c.hostd.prefix}*"))
            assert len(containers) == 1 and len(list(c.hostd.storage_path.glob("*.img"))) == 1
            c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
            deadline = time.monotonic() + 120
            while host_leftovers(c, inst.id) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert host_leftovers(c, inst.id) == []
        finally:
            stop_process(proc)


@pytest.mark.dependency(depends=["shop"])
def test_no_secret_reaches_a_log_or_the_state_db(cluster, shop):
    """After the flows above (user passwords, root enable, tokens): none of them in clear anywhere."""
    secrets = [b"s3cret-pw", b"an-4lyst-pw", b"n3w-pw-xx", cluster.token.encode(), cluster.server.admin_token.encode()]
    blobs = {"server log": cluster.server.log().encode(), "hostd log": cluster.hostd.log().encode(),
             "state db": b"".join(p.read_bytes() for p in cluster.server.state_dir.glob("state.db*"))}
    for where, blob in blobs.items():
        for s in secrets:
            assert s not in blob, f"a secret is in the {where}"

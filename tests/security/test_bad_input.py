"""A table of hostile names and values pushed through every create/update call, over gRPC and over the
REST gateway: each is refused with a clear error naming the field, and MySQL inside the instance is unchanged
(checked by listing its users and databases before and after)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import httpx
import pytest

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.cluster import start_cluster
from tests.fixtures.errors import field_violations as violations
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import stop_process

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")]

HOSTILE = ["x'; DROP DATABASE mysql; --", "a`b", 'q"uote', "semi;colon", "nul\x00byte", "ﬀ", "ṃysql",
           "x" * 10_000, "../../etc", "mysql", "root", "comma,name", "back\\slash", " lead", "trail "]
NUMBERS = [-1, -(2**31), 2**40]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("bad")) as c:
        inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="target", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database="shop")],
            users=[common_pb2.User(user="app", password="app-pw-123", databases=["shop"])]), metadata=c.md)
        deadline = time.monotonic() + 240
        while c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md).status \
                != database_pb2.INSTANCE_STATUS_ACTIVE:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        port = free_port()
        f = c.server.gateway_files
        gw = subprocess.Popen([sys.executable, "-m", "reddwarf.client.gateway", "--listen", f"127.0.0.1:{port}",
                               "--api", c.server.api, "--cert", str(f.cert), "--key", str(f.key), "--ca", str(f.ca)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        try:
            yield c, inst, base
        finally:
            stop_process(gw)


def mysql_state(c, inst):
    dbs = {d.database for d in database_pb2_grpc.DatabasesStub(c.channel).ListDatabases(
        database_pb2.ListDatabasesRequest(parent=inst.name), metadata=c.md).databases}
    users = {(u.user, u.host, tuple(u.databases)) for u in database_pb2_grpc.UsersStub(c.channel).ListUsers(
        database_pb2.ListUsersRequest(parent=inst.name), metadata=c.md).users}
    return dbs, users


def grpc_calls(c, inst, bad):
    u = f"{inst.name}/users/app@%"
    return [
        ("database.database", lambda: c.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(
            parent=inst.name, database=common_pb2.Database(database=bad)), metadata=c.md)),
        ("user.user", lambda: c.users.CreateUser(database_pb2.CreateUserRequest(
            parent=inst.name, user=common_pb2.User(user=bad, password="pw-pw-pw")), metadata=c.md)),
        ("user.databases[0]", lambda: c.users.CreateUser(database_pb2.CreateUserRequest(
            parent=inst.name, user=common_pb2.User(user="u2", password="pw-pw-pw", databases=[bad])), metadata=c.md)),
        ("new_user", lambda: c.users.UpdateUser(database_pb2.UpdateUserRequest(name=u, new_user=bad), metadata=c.md)),
        ("databases[0]", lambda: c.users.GrantAccess(database_pb2.GrantAccessRequest(name=u, databases=[bad]),
                                                     metadata=c.md)),
        ("database", lambda: c.users.RevokeAccess(database_pb2.RevokeAccessRequest(name=u, database=bad),
                                                  metadata=c.md)),
        ("name", lambda: c.databases.DeleteDatabase(database_pb2.DeleteDatabaseRequest(
            name=f"{inst.name}/databases/{bad}"), metadata=c.md)),
        ("instance.display_name", lambda: c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name=bad if "\x00" in bad or len(bad) > 255 else "",
                                           flavor="tiny")), metadata=c.md)),
        ("instance.flavor", lambda: c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="ok", flavor=bad)), metadata=c.md)),
    ]


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda b: repr(b[:20]))
def test_hostile_names_over_grpc_are_refused_and_change_nothing(world, bad):
    c, inst, _ = world
    before = mysql_state(c, inst)
    for field, call in grpc_calls(c, inst, bad):
        if bad in ("mysql", "ṃysql") and field in ("user.user", "new_user"):
            continue  # reserved as a database name only: a user may be called mysql (root is checked below)
        if bad == "root" and field == "database.database":
            continue  # reserved as a user name only: a database may be called root
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (field, e.value)
        assert violations(e.value), f"{field}: no field named for {bad!r}"
    assert mysql_state(c, inst) == before


@pytest.mark.parametrize("user", ["root", "os_admin", "mariadb.sys"])
def test_reserved_users_cannot_be_created_or_renamed_to(world, user):
    c, inst, _ = world
    with pytest.raises(grpc.RpcError) as e:
        c.users.CreateUser(database_pb2.CreateUserRequest(parent=inst.name, user=common_pb2.User(
            user=user, password="pw-pw-pw")), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e.value) == ["user.user"]


@pytest.mark.parametrize("n", NUMBERS)
def test_hostile_numbers_are_refused(world, n):
    c, inst, _ = world
    with pytest.raises(grpc.RpcError) as e:
        c.instances.ResizeVolume(database_pb2.ResizeVolumeRequest(name=inst.name, size_gb=n), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(e.value) == ["size_gb"]
    with pytest.raises(grpc.RpcError) as e:
        c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(tenant=f"tenants/{c.tenant}", quota=admin_pb2.Quota(
            instances=-1 if n < 0 else 1, memory_mb=n, volume_gb=1, backups=1)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as e:
        c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
            display_name="n", flavor="tiny", volume=database_pb2.Volume(size_gb=n))), metadata=c.md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("bad", HOSTILE, ids=lambda b: repr(b[:20]))
def test_hostile_names_over_rest_are_400_and_change_nothing(world, bad):
    c, inst, base = world
    before = mysql_state(c, inst)
    h = {"X-Auth-Token": c.token}
    url = f"{base}/v1.0/{c.tenant}/instances/{inst.id}"
    bodies = [("POST", "/users", {"users": [{"name": "u3", "password": "pw-pw-pw", "databases": [{"name": bad}]}]}),
              ("PUT", "/users/app/databases", {"databases": [{"name": bad}]})]
    if bad != "root":
        bodies.append(("POST", "/databases", {"databases": [{"name": bad}]}))
    if bad not in ("mysql", "ṃysql"):
        bodies.append(("POST", "/users", {"users": [{"name": bad, "password": "pw-pw-pw"}]}))
    for method, path, body in bodies:
        r = httpx.request(method, url + path, json=body, headers=h, timeout=30)
        assert r.status_code in (400, 404), (path, r.status_code, r.text)
        (kind, err), = r.json().items()
        assert kind in ("badRequest", "itemNotFound") and err["message"]
    assert mysql_state(c, inst) == before

"""Trove's access.allowed_cidrs enforced in the guest by account hosts, against a real MariaDB: a user
asked for at any host exists only at the networks' host patterns (and logs in only from inside them), a
host outside them is refused, and every operation on user@"%" acts on all its accounts. Also the checks on
the networks themselves (agent and server): a bad entry is INVALID_ARGUMENT naming access.allowed_cidrs[i]."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pymysql
import pytest

from reddwarf.agent.model import Database, User, UserUpdate
from reddwarf.agent.mysql_admin import MysqlAdmin
from reddwarf.common import cidrs
from reddwarf.common.errors import InvalidArgument, NotFound
from reddwarf.server.instance_validation import validate_create
from reddwarf.v1 import common_pb2, database_pb2
from tests.fixtures.mariadb import MariaDB, mariadb_server


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDB]:
    with mariadb_server(("--skip-name-resolve",)) as s:
        MysqlAdmin(lambda: s.connect()).remove_remote_root()
        yield s


def admin(server: MariaDB, *nets: str) -> MysqlAdmin:
    return MysqlAdmin(lambda: server.connect(), cidrs.parse_cidrs(list(nets)))


def hosts_of(server: MariaDB, user: str) -> list[str]:
    with server.connect() as c, c.cursor() as cur:
        cur.execute("SELECT Host FROM mysql.global_priv WHERE User = %s ORDER BY Host", (user,))
        return [r[0] for r in cur.fetchall()]


def can_login(server: MariaDB, user: str, password: str) -> bool:
    try:
        pymysql.connect(host="127.0.0.1", port=server.port, user=user, password=password, connect_timeout=5).close()
        return True
    except pymysql.err.OperationalError:
        return False


def test_cidrs_become_mariadb_host_patterns() -> None:
    assert [cidrs.host_pattern(n) for n in cidrs.parse_cidrs(
        ["10.0.0.0/8", "192.0.2.7/32", "0.0.0.0/0", "2001:db8::1/128", "10.0.0.0/8"])] == \
        ["10.0.0.0/255.0.0.0", "192.0.2.7", "%", "2001:db8::1"]
    nets = cidrs.parse_cidrs(["10.1.0.0/16"])
    assert cidrs.host_within("10.1.2.3", nets) and cidrs.host_within("10.1.2.0/255.255.255.0", nets)
    assert not cidrs.host_within("10.2.0.1", nets) and not cidrs.host_within("10.%", nets)
    assert not cidrs.host_within("localhost", nets) and not cidrs.host_within("10.0.0.0/255.0.0.0", nets)
    for bad in ("10.0.0.1/24", "10.0.0.0/33", "example.com", "2001:db8::/64", " 10.0.0.0/8", ""):
        with pytest.raises(InvalidArgument) as exc:
            cidrs.parse_cidrs(["10.0.0.0/8", bad])
        assert exc.value.violations[0][0] == "access.allowed_cidrs[1]"


def test_the_server_refuses_a_bad_cidr_and_a_user_host_outside_the_networks() -> None:
    def req(nets: list[str], host: str = "") -> database_pb2.CreateInstanceRequest:
        return database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="x", flavor="tiny"),
            users=[common_pb2.User(user="app", password="pw-12345678", host=host)],
            access=database_pb2.InstanceAccess(allowed_cidrs=nets, require_secure_transport=True))
    validate_create(req(["10.0.0.0/8"], "10.1.2.3"))
    validate_create(req(["10.0.0.0/8"]))
    with pytest.raises(InvalidArgument) as exc:
        validate_create(req(["10.0.0.0/8", "10.0.0.300/32"]))
    assert exc.value.violations[0][0] == "access.allowed_cidrs[1]"
    with pytest.raises(InvalidArgument) as exc:
        validate_create(req(["10.0.0.0/8"], "192.168.1.1"))
    assert exc.value.violations[0][0] == "users[0].host"


def test_a_user_at_any_host_is_made_at_each_network_and_logs_in_only_from_inside(server: MariaDB) -> None:
    s = uuid.uuid4().hex[:8]
    db, inside, outside = f"acl_{s}", f"in_{s}", f"out_{s}"
    a = admin(server, "127.0.0.0/8", "10.9.0.0/16")
    a.create_databases([Database(name=db)])
    a.create_users([User(name=inside, password="pw-inside-1", databases=(db,))])
    assert hosts_of(server, inside) == ["10.9.0.0/255.255.0.0", "127.0.0.0/255.0.0.0"]
    assert can_login(server, inside, "pw-inside-1")
    # Only networks that do not hold the client: the account exists, the login does not match it.
    admin(server, "10.8.0.0/16").create_users([User(name=outside, password="pw-outside-1")])
    assert hosts_of(server, outside) == ["10.8.0.0/255.255.0.0"]
    assert not can_login(server, outside, "pw-outside-1")

    # Operations on user@"%" act on every account of it.
    a.update_user(UserUpdate(user=inside, host="%", password="pw-inside-2"))
    assert can_login(server, inside, "pw-inside-2")
    got = a.get_user(inside, "%")
    assert got.databases == (db,) and got.host in hosts_of(server, inside)
    a.revoke_access(inside, "", db)
    assert a.get_user(inside, "%").databases == ()
    a.grant_access(inside, "%", [db])
    with server.connect() as c, c.cursor() as cur:
        cur.execute("SELECT Host FROM mysql.db WHERE User = %s ORDER BY Host", (inside,))
        assert [r[0] for r in cur.fetchall()] == ["10.9.0.0/255.255.0.0", "127.0.0.0/255.0.0.0"]
    a.update_user(UserUpdate(user=inside, host="%", new_user=f"re_{s}"))
    assert hosts_of(server, inside) == [] and len(hosts_of(server, f"re_{s}")) == 2
    a.delete_user(f"re_{s}", "%")
    assert hosts_of(server, f"re_{s}") == []
    with pytest.raises(NotFound):
        a.delete_user(f"re_{s}", "%")

    # A host outside the networks is refused before anything changes.
    with pytest.raises(InvalidArgument) as exc:
        a.create_users([User(name=f"x_{s}", password="pw-x-1234", host="192.168.0.1")])
    assert exc.value.violations[0][0] == "users[0].host"
    with pytest.raises(InvalidArgument):
        a.create_users([User(name=f"x_{s}", password="pw-x-1234", host="10.%")])
    assert hosts_of(server, f"x_{s}") == []
    a.create_users([User(name=f"x_{s}", password="pw-x-1234", host="10.9.1.2")])
    assert hosts_of(server, f"x_{s}") == ["10.9.1.2"]
    admin(server, "10.8.0.0/16").delete_user(outside, "%")
    a.delete_user(f"x_{s}", "10.9.1.2")
    a.delete_database(db)


def test_root_is_enabled_only_inside_the_networks(server: MariaDB) -> None:
    a = admin(server, "127.0.0.0/8")
    password = a.enable_root()
    try:
        assert a.root_enabled_now()
        assert "127.0.0.0/255.0.0.0" in hosts_of(server, "root") and "%" not in hosts_of(server, "root")
        assert can_login(server, "root", password)
        a.remove_remote_root()  # as after a restore: the enabled root at the networks stays
        assert can_login(server, "root", password)
    finally:
        a.disable_root()
    assert not a.root_enabled_now() and hosts_of(server, "root") == ["localhost"]


def test_accounts_restored_from_outside_the_networks_are_moved_inside(server: MariaDB) -> None:
    s = uuid.uuid4().hex[:8]
    db, user = f"mv_{s}", f"mv_{s}"
    plain = admin(server)  # a source instance without access rules, as a restored mysql.user holds it
    plain.create_databases([Database(name=db)])
    plain.create_users([User(name=user, password="pw-moved-1", databases=(db,))])
    assert hosts_of(server, user) == ["%"]
    with server.connect() as c, c.cursor() as cur:  # like Debian's mysql@localhost: the socket only
        cur.execute("CREATE USER %s@'localhost' IDENTIFIED VIA unix_socket", (f"sys_{s}",))
        cur.execute("GRANT PROXY ON ''@'%%' TO %s@'localhost' WITH GRANT OPTION", (f"sys_{s}",))
    a = admin(server, "127.0.0.0/8", "10.9.0.0/16")
    assert f"{user}@%" in a.enforce_access()
    assert hosts_of(server, user) == ["10.9.0.0/255.255.0.0", "127.0.0.0/255.0.0.0"]
    assert can_login(server, user, "pw-moved-1")  # the same password
    assert a.get_user(user, "%").databases == (db,)  # the same grants
    assert a.enforce_access() == []  # nothing left outside
    assert hosts_of(server, f"sys_{s}") == ["localhost"]  # untouched
    with server.connect() as c, c.cursor() as cur:
        cur.execute("DROP USER %s@'localhost'", (f"sys_{s}",))
    a.delete_user(user, "%")
    a.delete_database(db)

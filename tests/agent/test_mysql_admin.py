"""The MySQL driver's tenant operations against a real MariaDB: databases, users, grants, root, and
injection attempts in every name and password field refused with MySQL left unchanged."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pymysql
import pytest

from reddwarf.agent.model import Database, User, UserUpdate
from reddwarf.agent.mysql_admin import MysqlAdmin
from reddwarf.common.errors import AlreadyExists, InvalidArgument, NotFound
from tests.fixtures.mariadb import MariaDB, mariadb_server


@pytest.fixture(scope="module")
def server() -> Iterator[MariaDB]:
    # Its own server: root enable/disable and user listings must not see other tests' work.
    # skip-name-resolve as in the guest's my.cnf: TCP logins from 127.0.0.1 match user@'%'.
    with mariadb_server(("--skip-name-resolve",)) as s:
        # As prepare does in a guest: root only on the local socket, so root@'%' is the one way in.
        MysqlAdmin(lambda: s.connect()).remove_remote_root()
        yield s


@pytest.fixture()
def admin(server: MariaDB) -> MysqlAdmin:
    return MysqlAdmin(lambda: server.connect())


def sfx() -> str:
    return uuid.uuid4().hex[:8]


def snapshot(server: MariaDB) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, ...]]]:
    with server.connect() as c, c.cursor() as cur:
        cur.execute("SELECT schema_name FROM information_schema.schemata ORDER BY 1")
        dbs = [r[0] for r in cur.fetchall()]
        cur.execute("SELECT User, Host FROM mysql.global_priv ORDER BY 1, 2")
        users = list(cur.fetchall())
        cur.execute("SELECT Host, Db, User FROM mysql.db ORDER BY 1, 2, 3")
        grants = list(cur.fetchall())
    return dbs, users, grants


def login(server: MariaDB, user: str, password: str) -> pymysql.connections.Connection:
    return pymysql.connect(host="127.0.0.1", port=server.port, user=user, password=password, autocommit=True)


def test_create_list_delete_databases_with_pagination(admin: MysqlAdmin) -> None:
    s = sfx()
    want = [f"pg_{s}_{i}" for i in range(5)]
    admin.create_databases([Database(name=d) for d in want])
    seen: list[str] = []
    token = ""
    while True:
        page = admin.list_databases(2, token)
        assert len(page.databases) <= 2
        seen += [d.name for d in page.databases]
        token = page.next_page_token
        if not token:
            break
    assert [d for d in seen if d.startswith(f"pg_{s}")] == want
    assert "mysql" not in seen and "information_schema" not in seen
    for d in want:
        admin.delete_database(d)
    assert not [d for d in admin.list_databases(1000, "").databases if d.name.startswith(f"pg_{s}")]


def test_database_charset_and_collation_are_applied(admin: MysqlAdmin, server: MariaDB) -> None:
    d = f"cs_{sfx()}"
    admin.create_databases([Database(name=d, character_set="latin1", collation="latin1_swedish_ci")])
    try:
        with server.connect() as c, c.cursor() as cur:
            cur.execute("SELECT default_character_set_name, default_collation_name FROM "
                        "information_schema.schemata WHERE schema_name=%s", (d,))
            assert cur.fetchone() == ("latin1", "latin1_swedish_ci")
    finally:
        admin.delete_database(d)


def test_unknown_collation_is_refused_naming_the_field(admin: MysqlAdmin) -> None:
    with pytest.raises(InvalidArgument) as exc:
        admin.create_databases([Database(name=f"x_{sfx()}", character_set="utf8mb4",
                                                    collation="latin1_swedish_ci")])
    assert exc.value.violations[0][0] == "databases[0].collation"


def test_duplicate_database_is_already_exists_and_absent_is_not_found(admin: MysqlAdmin) -> None:
    d = f"dup_{sfx()}"
    admin.create_databases([Database(name=d)])
    try:
        with pytest.raises(AlreadyExists):
            admin.create_databases([Database(name=d)])
    finally:
        admin.delete_database(d)
    with pytest.raises(NotFound) as exc:
        admin.delete_database(d)
    assert exc.value.violations[0][0] == "database"


def test_created_user_logs_in_and_sees_exactly_the_granted_databases(admin: MysqlAdmin, server: MariaDB) -> None:
    s = sfx()
    a, b, other = f"a_{s}", f"b_{s}", f"other_{s}"
    # "a_x" would match "aXx" if _ were left a wildcard in the grant.
    lookalike = f"aX{s}"
    admin.create_databases([Database(name=n) for n in (a, b, other, lookalike)])
    user = f"u_{s}"
    try:
        admin.create_users([User(name=user, host="%", password="s3cret'pw", databases=(a,))])
        admin.grant_access(user, "%", [b])
        got = admin.get_user(user, "%")
        assert sorted(got.databases) == sorted([a, b])
        assert got.password == ""
        with login(server, user, "s3cret'pw") as c, c.cursor() as cur:
            cur.execute("SHOW DATABASES")
            visible = {r[0] for r in cur.fetchall()} - {"information_schema"}
        assert visible == {a, b}
        admin.revoke_access(user, "%", b)
        assert admin.get_user(user, "%").databases == (a,)
        admin.update_user(UserUpdate(user=user, host="%", password="n3w"))
        login(server, user, "n3w").close()
        with pytest.raises(pymysql.err.OperationalError):
            login(server, user, "s3cret'pw")
        admin.update_user(UserUpdate(user=user, host="%", new_user=user + "r"))
        assert admin.get_user(user + "r", "%").databases == (a,)
        with pytest.raises(NotFound):
            admin.get_user(user, "%")
        listed = {(u.name, u.host) for u in admin.list_users(1000, "").users}
        assert (user + "r", "%") in listed
        assert not any(u in ("root", "os_admin", "mariadb.sys") for u, _ in listed)
        admin.delete_user(user + "r", "%")
    finally:
        for n in (a, b, other, lookalike):
            admin.delete_database(n)


def test_duplicate_user_is_already_exists(admin: MysqlAdmin) -> None:
    user = f"d_{sfx()}"
    admin.create_users([User(name=user, host="localhost", password="pw")])
    try:
        with pytest.raises(AlreadyExists) as exc:
            admin.create_users([User(name=user, host="localhost", password="pw")])
        assert exc.value.violations[0][0] == "users[0].user"
    finally:
        admin.delete_user(user, "localhost")


def test_grant_on_an_absent_database_is_not_found_and_changes_nothing(admin: MysqlAdmin, server: MariaDB) -> None:
    user = f"g_{sfx()}"
    before = snapshot(server)
    with pytest.raises(NotFound) as exc:
        admin.create_users([User(name=user, password="pw", databases=("nope_" + user,))])
    assert exc.value.violations[0][0] == "users[0].databases[0]"
    assert snapshot(server) == before
    admin.create_users([User(name=user, password="pw")])
    try:
        with pytest.raises(NotFound) as exc:
            admin.grant_access(user, "%", ["nope_" + user])
        assert exc.value.violations[0][0] == "databases[0]"
    finally:
        admin.delete_user(user, "%")


def test_user_list_paginates(admin: MysqlAdmin) -> None:
    s = sfx()
    made = [f"p{i}_{s}" for i in range(5)]
    admin.create_users([User(name=u, password="pw") for u in made])
    try:
        seen, token = [], ""
        while True:
            page = admin.list_users(2, token)
            seen += [u.name for u in page.users]
            token = page.next_page_token
            if not token:
                break
        assert [u for u in seen if u.endswith(s)] == made
    finally:
        for u in made:
            admin.delete_user(u, "%")


def test_root_enable_login_disable(admin: MysqlAdmin, server: MariaDB) -> None:
    assert admin.root_enabled_now() is False
    password = admin.enable_root()
    assert len(password) >= 24
    assert admin.root_enabled_now() is True
    with login(server, "root", password) as c, c.cursor() as cur:
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0] == "root@%"
    admin.disable_root()
    assert admin.root_enabled_now() is False
    with pytest.raises(pymysql.err.OperationalError):
        login(server, "root", password)


INJECTIONS = ["x`; DROP DATABASE mysql; --", "x'; DROP USER root; --", "a\x00b", "a,b", "x\\", "mysql",
              "x\uff07; drop", "a" * 10_240]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_in_every_field_is_refused_with_mysql_unchanged(admin: MysqlAdmin, server: MariaDB,
                                                                  bad: str) -> None:
    ok_db = f"ok_{sfx()}"
    admin.create_databases([Database(name=ok_db)])
    ok_user = f"ok_{sfx()}"
    admin.create_users([User(name=ok_user, password="pw")])
    try:
        before = snapshot(server)
        attempts = [
            lambda: admin.create_databases([Database(name=bad)]),
            lambda: admin.create_databases([Database(name=ok_db + "2", character_set=bad)]),
            lambda: admin.create_databases([Database(name=ok_db + "2", collation=bad)]),
            lambda: admin.delete_database(bad),
            lambda: admin.create_users([User(name="n" + ok_user, password="pw", databases=(bad,))]),
            lambda: admin.delete_user(bad, "%"),
            lambda: admin.grant_access(ok_user, "%", [bad]),
            lambda: admin.grant_access(bad, "%", [ok_db]),
            lambda: admin.revoke_access(ok_user, "%", bad),
            lambda: admin.list_databases(10, bad),
            lambda: admin.list_users(10, bad),
        ]
        if bad != "mysql":  # a user or host may be called "mysql"; no other value here is a valid name
            attempts += [
                lambda: admin.create_users([User(name=bad, password="pw")]),
                lambda: admin.create_users([User(name="n" + ok_user, host=bad, password="pw")]),
                lambda: admin.delete_user(ok_user, bad),
                lambda: admin.update_user(UserUpdate(user=ok_user, host="%", new_user=bad)),
                lambda: admin.update_user(UserUpdate(user=ok_user, host="%", new_host=bad)),
            ]
        if "\x00" in bad or len(bad) > 512:
            attempts.append(lambda: admin.update_user(UserUpdate(user=ok_user, host="%", password=bad)))
        for i, attempt in enumerate(attempts):
            with pytest.raises((InvalidArgument, NotFound)) as exc:
                attempt()
            assert exc.value.violations, f"attempt {i} named no field"
        assert snapshot(server) == before
    finally:
        admin.delete_user(ok_user, "%")
        admin.delete_database(ok_db)


def test_hostile_password_is_stored_as_a_value_not_sql(admin: MysqlAdmin, server: MariaDB) -> None:
    user = f"hp_{sfx()}"
    pw = "'); DROP DATABASE mysql; -- `\\"
    admin.create_users([User(name=user, host="%", password=pw)])
    try:
        login(server, user, pw).close()
    finally:
        admin.delete_user(user, "%")


def test_listings_hide_internal_accounts_and_non_database_directories(admin: MysqlAdmin, server: MariaDB) -> None:
    """What a tenant lists is only its own: no MariaDB-internal accounts (mysql@localhost, mariadb.sys, root,
    os_admin, mysql.*) and no system schemas or datadir directories that are not databases (ext4's
    lost+found at a volume's root reads as "#mysql50#lost+found")."""
    import os
    lost = os.path.join(server.datadir, "lost+found")
    os.makedirs(lost, exist_ok=True)
    s = sfx()
    db, user = f"mine_{s}", f"app_{s}"
    try:
        with server.connect() as c, c.cursor() as cur:
            cur.execute("SELECT schema_name FROM information_schema.schemata")
            assert "#mysql50#lost+found" in {r[0] for r in cur.fetchall()}  # MariaDB does show it
            # mariadb-install-db --user=mysql (as in a guest) makes mysql@localhost (unix_socket); this
            # fixture's runs as root, so it is made here.
            cur.execute("CREATE USER IF NOT EXISTS 'mysql'@'localhost' IDENTIFIED VIA unix_socket")
            cur.execute("CREATE USER IF NOT EXISTS 'os_admin'@'localhost' IDENTIFIED BY 'x-internal-1'")
            cur.execute("CREATE USER IF NOT EXISTS 'mysql.session'@'localhost' IDENTIFIED BY 'x-internal-2'")
        admin.create_databases([Database(name=db)])
        admin.create_users([User(name=user, host="%", password="pw-1234567", databases=(db,))])
        listed_dbs = {d.name for d in admin.list_databases(1000, "").databases}
        assert db in listed_dbs
        assert not listed_dbs & {"#mysql50#lost+found", "lost+found", "mysql", "information_schema",
                                 "performance_schema", "sys"}
        assert not [n for n in listed_dbs if n.startswith("#mysql50#")]
        listed = {(u.name, u.host) for u in admin.list_users(1000, "").users}
        assert (user, "%") in listed
        assert not {u for u, _ in listed} & {"mysql", "root", "os_admin", "mariadb.sys", "mysql.session"}
        # Paging walks the same filtered list.
        seen, token = [], ""
        while True:
            page = admin.list_users(1, token)
            seen += [(u.name, u.host) for u in page.users]
            token = page.next_page_token
            if not token:
                break
        assert set(seen) == listed
    finally:
        os.rmdir(lost)
        with server.connect() as c, c.cursor() as cur:
            cur.execute("DROP USER IF EXISTS 'os_admin'@'localhost', 'mysql.session'@'localhost', "
                        "'mysql'@'localhost', %s@'%%'", (user,))
            cur.execute("DROP DATABASE IF EXISTS " + db)

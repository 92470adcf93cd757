"""SQL administration of a guest's mysqld for the tenant: databases, users, grants and root, plus the
internal admin account and the live settings a resize changes. Blocking (pymysql); the driver runs it in
a thread.

Values (user names, hosts, passwords) go in as parameters, identifiers (database names) only through
common/names.py after validation. Nothing a tenant sent is concatenated into SQL.
"""
from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pymysql

from reddwarf.common import cidrs, names
from reddwarf.common.errors import AlreadyExists, Internal, InvalidArgument, NotFound, Unavailable

from .model import Database, DatabasePage, User, UserPage, UserUpdate

DEFAULT_CHARSET = "utf8mb4"
DEFAULT_COLLATION = "utf8mb4_general_ci"
MAX_PAGE = 1000

# What the tenant's listings never show (besides "#mysql50#..." schemas and "mysql.*" / mysql@localhost
# accounts, matched in the queries).
HIDDEN_DATABASES = sorted(names.RESERVED_DATABASES)
HIDDEN_USERS = sorted(names.RESERVED_USERS)  # root, os_admin, mariadb.sys

Connect = Callable[[], "pymysql.connections.Connection[Any]"]


def _page_token(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode()


def _read_token(token: str, field: str) -> Any:
    try:
        return json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not one this agent issued", field=field) from None


def _page_size(size: int) -> int:
    if size < 0:
        raise InvalidArgument("page_size may not be negative", field="page_size")
    return min(size or 100, MAX_PAGE)


def _like_escape(db: str) -> str:
    # In GRANT ... ON `db`.*, _ and % are wildcards; escape them so a grant covers exactly that database.
    return db.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%")


def _like_unescape(db: str) -> str:
    out, i = [], 0
    while i < len(db):
        if db[i] == "\\" and i + 1 < len(db):
            i += 1
        out.append(db[i])
        i += 1
    return "".join(out)


class MysqlAdmin:
    """The tenant-facing SQL operations, over a connection factory for the internal admin account.

    With `allowed` networks (Trove's access.allowed_cidrs), accounts exist only at hosts inside them: a user
    asked for at "%" (any host) is made at each network's host pattern, and operations on user@"%" act on
    all of those; a user asked for at a host outside the networks is refused."""

    def __init__(self, connect: Connect, allowed: Sequence[cidrs.Network] = ()) -> None:
        self._connect = connect
        self.allowed: tuple[cidrs.Network, ...] = tuple(allowed)

    def _hosts(self, host: str, field: str, creating: bool = False) -> list[str]:
        """The account hosts that `host` (validated, "" = "%") stands for under the access policy. Only
        what is made (creating) must lie inside the networks: an existing account can still be dropped."""
        host = names.validate_host(host, field)
        if not self.allowed:
            return [host]
        if host == "%":
            return [cidrs.host_pattern(n) for n in self.allowed]
        if creating and not cidrs.host_within(host, self.allowed):
            raise InvalidArgument(f"host {host!r} is outside the instance's access.allowed_cidrs", field=field)
        return [host]

    def _existing(self, cur: Any, user: str, hosts: Sequence[str], field: str = "user") -> list[str]:
        found = [h for h in hosts if self._user_exists(cur, user, h)]
        if not found:
            raise NotFound(f"user {user}@{hosts[0] if len(hosts) == 1 else '%'} does not exist", field=field)
        return found

    @contextmanager
    def cursor(self) -> Iterator[Any]:
        try:
            conn = self._connect()
        except pymysql.err.OperationalError as exc:
            raise Unavailable(f"mysqld is not accepting connections ({exc.args[0]})") from None
        try:
            with conn.cursor() as cur:
                yield cur
        except pymysql.err.MySQLError as exc:
            code = exc.args[0] if exc.args else 0
            raise Internal(f"mysqld refused the statement (error {code}): {exc.args[-1]}") from None
        finally:
            conn.close()

    # databases -----------------------------------------------------------

    @staticmethod
    def _db_exists(cur: Any, db: str) -> bool:
        cur.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (db,))
        return cur.fetchone() is not None

    @staticmethod
    def _user_exists(cur: Any, user: str, host: str) -> bool:
        cur.execute("SELECT 1 FROM mysql.global_priv WHERE User = %s AND Host = %s", (user, host))
        return cur.fetchone() is not None

    def create_databases(self, dbs: Sequence[Database], if_not_exists: bool = False) -> None:
        checked: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for i, d in enumerate(dbs):
            name = names.validate_database(d.name, f"databases[{i}].database")
            if name in seen:
                raise InvalidArgument(f"database {name!r} is named twice", field=f"databases[{i}].database")
            seen.add(name)
            cs = names.validate_charset(d.character_set or DEFAULT_CHARSET, f"databases[{i}].character_set")
            co = d.collation or (DEFAULT_COLLATION if cs == DEFAULT_CHARSET else "")
            if co:
                names.validate_charset(co, f"databases[{i}].collation")
            checked.append((name, cs, co))
        with self.cursor() as cur:
            # Everything is checked before anything changes: a bad entry leaves MySQL as it was.
            for i, (name, cs, co) in enumerate(checked):
                cur.execute("SELECT 1 FROM information_schema.character_sets WHERE character_set_name = %s",
                            (cs,))
                if cur.fetchone() is None:
                    raise InvalidArgument(f"unknown character set {cs!r}", field=f"databases[{i}].character_set")
                if co:
                    cur.execute("SELECT 1 FROM information_schema.collations WHERE collation_name = %s "
                                "AND character_set_name = %s", (co, cs))
                    if cur.fetchone() is None:
                        raise InvalidArgument(f"collation {co!r} does not belong to {cs!r}",
                                              field=f"databases[{i}].collation")
                if not if_not_exists and self._db_exists(cur, name):
                    raise AlreadyExists(f"database {name!r} already exists", field=f"databases[{i}].database")
            for name, cs, co in checked:
                sql = ("CREATE DATABASE IF NOT EXISTS " if if_not_exists else "CREATE DATABASE ") \
                    + names.quote_ident(name) + " CHARACTER SET " + cs + (f" COLLATE {co}" if co else "")
                cur.execute(sql)

    def delete_database(self, db: str) -> None:
        names.validate_database(db, "database")
        with self.cursor() as cur:
            if not self._db_exists(cur, db):
                raise NotFound(f"database {db!r} does not exist", field="database")
            cur.execute("DROP DATABASE " + names.quote_ident(db))

    def list_databases(self, page_size: int, page_token: str) -> DatabasePage:
        size = _page_size(page_size)
        after = _read_token(page_token, "page_token") if page_token else ""
        if not isinstance(after, str):
            raise InvalidArgument("page_token is not one this agent issued", field="page_token")
        with self.cursor() as cur:
            # Hidden: the system schemas, and directories of the datadir that are not databases (ext4's
            # lost+found at the volume's root shows as "#mysql50#lost+found").
            cur.execute(
                "SELECT schema_name, default_character_set_name, default_collation_name "
                "FROM information_schema.schemata WHERE schema_name > %s AND schema_name NOT IN %s "
                "AND schema_name NOT LIKE %s ORDER BY schema_name LIMIT %s",
                (after, HIDDEN_DATABASES, names.MYSQL50_PREFIX + "%", size + 1))
            rows = cur.fetchall()
        return DatabasePage(
            databases=tuple(Database(name=r[0], character_set=r[1], collation=r[2]) for r in rows[:size]),
            next_page_token=_page_token(rows[size - 1][0]) if len(rows) > size else "")

    # users ---------------------------------------------------------------

    def create_users(self, users: Sequence[User], skip_existing: bool = False) -> None:
        checked: list[tuple[str, str, str, list[str], int]] = []
        seen: set[tuple[str, str]] = set()
        for i, u in enumerate(users):
            name = names.validate_user(u.name, f"users[{i}].user")
            pw = names.validate_password(u.password, f"users[{i}].password")
            dbs = [names.validate_database(d, f"users[{i}].databases[{j}]") for j, d in enumerate(u.databases)]
            for host in self._hosts(u.host, f"users[{i}].host", creating=True):
                if (name, host) in seen:
                    raise InvalidArgument(f"user {name}@{host} is named twice", field=f"users[{i}].user")
                seen.add((name, host))
                checked.append((name, host, pw, dbs, i))
        with self.cursor() as cur:
            todo = []
            for name, host, pw, dbs, i in checked:
                if self._user_exists(cur, name, host):
                    if skip_existing:
                        continue
                    raise AlreadyExists(f"user {name}@{host} already exists", field=f"users[{i}].user")
                for j, d in enumerate(dbs):
                    if not self._db_exists(cur, d):
                        raise NotFound(f"database {d!r} does not exist", field=f"users[{i}].databases[{j}]")
                todo.append((name, host, pw, dbs))
            for name, host, pw, dbs in todo:
                cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (name, host, pw))
                for d in dbs:
                    cur.execute("GRANT ALL PRIVILEGES ON " + names.quote_ident(_like_escape(d)) + ".* TO %s@%s",
                                (name, host))

    def delete_user(self, user: str, host: str) -> None:
        names.validate_user(user, "user")
        hosts = self._hosts(host, "host")
        with self.cursor() as cur:
            for h in self._existing(cur, user, hosts):
                cur.execute("DROP USER %s@%s", (user, h))

    def _user_databases(self, cur: Any, user: str, host: str) -> list[str]:
        cur.execute("SELECT Db FROM mysql.db WHERE User = %s AND Host = %s ORDER BY Db", (user, host))
        return [_like_unescape(r[0]) for r in cur.fetchall()]

    def get_user(self, user: str, host: str) -> User:
        names.validate_user(user, "user")
        hosts = self._hosts(host, "host")
        with self.cursor() as cur:
            host = self._existing(cur, user, hosts)[0]
            return User(name=user, host=host, databases=tuple(self._user_databases(cur, user, host)))

    def update_user(self, req: UserUpdate) -> None:
        user = names.validate_user(req.user, "user")
        host = names.validate_host(req.host, "host")
        pw = names.validate_password(req.password, "password") if req.password else ""
        new_user = names.validate_user(req.new_user, "new_user") if req.new_user else user
        new_host = names.validate_host(req.new_host, "new_host") if req.new_host else host
        if not pw and (new_user, new_host) == (user, host):
            raise InvalidArgument("nothing to change: give a password, new_user or new_host", field="password")
        hosts = self._hosts(host, "host")
        targets = self._hosts(new_host, "new_host", creating=True) if new_host != host else []
        with self.cursor() as cur:
            found = self._existing(cur, user, hosts)
            if targets and len(targets) != len(found):
                raise InvalidArgument(f"user {user}@{host} is {len(found)} accounts under access.allowed_cidrs, "
                                      f"{new_host!r} would be {len(targets)}", field="new_host")
            renames = list(zip(found, targets or found, strict=True))
            renamed = (new_user, new_host) != (user, host)
            if renamed:
                for _, nh in renames:
                    if self._user_exists(cur, new_user, nh):
                        raise AlreadyExists(f"user {new_user}@{nh} already exists",
                                            field="new_user" if req.new_user else "new_host")
            for h in found:
                if pw:
                    cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, h, pw))
            if renamed:
                for h, nh in renames:
                    cur.execute("RENAME USER %s@%s TO %s@%s", (user, h, new_user, nh))

    def grant_access(self, user: str, host: str, databases: Sequence[str]) -> None:
        names.validate_user(user, "user")
        hosts = self._hosts(host, "host")
        if not databases:
            raise InvalidArgument("at least one database is required", field="databases")
        dbs = [names.validate_database(d, f"databases[{j}]") for j, d in enumerate(databases)]
        with self.cursor() as cur:
            found = self._existing(cur, user, hosts)
            for j, d in enumerate(dbs):
                if not self._db_exists(cur, d):
                    raise NotFound(f"database {d!r} does not exist", field=f"databases[{j}]")
            for h in found:
                for d in dbs:
                    cur.execute("GRANT ALL PRIVILEGES ON " + names.quote_ident(_like_escape(d)) + ".* TO %s@%s",
                                (user, h))

    def revoke_access(self, user: str, host: str, database: str) -> None:
        names.validate_user(user, "user")
        hosts = self._hosts(host, "host")
        db = names.validate_database(database, "database")
        with self.cursor() as cur:
            found = [h for h in self._existing(cur, user, hosts) if db in self._user_databases(cur, user, h)]
            if not found:
                raise NotFound(f"user {user}@{host or '%'} has no access to {db!r}", field="database")
            for h in found:
                cur.execute("REVOKE ALL PRIVILEGES ON " + names.quote_ident(_like_escape(db)) + ".* FROM %s@%s",
                            (user, h))

    def list_users(self, page_size: int, page_token: str) -> UserPage:
        size = _page_size(page_size)
        after = _read_token(page_token, "page_token") if page_token else ["", ""]
        if not (isinstance(after, list) and len(after) == 2 and all(isinstance(x, str) for x in after)):
            raise InvalidArgument("page_token is not one this agent issued", field="page_token")
        with self.cursor() as cur:
            # Roles (PUBLIC and tenant-made) have an empty host; they are not users. Internal accounts are
            # never listed (as Trove hides os_admin, root and mysql.*): ours, MariaDB's mysql@localhost
            # (10.4+, owner of the system tables) and mariadb.sys / mysql.* system accounts.
            cur.execute(
                "SELECT User, Host FROM mysql.global_priv WHERE User <> '' AND Host <> '' AND User NOT IN %s "
                "AND User NOT LIKE %s AND NOT (User = %s AND Host = %s) "
                "AND (User > %s OR (User = %s AND Host > %s)) ORDER BY User, Host LIMIT %s",
                (HIDDEN_USERS, "mysql.%", "mysql", "localhost", after[0], after[0], after[1], size + 1))
            rows = cur.fetchall()
            users = tuple(User(name=u, host=h, databases=tuple(self._user_databases(cur, u, h)))
                          for u, h in rows[:size])
        return UserPage(users=users,
                        next_page_token=_page_token([rows[size - 1][0], rows[size - 1][1]]) if len(rows) > size
                        else "")

    # root ----------------------------------------------------------------

    def enable_root(self) -> str:
        """Gives root@'%' a fresh random password (returned once, never stored) and all privileges."""
        password = secrets.token_urlsafe(24)
        with self.cursor() as cur:
            for h in self._hosts("%", "host"):
                cur.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", ("root", h, password))
                cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", ("root", h, password))
                cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", ("root", h))
        return password

    def remove_remote_root(self) -> None:
        """Drops the root@127.0.0.1/::1/<hostname> accounts install-db makes: more specific than root@'%',
        they would shadow an enabled root, and nobody should reach root but through the root API."""
        with self.cursor() as cur:
            keep = sorted({"localhost", "%", *self._hosts("%", "host")})
            cur.execute("SELECT Host FROM mysql.global_priv WHERE User = %s AND Host NOT IN %s", ("root", keep))
            for (host,) in cur.fetchall():
                cur.execute("DROP USER %s@%s", ("root", host))
            cur.execute("DROP USER IF EXISTS %s@%s", ("", "localhost"))

    def enforce_access(self) -> list[str]:
        """Moves tenant accounts (and an enabled root) at hosts outside the networks inside them: user@host
        becomes user@<each network's pattern> with the same authentication and grants, then user@host is
        dropped. For a restore, whose mysql.* is the source's. Returns the accounts moved ("user@host")."""
        if not self.allowed:
            return []
        patterns = self._hosts("%", "host")
        moved: list[str] = []
        with self.cursor() as cur:
            # localhost accounts (root, the internal admin, Debian's mysql@localhost) are reached only by
            # the socket inside the guest: no network rule applies to them.
            cur.execute("SELECT User, Host FROM mysql.global_priv WHERE User <> '' AND Host NOT IN ('', 'localhost') "
                        "AND (User NOT IN %s OR User = 'root') ORDER BY User, Host",
                        (sorted(names.RESERVED_USERS),))
            for user, host in cur.fetchall():
                if host in patterns or cidrs.host_within(host, self.allowed):
                    continue
                old = names.quote_ident(user) + "@" + names.quote_ident(host)
                cur.execute("SHOW CREATE USER %s@%s", (user, host))
                create = str(cur.fetchone()[0])
                cur.execute("SHOW GRANTS FOR %s@%s", (user, host))
                grants = [str(r[0]) for r in cur.fetchall()]
                for p in patterns:
                    if self._user_exists(cur, user, p):
                        continue
                    new = names.quote_ident(user) + "@" + names.quote_ident(p)
                    # Statements mysqld itself printed, with only the account name changed.
                    cur.execute(create.replace(old, new, 1))
                    for g in grants:
                        cur.execute(g.replace(" TO " + old, " TO " + new, 1))
                cur.execute("DROP USER %s@%s", (user, host))
                moved.append(f"{user}@{host}")
        return moved

    def disable_root(self) -> None:
        with self.cursor() as cur:
            for h in sorted({"%", *self._hosts("%", "host")}):
                cur.execute("DROP USER IF EXISTS %s@%s", ("root", h))

    def root_enabled_now(self) -> bool:
        with self.cursor() as cur:
            return any(self._user_exists(cur, "root", h) for h in self._hosts("%", "host"))

    # health --------------------------------------------------------------

    def status(self) -> dict[str, int]:
        wanted = ("Uptime", "Connections", "Threads_connected", "Queries", "Slow_queries",
                  "Innodb_buffer_pool_pages_total", "Innodb_buffer_pool_pages_data", "Innodb_page_size")
        with self.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS WHERE Variable_name IN %s", (wanted,))
            out: dict[str, int] = {}
            for k, v in cur.fetchall():
                try:
                    out[k] = int(v)
                except (TypeError, ValueError):
                    pass
            return out

    def replication(self) -> tuple[bool, int | None] | None:
        """(threads running, seconds behind the primary or None while stopped) on a replica; None when this
        server replicates from nothing. MariaDB names the columns after the old words."""
        with self.cursor() as cur:
            cur.execute("SHOW REPLICA STATUS")
            row = cur.fetchone()
            if row is None or cur.description is None:
                return None
            cols = {d[0]: v for d, v in zip(cur.description, row, strict=True)}
        running = cols.get("Slave_IO_Running") == "Yes" and cols.get("Slave_SQL_Running") == "Yes"
        lag = cols.get("Seconds_Behind_Master")
        return running, (int(lag) if lag is not None else None)

    # resize ----------------------------------------------------------------

    def reload_tls(self) -> None:
        """mysqld reads its certificate, key and CA files again (MariaDB 10.4+)."""
        with self.cursor() as cur:
            cur.execute("FLUSH SSL")

    def apply_sizes(self, buffer_pool_mb: int, max_connections: int) -> None:
        # Both are dynamic in MariaDB 10.11: a resize needs no restart.
        with self.cursor() as cur:
            cur.execute("SET GLOBAL innodb_buffer_pool_size = %s", (buffer_pool_mb * 1024 * 1024,))
            cur.execute("SET GLOBAL max_connections = %s", (max_connections,))


def create_internal_admin(root: pymysql.connections.Connection[Any], password: str) -> None:
    """Creates (or re-keys) os_admin@localhost with all privileges, over root's connection (closed after)."""
    try:
        with root.cursor() as cur:
            cur.execute("CREATE USER IF NOT EXISTS %s@'localhost' IDENTIFIED BY %s", (names.ADMIN_USER, password))
            cur.execute("ALTER USER %s@'localhost' IDENTIFIED BY %s", (names.ADMIN_USER, password))
            cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'localhost' WITH GRANT OPTION", (names.ADMIN_USER,))
    finally:
        root.close()

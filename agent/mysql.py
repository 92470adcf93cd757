"""The MySQL/MariaDB datastore driver: my.cnf sized to the flavor, the datadir on the volume, a supervised
mysqld, the internal admin account, and the tenant's databases, users, grants and root.

All SQL goes through pymysql: values (user names, hosts, passwords) as parameters, identifiers (database
names) only through common/names.py after validation. Nothing a tenant sent is concatenated into SQL.
"""
from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymysql
from google.protobuf import json_format

from reddwarf.agent import services
from reddwarf.agent.datastore import DatastoreDriver, ProgressFn, no_progress
from reddwarf.agent.supervisor import Supervisor
from reddwarf.common import names, runner
from reddwarf.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RedDwarfError,
    Unavailable,
)
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2

log = logging.getLogger("reddwarf.agent.mysql")

DEFAULT_CHARSET = "utf8mb4"
DEFAULT_COLLATION = "utf8mb4_general_ci"
MAX_PAGE = 1000
INIT_MARKER = ".reddwarf-initialising"

Connect = Callable[[], "pymysql.connections.Connection[Any]"]


# ---------------------------------------------------------------- my.cnf

@dataclass(frozen=True)
class MyCnf:
    datadir: str
    socket: str
    pid_file: str
    log_error: str
    port: int
    bind_address: str
    buffer_pool_mb: int
    max_connections: int
    open_files_limit: int


def size_for_limits(limits: common_pb2.Limits) -> tuple[int, int]:
    """(innodb_buffer_pool_size MiB, max_connections) for a flavor: half the memory for the buffer pool on
    flavors of 1 GiB or more, a quarter below (small guests need room for per-connection buffers)."""
    mem = max(int(limits.memory_mb), 128)
    pool = mem // 2 if mem >= 1024 else mem // 4
    pool = max(32, pool)
    max_conn = max(20, min(mem // 4, 2000))
    return pool, max_conn


def render_my_cnf(c: MyCnf) -> str:
    return "\n".join([
        "# Written by the Red Dwarf agent from the flavor's limits; re-rendered on resize.",
        "[mysqld]",
        f"datadir = {c.datadir}",
        f"socket = {c.socket}",
        f"pid-file = {c.pid_file}",
        f"log-error = {c.log_error}",
        f"port = {c.port}",
        f"bind-address = {c.bind_address}",
        # Host names in grants are matched as written; no DNS in the connection path.
        "skip-name-resolve",
        f"innodb_buffer_pool_size = {c.buffer_pool_mb}M",
        f"max_connections = {c.max_connections}",
        f"open_files_limit = {c.open_files_limit}",
        "character-set-server = utf8mb4",
        "collation-server = utf8mb4_general_ci",
        "slow_query_log = 1",
        "long_query_time = 2",
        "skip-log-bin",
        "",
        "[client]",
        f"socket = {c.socket}",
        "",
    ])


# ---------------------------------------------------------------- SQL (blocking; run in a thread)

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
    """The tenant-facing SQL operations, over a connection factory for the internal admin account."""

    def __init__(self, connect: Connect) -> None:
        self._connect = connect

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

    def create_databases(self, dbs: list[common_pb2.Database], if_not_exists: bool = False) -> None:
        checked: list[tuple[str, str, str]] = []
        seen: set[str] = set()
        for i, d in enumerate(dbs):
            name = names.validate_database(d.database, f"databases[{i}].database")
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

    def list_databases(self, page_size: int, page_token: str) -> agent_pb2.DatabaseList:
        size = _page_size(page_size)
        after = _read_token(page_token, "page_token") if page_token else ""
        if not isinstance(after, str):
            raise InvalidArgument("page_token is not one this agent issued", field="page_token")
        reserved = sorted(names.RESERVED_DATABASES)
        with self.cursor() as cur:
            cur.execute(
                "SELECT schema_name, default_character_set_name, default_collation_name "
                "FROM information_schema.schemata WHERE schema_name > %s AND schema_name NOT IN %s "
                "ORDER BY schema_name LIMIT %s", (after, reserved, size + 1))
            rows = cur.fetchall()
        out = agent_pb2.DatabaseList(databases=[
            common_pb2.Database(database=r[0], character_set=r[1], collation=r[2]) for r in rows[:size]])
        if len(rows) > size:
            out.next_page_token = _page_token(rows[size - 1][0])
        return out

    # users ---------------------------------------------------------------

    def create_users(self, users: list[common_pb2.User], skip_existing: bool = False) -> None:
        checked: list[tuple[str, str, str, list[str]]] = []
        seen: set[tuple[str, str]] = set()
        for i, u in enumerate(users):
            name = names.validate_user(u.user, f"users[{i}].user")
            host = names.validate_host(u.host, f"users[{i}].host")
            pw = names.validate_password(u.password, f"users[{i}].password")
            if (name, host) in seen:
                raise InvalidArgument(f"user {name}@{host} is named twice", field=f"users[{i}].user")
            seen.add((name, host))
            dbs = [names.validate_database(d, f"users[{i}].databases[{j}]") for j, d in enumerate(u.databases)]
            checked.append((name, host, pw, dbs))
        with self.cursor() as cur:
            todo = []
            for i, (name, host, pw, dbs) in enumerate(checked):
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

    def _require_user(self, cur: Any, user: str, host: str, field: str = "user") -> None:
        if not self._user_exists(cur, user, host):
            raise NotFound(f"user {user}@{host} does not exist", field=field)

    def delete_user(self, user: str, host: str) -> None:
        names.validate_user(user, "user")
        host = names.validate_host(host, "host")
        with self.cursor() as cur:
            self._require_user(cur, user, host)
            cur.execute("DROP USER %s@%s", (user, host))

    def _user_databases(self, cur: Any, user: str, host: str) -> list[str]:
        cur.execute("SELECT Db FROM mysql.db WHERE User = %s AND Host = %s ORDER BY Db", (user, host))
        return [_like_unescape(r[0]) for r in cur.fetchall()]

    def get_user(self, user: str, host: str) -> common_pb2.User:
        names.validate_user(user, "user")
        host = names.validate_host(host, "host")
        with self.cursor() as cur:
            self._require_user(cur, user, host)
            return common_pb2.User(user=user, host=host, databases=self._user_databases(cur, user, host))

    def update_user(self, req: agent_pb2.UpdateUser) -> None:
        user = names.validate_user(req.user, "user")
        host = names.validate_host(req.host, "host")
        pw = names.validate_password(req.password, "password") if req.password else ""
        new_user = names.validate_user(req.new_user, "new_user") if req.new_user else user
        new_host = names.validate_host(req.new_host, "new_host") if req.new_host else host
        if not pw and (new_user, new_host) == (user, host):
            raise InvalidArgument("nothing to change: give a password, new_user or new_host", field="password")
        with self.cursor() as cur:
            self._require_user(cur, user, host)
            renamed = (new_user, new_host) != (user, host)
            if renamed and self._user_exists(cur, new_user, new_host):
                raise AlreadyExists(f"user {new_user}@{new_host} already exists",
                                    field="new_user" if req.new_user else "new_host")
            if pw:
                cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", (user, host, pw))
            if renamed:
                cur.execute("RENAME USER %s@%s TO %s@%s", (user, host, new_user, new_host))

    def grant_access(self, user: str, host: str, databases: list[str]) -> None:
        names.validate_user(user, "user")
        host = names.validate_host(host, "host")
        if not databases:
            raise InvalidArgument("at least one database is required", field="databases")
        dbs = [names.validate_database(d, f"databases[{j}]") for j, d in enumerate(databases)]
        with self.cursor() as cur:
            self._require_user(cur, user, host)
            for j, d in enumerate(dbs):
                if not self._db_exists(cur, d):
                    raise NotFound(f"database {d!r} does not exist", field=f"databases[{j}]")
            for d in dbs:
                cur.execute("GRANT ALL PRIVILEGES ON " + names.quote_ident(_like_escape(d)) + ".* TO %s@%s",
                            (user, host))

    def revoke_access(self, user: str, host: str, database: str) -> None:
        names.validate_user(user, "user")
        host = names.validate_host(host, "host")
        db = names.validate_database(database, "database")
        with self.cursor() as cur:
            self._require_user(cur, user, host)
            if db not in self._user_databases(cur, user, host):
                raise NotFound(f"user {user}@{host} has no access to {db!r}", field="database")
            cur.execute("REVOKE ALL PRIVILEGES ON " + names.quote_ident(_like_escape(db)) + ".* FROM %s@%s",
                        (user, host))

    def list_users(self, page_size: int, page_token: str) -> agent_pb2.UserList:
        size = _page_size(page_size)
        after = _read_token(page_token, "page_token") if page_token else ["", ""]
        if not (isinstance(after, list) and len(after) == 2 and all(isinstance(x, str) for x in after)):
            raise InvalidArgument("page_token is not one this agent issued", field="page_token")
        with self.cursor() as cur:
            # Roles (PUBLIC and tenant-made) have an empty host; they are not users.
            cur.execute(
                "SELECT User, Host FROM mysql.global_priv WHERE User <> '' AND Host <> '' AND User NOT IN %s "
                "AND (User > %s OR (User = %s AND Host > %s)) ORDER BY User, Host LIMIT %s",
                (sorted(names.RESERVED_USERS), after[0], after[0], after[1], size + 1))
            rows = cur.fetchall()
            users = [common_pb2.User(user=u, host=h, databases=self._user_databases(cur, u, h))
                     for u, h in rows[:size]]
        out = agent_pb2.UserList(users=users)
        if len(rows) > size:
            out.next_page_token = _page_token([rows[size - 1][0], rows[size - 1][1]])
        return out

    # root ----------------------------------------------------------------

    def enable_root(self) -> str:
        """Gives root@'%' a fresh random password (returned once, never stored) and all privileges."""
        password = secrets.token_urlsafe(24)
        with self.cursor() as cur:
            cur.execute("CREATE USER IF NOT EXISTS %s@%s IDENTIFIED BY %s", ("root", "%", password))
            cur.execute("ALTER USER %s@%s IDENTIFIED BY %s", ("root", "%", password))
            cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", ("root", "%"))
        return password

    def remove_remote_root(self) -> None:
        """Drops the root@127.0.0.1/::1/<hostname> accounts install-db makes: more specific than root@'%',
        they would shadow an enabled root, and nobody should reach root but through the root API."""
        with self.cursor() as cur:
            cur.execute("SELECT Host FROM mysql.global_priv WHERE User = %s AND Host NOT IN (%s, %s)",
                        ("root", "localhost", "%"))
            for (host,) in cur.fetchall():
                cur.execute("DROP USER %s@%s", ("root", host))
            cur.execute("DROP USER IF EXISTS %s@%s", ("", "localhost"))

    def disable_root(self) -> None:
        with self.cursor() as cur:
            cur.execute("DROP USER IF EXISTS %s@%s", ("root", "%"))

    def root_enabled_now(self) -> bool:
        with self.cursor() as cur:
            return self._user_exists(cur, "root", "%")

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


# ---------------------------------------------------------------- the driver

@dataclass(frozen=True)
class MysqlSettings:
    state_dir: str
    datadir: str
    port: int = 3306
    bind_address: str = "0.0.0.0"
    # The OS user mysqld runs as ("mysql" in a guest; root in host tests that own a temp datadir).
    run_as: str = "mysql"
    mysqld: str = ""
    install_db: str = ""


class MysqlDriver(DatastoreDriver):
    name = "mariadb"
    capabilities = ("mariadb", "mysql", "memcached")

    def __init__(self, settings: MysqlSettings) -> None:
        self.settings = settings
        self._datadir = settings.datadir
        self._port = settings.port
        self._bind = settings.bind_address
        self._limits = common_pb2.Limits(memory_mb=512)
        self._mysqld: Supervisor | None = None
        self._extra: dict[str, services.Memcached] = {}
        self._preparing = False
        self._lock = asyncio.Lock()
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
        self.admin = MysqlAdmin(self._admin_connect)

    # paths ---------------------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.settings.state_dir, name)

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "mysqld.sock")

    @property
    def run_dir(self) -> str:
        """Where mysqld writes its socket, pid and error log: it runs as run_as and must not need to
        enter the agent's private (0700, root) state dir, which holds the internal admin's password."""
        if self.settings.run_as == "root":
            return self.settings.state_dir
        path = "/run/mysqld"
        os.makedirs(path, mode=0o755, exist_ok=True)
        shutil.chown(path, self.settings.run_as, self.settings.run_as)
        return path

    def _admin_password(self) -> str:
        with open(self._path("admin.json")) as f:
            return str(json.load(f)["password"])

    def _admin_connect(self) -> Any:
        return pymysql.connect(unix_socket=self.socket, user=names.ADMIN_USER, password=self._admin_password(),
                               autocommit=True, connect_timeout=5)

    def _write_private(self, name: str, data: dict[str, Any]) -> None:
        path = self._path(name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _read_private(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name)) as f:
                data = json.load(f)
                return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    # prepare -------------------------------------------------------------

    def my_cnf(self) -> MyCnf:
        pool, conns = size_for_limits(self._limits)
        return MyCnf(datadir=self._datadir, socket=self.socket, pid_file=os.path.join(self.run_dir, "mysqld.pid"),
                     log_error=os.path.join(self.run_dir, "mysqld.err"), port=self._port, bind_address=self._bind,
                     buffer_pool_mb=pool, max_connections=conns,
                     open_files_limit=int(self._limits.max_open_files) or 65535)

    def _write_my_cnf(self) -> str:
        path = self._path("my.cnf")
        with open(path, "w") as f:
            f.write(render_my_cnf(self.my_cnf()))
        return path

    def _binary(self, configured: str, *candidates: str) -> str:
        if configured:
            return configured
        for c in candidates:
            found = shutil.which(c) or (f"/usr/sbin/{c}" if os.path.exists(f"/usr/sbin/{c}") else None)
            if found:
                return found
        raise FailedPrecondition(f"{candidates[0]} is not installed", field="services")

    async def _init_datadir(self) -> bool:
        # A marker on the volume spans mariadb-install-db: if the agent died inside it, the half-made
        # datadir (which cannot hold user data yet) is cleared and made again.
        marker = os.path.join(self._datadir, INIT_MARKER)
        if os.path.exists(marker):
            log.warning("clearing a datadir whose initialisation was cut off", extra={"datadir": self._datadir})
            for name in os.listdir(self._datadir):
                path = os.path.join(self._datadir, name)
                if name in ("lost+found", INIT_MARKER):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        elif os.path.isdir(os.path.join(self._datadir, "mysql")):
            return False
        os.makedirs(self._datadir, exist_ok=True)
        if any(n not in ("lost+found", INIT_MARKER) for n in os.listdir(self._datadir)):
            raise FailedPrecondition(f"datadir {self._datadir} holds files but no MySQL data", field="datadir")
        with open(marker, "w"):
            pass
        if self.settings.run_as != "root":
            shutil.chown(self._datadir, self.settings.run_as, self.settings.run_as)
        install_db = self._binary(self.settings.install_db, "mariadb-install-db", "mysql_install_db")
        await runner.run_async([install_db, f"--defaults-file={self._path('my.cnf')}", f"--datadir={self._datadir}",
                                f"--user={self.settings.run_as}", "--auth-root-authentication-method=socket",
                                "--skip-test-db"], timeout=300)
        os.unlink(marker)
        return True

    def _supervisor(self) -> Supervisor:
        mysqld = self._binary(self.settings.mysqld, "mariadbd", "mysqld")
        return Supervisor("mysqld", [mysqld, f"--defaults-file={self._path('my.cnf')}",
                                     f"--user={self.settings.run_as}"], ready=self._accepting)

    async def _accepting(self) -> bool:
        def ping() -> bool:
            try:
                # The agent is root in the guest: root@localhost authenticates by unix_socket.
                pymysql.connect(unix_socket=self.socket, user="root", connect_timeout=1).close()
                return True
            except pymysql.err.MySQLError as exc:
                # "Access denied" still proves the server is up and accepting connections.
                return bool(exc.args) and exc.args[0] in (1045, 1698)
        return await asyncio.to_thread(ping)

    def _ensure_admin_sync(self) -> None:
        self._create_admin()
        self.admin.remove_remote_root()

    def _create_admin(self) -> None:
        """Creates os_admin@localhost with a random password kept 0600 in the state dir (idempotent)."""
        existing = self._read_private("admin.json")
        if existing:
            try:
                self._admin_connect().close()
                return
            except pymysql.err.MySQLError:
                pass
        password = existing["password"] if existing else secrets.token_urlsafe(32)
        conn = pymysql.connect(unix_socket=self.socket, user="root", autocommit=True, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("CREATE USER IF NOT EXISTS %s@'localhost' IDENTIFIED BY %s", (names.ADMIN_USER, password))
                cur.execute("ALTER USER %s@'localhost' IDENTIFIED BY %s", (names.ADMIN_USER, password))
                cur.execute("GRANT ALL PRIVILEGES ON *.* TO %s@'localhost' WITH GRANT OPTION", (names.ADMIN_USER,))
        finally:
            conn.close()
        self._write_private("admin.json", {"user": names.ADMIN_USER, "password": password})

    async def prepare(self, spec: agent_pb2.Prepare, progress: ProgressFn = no_progress) -> None:
        async with self._lock:
            self._preparing = True
            try:
                await self._prepare(spec, progress)
            finally:
                self._preparing = False

    async def _prepare(self, spec: agent_pb2.Prepare, progress: ProgressFn) -> None:
        if spec.limits.memory_mb < 0:
            raise InvalidArgument("memory_mb may not be negative", field="limits.memory_mb")
        known = {"mariadb", "mysql", "memcached"}
        for i, s in enumerate(spec.services):
            if s.service not in known:
                raise InvalidArgument(f"unknown service {s.service!r}", field=f"services[{i}].service")
            if not 0 <= s.port <= 65535:
                raise InvalidArgument("port must be 0..65535", field=f"services[{i}].port")
        # Validate tenant input before touching anything.
        for i, d in enumerate(spec.databases):
            names.validate_database(d.database, f"databases[{i}].database")
        for i, u in enumerate(spec.users):
            names.validate_user(u.user, f"users[{i}].user")
            names.validate_password(u.password, f"users[{i}].password")
        if spec.limits.memory_mb:
            self._limits = spec.limits
        if spec.datadir:
            self._datadir = spec.datadir
        if spec.bind_address:
            self._bind = spec.bind_address
        await progress(5, "installing packages")
        for i, s in enumerate(spec.services):
            await services.ensure_packages(list(s.packages), f"services[{i}].packages")
            if s.service in ("mariadb", "mysql") and s.port:
                self._port = s.port
        await progress(30, "writing my.cnf")
        self._write_my_cnf()
        await progress(40, "initialising the datadir")
        await self._init_datadir()
        await progress(60, "starting mysqld")
        await self.start()
        await asyncio.to_thread(self._ensure_admin_sync)
        await progress(80, "creating databases and users")
        # A replayed prepare (agent restarted mid-way) must converge, not fail on what it made already.
        if spec.databases:
            await asyncio.to_thread(self.admin.create_databases, list(spec.databases), True)
        if spec.users:
            await asyncio.to_thread(self.admin.create_users, list(spec.users), True)
        for s in spec.services:
            if s.service == "memcached":
                await self._start_memcached(s.port or 11211)
        # Remember the shape (never the users' passwords) so a restarted agent brings mysqld back.
        kept = agent_pb2.Prepare(services=spec.services, limits=self._limits, datadir=self._datadir,
                                 bind_address=self._bind)
        self._write_private("prepared.json", {"prepare": json_format.MessageToDict(kept), "port": self._port})
        await progress(100, "prepared")

    async def _start_memcached(self, port: int) -> None:
        if "memcached" not in self._extra:
            mem = max(16, int(self._limits.memory_mb) // 8)
            self._extra["memcached"] = services.Memcached(port, "127.0.0.1" if self._bind == "127.0.0.1"
                                                          else self._bind, mem, self.settings.run_as
                                                          if self.settings.run_as != "mysql" else "memcache")
        await self._extra["memcached"].start()

    async def resume(self) -> None:
        saved = self._read_private("prepared.json")
        if not saved:
            return
        spec = json_format.ParseDict(saved["prepare"], agent_pb2.Prepare())
        self._limits = spec.limits
        self._datadir = spec.datadir or self._datadir
        self._bind = spec.bind_address or self._bind
        self._port = int(saved.get("port", self._port))
        self._write_my_cnf()
        await self.start()
        for s in spec.services:
            if s.service == "memcached":
                await self._start_memcached(s.port or 11211)

    # lifecycle -----------------------------------------------------------

    def _require_prepared(self) -> None:
        if not os.path.exists(self._path("my.cnf")):
            raise FailedPrecondition("the datastore is not prepared yet", field="prepare")

    async def start(self) -> None:
        self._require_prepared()
        if self._mysqld is None:
            self._mysqld = self._supervisor()
        try:
            await self._mysqld.start(ready_timeout=120)
        except TimeoutError as exc:
            raise Unavailable(str(exc)) from None

    async def stop(self) -> None:
        if self._mysqld is not None:
            await self._mysqld.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def apply_limits(self, limits: common_pb2.Limits) -> None:
        if limits.memory_mb <= 0:
            raise InvalidArgument("memory_mb is required", field="limits.memory_mb")
        self._limits = limits
        self._require_prepared()
        self._write_my_cnf()
        pool, conns = size_for_limits(limits)

        def live() -> None:
            # Both are dynamic in MariaDB 10.11: a resize needs no restart.
            with self.admin.cursor() as cur:
                cur.execute("SET GLOBAL innodb_buffer_pool_size = %s", (pool * 1024 * 1024,))
                cur.execute("SET GLOBAL max_connections = %s", (conns,))
        await asyncio.to_thread(live)
        saved = self._read_private("prepared.json")
        if saved:
            saved["prepare"]["limits"] = json_format.MessageToDict(limits)
            self._write_private("prepared.json", saved)

    async def close(self) -> None:
        for svc in self._extra.values():
            await svc.stop()
        await self.stop()

    # tenant operations ---------------------------------------------------

    async def create_databases(self, databases: list[common_pb2.Database]) -> None:
        await asyncio.to_thread(self.admin.create_databases, databases)

    async def delete_database(self, database: str) -> None:
        await asyncio.to_thread(self.admin.delete_database, database)

    async def list_databases(self, page_size: int, page_token: str) -> agent_pb2.DatabaseList:
        return await asyncio.to_thread(self.admin.list_databases, page_size, page_token)

    async def create_users(self, users: list[common_pb2.User]) -> None:
        await asyncio.to_thread(self.admin.create_users, users)

    async def delete_user(self, user: str, host: str) -> None:
        await asyncio.to_thread(self.admin.delete_user, user, host)

    async def get_user(self, user: str, host: str) -> common_pb2.User:
        return await asyncio.to_thread(self.admin.get_user, user, host)

    async def update_user(self, req: agent_pb2.UpdateUser) -> None:
        await asyncio.to_thread(self.admin.update_user, req)

    async def grant_access(self, user: str, host: str, databases: list[str]) -> None:
        await asyncio.to_thread(self.admin.grant_access, user, host, databases)

    async def revoke_access(self, user: str, host: str, database: str) -> None:
        await asyncio.to_thread(self.admin.revoke_access, user, host, database)

    async def list_users(self, page_size: int, page_token: str) -> agent_pb2.UserList:
        return await asyncio.to_thread(self.admin.list_users, page_size, page_token)

    async def enable_root(self) -> database_pb2.RootCredentials:
        password = await asyncio.to_thread(self.admin.enable_root)
        # Trove's "rootEnabled" means "was ever enabled": remembered, unlike the password.
        self._write_private("root.json", {"ever_enabled": True})
        return database_pb2.RootCredentials(user="root", password=password)

    async def disable_root(self) -> None:
        await asyncio.to_thread(self.admin.disable_root)

    async def root_status(self) -> database_pb2.RootStatus:
        now = await asyncio.to_thread(self.admin.root_enabled_now)
        return database_pb2.RootStatus(enabled=now)

    # health --------------------------------------------------------------

    async def health(self) -> common_pb2.GuestHealth:
        h = common_pb2.GuestHealth()
        h.observed.GetCurrentTime()
        sup = self._mysqld
        if self._preparing:
            h.service_state = common_pb2.SERVICE_STATE_BUILDING
        elif sup is None:
            h.service_state = common_pb2.SERVICE_STATE_NEW
        else:
            h.service_state = sup.state
            h.restarts = sup.restarts
            h.last_error = sup.last_error
        if sup is not None and sup.state == common_pb2.SERVICE_STATE_RUNNING:
            try:
                st = await asyncio.to_thread(self.admin.status)
                h.accepting_connections = True
                h.uptime_seconds = st.get("Uptime", 0)
                h.connections = st.get("Connections", 0)
                h.threads_connected = st.get("Threads_connected", 0)
                h.queries = st.get("Queries", 0)
                h.slow_queries = st.get("Slow_queries", 0)
                page = st.get("Innodb_page_size", 16384)
                h.buffer_pool_bytes_total = st.get("Innodb_buffer_pool_pages_total", 0) * page
                h.buffer_pool_bytes_data = st.get("Innodb_buffer_pool_pages_data", 0) * page
            except (RedDwarfError, OSError) as exc:
                h.accepting_connections = False
                h.last_error = str(exc)[:300]
        if os.path.isdir(self._datadir):
            du = shutil.disk_usage(self._datadir)
            h.datadir_bytes_used = du.used
            h.datadir_bytes_total = du.total
        for name, svc in self._extra.items():
            h.services[name] = svc.supervisor.state
        return h

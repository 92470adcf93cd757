"""The state database: engine, sessions, Alembic migrations and the seeded catalog.

SQLite is the embedded default (WAL, foreign keys on, a busy timeout so the task workers and the API can
share it); MariaDB (pymysql), MariaDB Galera and PostgreSQL work by URL. The schema only ever changes through
server/migrations, under a lock so that several servers starting at once migrate exactly once.

Several servers on Galera: a MySQL URL may list several nodes (`mysql+pymysql://u:p@h1:3306,h2:3306/db`). Every
connection goes to the first node that answers and is ready, in the listed order, so servers given the same
list write through the same node (no certification conflicts between them in the steady state) and all move
to the next node when that one dies. What conflicts remain (after a failover, or between two lists) show up
as a deadlock error at commit: `run_transaction` re-runs a whole unit of work on it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.engine.interfaces import DBAPIConnection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry

from . import models

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)
T = TypeVar("T")

# Named limit sets. cpu_limit_millicores 0 = no cap (shares only); io_weight 10..1000 (honoured only under a
# weight-aware IO scheduler: BFQ on v1, io.weight on v2); io_iops / io_bytes_per_sec are hard caps on the
# instance's volume and on the disk under its root filesystem (0 = none), which hold everywhere.
# CPU weight is 1024 per GB of memory, except tiny: a burstable class (like RDS's micro instances) with a
# weight of 128, so under contention it is entitled to an eighth of what a 1 GB instance is, and bursts up to its
# cap (half a core) when the CPU is free. At 256 a tiny aggressor on a medium victim's core was entitled to
# 20% of it, the whole margin of the 85% noisy-neighbour target (issue 19; docs/BENCHMARKS.md, isolation).
FLAVORS = [
    {"id": "tiny", "display_name": "tiny: 256 MB", "memory_mb": 256, "cpu_shares": 128, "cpu_limit_millicores": 500,
         "max_processes": 512, "max_open_files": 4096, "io_weight": 100, "io_iops": 2000,
         "io_bytes_per_sec": 64 * 1024 * 1024, "default_volume_gb": 1},
    {"id": "small", "display_name": "small: 512 MB", "memory_mb": 512, "cpu_shares": 512, "cpu_limit_millicores": 1000,
         "max_processes": 1024, "max_open_files": 8192, "io_weight": 250, "io_iops": 4000,
         "io_bytes_per_sec": 128 * 1024 * 1024, "default_volume_gb": 2},
    {"id": "medium", "display_name": "medium: 1 GB", "memory_mb": 1024, "cpu_shares": 1024,
         "cpu_limit_millicores": 2000, "max_processes": 2048, "max_open_files": 16384, "io_weight": 500,
         "io_iops": 8000, "io_bytes_per_sec": 256 * 1024 * 1024, "default_volume_gb": 5},
    {"id": "large", "display_name": "large: 2 GB", "memory_mb": 2048, "cpu_shares": 2048, "cpu_limit_millicores": 0,
         "max_processes": 4096, "max_open_files": 32768, "io_weight": 1000, "default_volume_gb": 10},
]
# The first version of a datastore is its default. 11.8 runs in the Debian 13 template (catalog.VERSION_RELEASES).
DATASTORES = [("mariadb", "10.11", ["mariadb-server", "mariadb-backup"]),
              ("mariadb", "11.8", ["mariadb-server", "mariadb-backup"])]


def split_hosts(url: str) -> tuple[str, list[tuple[str, int | None]]]:
    """A URL naming several `host:port`s, as the URL of its first host plus every host in order."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    auth, at, hostpart = netloc.rpartition("@")
    hosts: list[tuple[str, int | None]] = []
    for item in hostpart.split(","):
        host, colon, port = item.partition(":")
        hosts.append((host, int(port) if colon else None))
    return f"{scheme}{sep}{auth}{at}{hostpart.split(',')[0]}{slash}{tail}", hosts


def _galera_ready(conn: Any) -> bool:
    """False on a Galera node that is out of the primary component (it refuses queries with 1047);
    True on any other MySQL server."""
    cur = conn.cursor()
    try:
        # A MariaDB without Galera has wsrep_ready OFF too: only a node with wsrep on is asked.
        cur.execute("SHOW VARIABLES LIKE 'wsrep_on'")
        on = cur.fetchone()
        if on is None or str(on[1]).upper() != "ON":
            return True
        cur.execute("SHOW STATUS LIKE 'wsrep_ready'")
        row = cur.fetchone()
    finally:
        cur.close()
    return row is not None and str(row[1]).upper() == "ON"


def _failover(engine: Engine, hosts: list[tuple[str, int | None]], connect_timeout: int) -> None:
    @event.listens_for(engine, "do_connect")
    def _connect_first_ready(dialect: Dialect, _rec: ConnectionPoolEntry, cargs: Any, cparams: Any) -> Any:
        failures: list[str] = []
        for host, port in hosts:
            params = dict(cparams, host=host, connect_timeout=cparams.get("connect_timeout", connect_timeout))
            if port is not None:
                params["port"] = port
            try:
                conn = dialect.loaded_dbapi.connect(*cargs, **params)
            except dialect.loaded_dbapi.Error as exc:
                failures.append(f"{host}:{port}: {exc}")
                continue
            try:
                if _galera_ready(conn):
                    return conn
                failures.append(f"{host}:{port}: not in the primary component")
            except dialect.loaded_dbapi.Error as exc:
                failures.append(f"{host}:{port}: {exc}")
            conn.close()
        log.warning("no database node answered: %s", "; ".join(failures))
        raise dialect.loaded_dbapi.OperationalError(2003, "no database node answered: " + "; ".join(failures))


def make_engine(url: str, *, connect_timeout: int = 3) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: DBAPIConnection, _record: object) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed: nothing lingers in the file
            cur.close()

        return engine
    first, hosts = split_hosts(url)
    if url.startswith("mysql") and len(hosts) > 1:
        engine = create_engine(first, pool_pre_ping=True, pool_recycle=3600)
        _failover(engine, hosts, connect_timeout)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_recycle=3600)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


# Errors after which the transaction is known to be rolled back, so running it again is safe: a deadlock or
# a Galera certification failure (1213), a lock wait timeout (1205), a Galera node refusing work while it
# leaves or rejoins the primary component (1047); PostgreSQL's serialization failure and deadlock.
_RETRY_MYSQL = {1213, 1205, 1047}
_RETRY_PG = {"40001", "40P01"}


def is_retryable(exc: BaseException) -> bool:
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _RETRY_MYSQL:
        return True
    return getattr(orig, "sqlstate", None) in _RETRY_PG or getattr(orig, "pgcode", None) in _RETRY_PG


def run_transaction(sessions: sessionmaker[Session], work: Callable[[Session], T], *, attempts: int = 8) -> T:
    """Runs `work` in a transaction of its own, and runs it again from the start (in a fresh session) when
    the database rolled it back for a conflict. `work` must be the whole unit of work: nothing it did
    outside the session survives a retry, so it must not have side effects beyond the session."""
    for attempt in range(1, attempts + 1):
        try:
            with sessions() as s, s.begin():
                return work(s)
        except DBAPIError as exc:
            if attempt == attempts or not is_retryable(exc):
                raise
            log.info("transaction rolled back for a conflict; retrying", extra={"attempt": attempt})
            # Jittered backoff: two writers that collided should not collide again in lockstep.
            time.sleep(random.uniform(0, min(0.5, 0.01 * 2 ** attempt)))
    raise AssertionError("unreachable")


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session, session.begin():
        yield session


def update_row(sessions: sessionmaker[Session], model: type[models.Base], key: str, **values: Any) -> None:
    """Sets columns of one row in a transaction of its own; a row deleted meanwhile is left alone."""
    def work(s: Session) -> None:
        row = s.get(model, key)
        if row is not None:
            for column, value in values.items():
                setattr(row, column, value)
    run_transaction(sessions, work)


# ---------------------------------------------------------------------------- the schema lock
# Held while migrating (and seeding), so that servers starting at once migrate exactly once. MySQL's GET_LOCK
# is not replicated by Galera, and row locks are only local to a Galera node, so MySQL uses a lock row: an
# INSERT of one primary key, which Galera certifies cluster-wide (one node wins; the others see a duplicate
# key or a deadlock) and which expires, so a server that died holding it does not block the others forever.
PG_LOCK_KEY = 0x52656444776172  # "RedDwar"
LOCK_TABLE = "reddwarf_schema_lock"
LOCK_LEASE_SECONDS = 600


@contextmanager
def _file_lock(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the flock


@contextmanager
def _pg_lock(engine: Engine) -> Iterator[None]:
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_LOCK_KEY})
            conn.commit()


@contextmanager
def _row_lock(engine: Engine, timeout: float) -> Iterator[None]:
    owner = f"{socket.gethostname()[:20]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE IF NOT EXISTS {LOCK_TABLE} (id INT NOT NULL PRIMARY KEY, "
                          "owner VARCHAR(64) NOT NULL, expires_at DATETIME NOT NULL)"))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with engine.begin() as conn:
                conn.execute(text(f"DELETE FROM {LOCK_TABLE} WHERE id = 1 AND expires_at < UTC_TIMESTAMP()"))
            with engine.begin() as conn:
                conn.execute(text(f"INSERT INTO {LOCK_TABLE} (id, owner, expires_at) VALUES "
                                  "(1, :owner, UTC_TIMESTAMP() + INTERVAL :lease SECOND)"),
                             {"owner": owner, "lease": LOCK_LEASE_SECONDS})
            break
        except DBAPIError as exc:
            taken = getattr(exc.orig, "args", (None,))[0] == 1062
            if not (taken or is_retryable(exc)):
                raise  # e.g. the database cannot be reached: fail now rather than wait out the timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"the schema lock ({LOCK_TABLE}) was not free within {timeout:.0f}s") from exc
            time.sleep(random.uniform(0.1, 0.4))
    log.info("schema lock taken", extra={"owner": owner})
    try:
        yield
    finally:
        def release() -> None:
            with engine.begin() as conn:
                conn.execute(text(f"DELETE FROM {LOCK_TABLE} WHERE id = 1 AND owner = :owner"), {"owner": owner})
        for attempt in range(5):
            try:
                release()
                break
            except DBAPIError as exc:
                if attempt == 4 or not is_retryable(exc):
                    raise
                time.sleep(0.1)


@contextmanager
def schema_lock(url: str, timeout: float = 600) -> Iterator[None]:
    """Exclusive across every server sharing this database, for as long as the block runs."""
    parsed: URL = make_url(split_hosts(url)[0])
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        path = parsed.database
        if not path or path == ":memory:":
            yield
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with _file_lock(os.path.abspath(path) + ".schema-lock"):
            yield
        return
    engine = make_engine(url)
    try:
        if backend == "postgresql":
            with _pg_lock(engine):
                yield
        elif backend in ("mysql", "mariadb"):
            with _row_lock(engine, timeout):
                yield
        else:
            yield
    finally:
        engine.dispose()


def alembic_config(url: str) -> Config:
    from alembic.config import Config  # imported when needed: Alembic alone costs ~0.7 s of every start

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrates to `revision` once, however many servers call this at the same time: each waits for the
    schema lock, and Alembic then finds the schema already at `revision` for all but the first."""
    if revision == "head" and _current_revision(url) == script_head():
        return  # the usual start: nothing to migrate, so neither the lock nor Alembic is needed
    from alembic import command

    with schema_lock(url):
        command.upgrade(alembic_config(url), revision)


_REVISION = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+)$", re.M)


def script_head() -> str | None:
    """The one head of the migration scripts, read from their files (as Alembic's ScriptDirectory would,
    without importing it); None when there is not exactly one."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        for key, value in _REVISION.findall(path.read_text()):
            names = set(re.findall(r"['\"]([^'\"]+)['\"]", value))
            (revisions if key == "revision" else parents).update(names)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _current_revision(url: str) -> str | None:
    """The revision the database is at, or None (no database yet, no version table, or several heads)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DBAPIError:
        return None
    finally:
        engine.dispose()
    return rows[0] if len(rows) == 1 else None


def seed(session: Session) -> None:
    """The catalog every deployment starts with; idempotent (existing rows are left as operators set them)."""
    for f in FLAVORS:
        if session.get(models.Flavor, f["id"]) is None:
            session.add(models.Flavor(**f))
    for name, version, packages in DATASTORES:
        if session.get(models.Datastore, name) is None:
            session.add(models.Datastore(id=name, default_version=version))
            session.flush()
        exists = session.scalar(select(models.DatastoreVersion).where(
            models.DatastoreVersion.datastore_id == name, models.DatastoreVersion.version == version))
        if exists is None:
            session.add(models.DatastoreVersion(datastore_id=name, version=version, packages=packages))

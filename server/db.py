"""The state database: engine, sessions, Alembic migrations and the seeded catalog.

SQLite is the embedded default (WAL, foreign keys on, a busy timeout so the task workers and the API can
share it); MariaDB (pymysql) and PostgreSQL work by URL. The schema only ever changes through
server/migrations.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Engine
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker

from . import models

MIGRATIONS = Path(__file__).parent / "migrations"

# Named limit sets. cpu_limit_millicores 0 = no cap (shares only); io_weight 10..1000 (honoured only under a
# weight-aware IO scheduler: BFQ on v1, io.weight on v2); io_iops / io_bytes_per_sec are hard caps on the
# instance's volume and on the disk under its root filesystem (0 = none), which hold everywhere.
FLAVORS = [
    {"id": "tiny", "display_name": "tiny: 256 MB", "memory_mb": 256, "cpu_shares": 256, "cpu_limit_millicores": 500,
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
DATASTORES = [("mariadb", "10.11", ["mariadb-server", "mariadb-backup"])]


def make_engine(url: str) -> Engine:
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
    return create_engine(url, pool_pre_ping=True, pool_recycle=3600)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    with sessions() as session, session.begin():
        yield session


def update_row(sessions: sessionmaker[Session], model: type[models.Base], key: str, **values: Any) -> None:
    """Sets columns of one row in a transaction of its own; a row deleted meanwhile is left alone."""
    with transaction(sessions) as s:
        row = s.get(model, key)
        if row is not None:
            for column, value in values.items():
                setattr(row, column, value)


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(url), revision)


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

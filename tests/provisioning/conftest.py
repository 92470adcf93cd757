"""Fixtures for the provisioning tests: a fresh state DB on SQLite or on the real MariaDB fixture."""
from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.server.models import Base


@pytest.fixture(params=["sqlite", "mariadb"])
def state_db(request: pytest.FixtureRequest, tmp_path) -> Iterator[sessionmaker[Session]]:
    """A session factory on an empty state DB with every table (SQLite file, or a MariaDB database)."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path}/state.db")
        dbname = None
    else:
        mariadb = request.getfixturevalue("mariadb")
        dbname = f"rd_tasks_{uuid.uuid4().hex[:10]}"
        with mariadb.connect() as conn, conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{dbname}`")  # generated name, not user input
        engine = create_engine(mariadb.url(dbname), pool_size=10)
    Base.metadata.create_all(engine)
    try:
        yield sessionmaker(bind=engine, expire_on_commit=False)
    finally:
        engine.dispose()
        if dbname is not None:
            with mariadb.connect() as conn, conn.cursor() as cur:
                cur.execute(f"DROP DATABASE `{dbname}`")

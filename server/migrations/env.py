"""Alembic environment: configured programmatically by reddwarf.server.db.alembic_config (no alembic.ini)."""
from __future__ import annotations

from typing import Any

from alembic import context

from reddwarf.server import models
from reddwarf.server.db import LOCK_TABLE, make_engine

config = context.config
target_metadata = models.Base.metadata


def include_name(name: str | None, type_: str, _parents: Any) -> bool:
    # The schema lock's table is made by db.schema_lock outside the migrations; autogenerate leaves it be.
    return not (type_ == "table" and name == LOCK_TABLE)


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    assert url
    engine = make_engine(url)
    with engine.connect() as connection:
        # render_as_batch: SQLite cannot ALTER most things; batch mode rebuilds tables for it.
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                          include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

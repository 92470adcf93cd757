"""Shared fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.mariadb import MariaDB, mariadb_server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """One real MariaDB server for the whole session (tests make their own databases in it)."""
    with mariadb_server() as server:
        yield server

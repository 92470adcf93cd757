"""Shared fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.fixtures import leaks
from tests.fixtures.mariadb import MariaDB, mariadb_server
from tests.fixtures.pki import TestPki, make_test_pki


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """One real MariaDB server for the whole session (tests make their own databases in it)."""
    with mariadb_server() as server:
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A real CA for the session: `pki.files(role, id)`, `pki.foreign_files(...)`, `pki.expired_files(...)`."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session", autouse=True)
def nothing_leaks() -> Iterator[None]:
    """With REDDWARF_LEAK_CHECK=1 (set by `make test`): after the whole suite, no container, loop device,
    mount, cgroup or process of ours that was not there before may remain."""
    if os.environ.get("REDDWARF_LEAK_CHECK") != "1":
        yield
        return
    before = leaks.snapshot()
    yield
    deadline = time.monotonic() + 15  # processes being reaped, lazy unmounts
    while True:
        left = leaks.leaked(before, leaks.snapshot())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if left:
        text = "; ".join(f"{k}: {sorted(v)}" for k, v in left.items())
        pytest.fail(f"the test suite left these behind (a leak is a bug): {text}", pytrace=False)

"""Shared fixtures. Area-specific fixtures live in tests/<area>/conftest.py."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from tests.fixtures import leaks
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.mariadb import MariaDB, mariadb_server
from tests.fixtures.pki import TestPki, make_test_pki
from tests.fixtures.server import RunningServer, start_server


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """One real MariaDB server for the whole session (tests make their own databases in it)."""
    with mariadb_server() as server:
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    """A real CA for the session: `pki.files(role, id)`, `pki.foreign_files(...)`, `pki.expired_files(...)`."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A real server process with default settings, one per test module (a module that needs other
    settings defines its own `server`)."""
    with start_server(tmp_path_factory.mktemp("srv")) as s:
        yield s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A whole real cluster (server, hostd with LXC and loop volumes, a tenant), one per test module: needs
    root. tests/functional overrides it with the fake drivers."""
    with start_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


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

"""The fake-driver cluster the maintenance and patching tests share (one per module), and a session factory
on its state DB for driving the maintenance scheduler from the test."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from reddwarf.server import db
from tests.fixtures.cluster import Cluster, start_cluster

# The tests run the scheduler's passes themselves, from outside the server process, as another server would:
# the server's own loop is off, and its cached instance views would show their changes only after
# instance_cache_seconds, so the cache is off too.
MAINTENANCE_ENV = {"REDDWARF_MAINTENANCE_CHECK_SECONDS": "0", "REDDWARF_INSTANCE_CACHE_SECONDS": "0"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with start_cluster(tmp_path_factory.mktemp("day2"), server_env=MAINTENANCE_ENV, driver="fake") as c:
        yield c


@pytest.fixture(scope="module")
def sessions(cluster: Cluster):  # type: ignore[no-untyped-def]
    from reddwarf.server import upgrade  # noqa: F401 - registers the upgrade and patch handlers, as the server does
    engine = db.make_engine(cluster.server.db_url)
    try:
        yield db.session_factory(engine)
    finally:
        engine.dispose()

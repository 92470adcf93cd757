"""Functional tests (nova's tests/functional): the real server and a real hostd running the fake container
and volume drivers (reddwarf.hostd.fake), so guest agents are plain processes with the fake datastore.
No root, LXC or MariaDB; a whole flow takes seconds, so these run in `make test-fast`."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fixtures.cluster import Cluster, start_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One fake cluster per test module (started in about 3 s)."""
    with start_cluster(tmp_path_factory.mktemp("functional"), driver="fake") as c:
        yield c

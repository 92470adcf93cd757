"""One Galera node killed (kill -9) under two servers whose state DB is the three-node cluster: the service
continues — API reads and writes through the SDK (both endpoints) keep working, and what was written before
the kill is still there."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reddwarf.client import Client, ClientConfig
from tests.fixtures.galera import Galera, available, galera_cluster
from tests.ha.servers import Pair, servers_on

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not available(), reason="galera-4 / mariabackup not installed")]


@pytest.fixture(scope="module")
def galera() -> Iterator[Galera]:
    with galera_cluster() as cluster:
        yield cluster


def client(pair: Pair) -> Client:
    f = pair.first.client_files
    return Client(ClientConfig(endpoint=pair.endpoint, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                               token=pair.token, timeout=30))


def test_one_galera_node_killed_the_api_keeps_reading_and_writing(galera: Galera, tmp_path: Path) -> None:
    name = f"ha_{uuid.uuid4().hex[:6]}"
    galera.create_database(name)
    # Both servers write through node0 first (the multi-host URL's order), the worst node to lose.
    with servers_on(tmp_path, galera.url(name)) as pair, client(pair) as rd:
        before = rd.create_instance("galera-before", "tiny", 1)
        galera.nodes[0].kill()
        made = [rd.create_instance(f"galera-after-{i}", "tiny", 1).id for i in range(4)]
        # A create retried with its request id after the loss still makes one.
        rid = str(uuid.uuid4())
        again = {rd.create_instance("galera-retried", "tiny", 1, request_id=rid).id for _ in range(2)}
        assert len(again) == 1
        listed = {i.id: i.display_name for i in rd.list_instances()}
        assert before.id in listed and set(made) <= set(listed) and again <= set(listed)
        assert sum(1 for n in listed.values() if n == "galera-retried") == 1
        assert rd.get_instance(made[0]).id == made[0]
        assert rd.list_flavors()
        assert galera.nodes[1].status("wsrep_cluster_size") == "2"

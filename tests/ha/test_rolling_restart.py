"""Every server restarted in turn while clients call the API through the SDK with both endpoints: zero client
calls fail (reads and creates with request ids are retried by the channel on another server), and the creates
made one instance each. Bounded: two restarts, a few seconds of traffic around each."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reddwarf.client import Client, ClientConfig
from tests.ha.servers import Pair, two_servers


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with two_servers(tmp_path_factory.mktemp("rolling")) as p:
        yield p


def client(pair: Pair) -> Client:
    f = pair.first.client_files
    return Client(ClientConfig(endpoint=pair.endpoint, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                               token=pair.token, timeout=30))


def test_every_server_restarted_in_turn_fails_no_client_call(pair: Pair, tmp_path: Path) -> None:
    stop = threading.Event()
    calls: list[str] = []
    failures: list[str] = []
    created: list[str] = []

    def work(n: int) -> None:
        with client(pair) as rd:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if n == 0 and i % 10 == 0 and len(created) < 4:
                        created.append(rd.create_instance(f"roll-{len(created)}", "tiny", 1).id)
                    elif i % 2:
                        rd.list_flavors()
                    else:
                        list(rd.list_instances())
                    calls.append("ok")
                except Exception as exc:  # noqa: BLE001 - every failure is the test's finding
                    failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.02)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for w in workers:
        w.start()
    try:
        time.sleep(2)
        for i in range(len(pair.apis)):
            pair.stop(i)   # SIGTERM: the server drains and exits
            time.sleep(1)  # traffic with one server down
            pair.start(i)
            time.sleep(2)  # and with both up again, before the next one goes
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    assert not failures, failures[:5]
    assert len(calls) > 50
    with client(pair) as rd:
        mine = [i for i in rd.list_instances() if i.display_name.startswith("roll-")]
    assert sorted(i.id for i in mine) == sorted(created)  # one instance per create, none twice

"""The maintenance window through the Trove gateway, as our documented extension (Trove has none): set on
create and with a PATCH of the instance alone, shown with the pending actions, refused naming the field with
nothing changed, and the `apply_pending_maintenance` action."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.day2.conftest import MAINTENANCE_ENV
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    env = dict(MAINTENANCE_ENV)
    with start_cluster(tmp_path_factory.mktemp("day2gw"), server_env=env, driver="fake") as c, \
            start_gateway(c.server.api, c.server.gateway_files) as base:
        yield c, f"{base}/v1.0/{c.tenant}"


def call(c: Cluster, method: str, url: str, body: Any = None) -> httpx.Response:
    return httpx.request(method, url, json=body, headers={"X-Auth-Token": c.token}, timeout=30)


def test_window_through_the_gateway(gw: tuple[Cluster, str]) -> None:
    c, url = gw
    r = call(c, "POST", f"{url}/instances", {"instance": {
        "name": "gw-mw", "flavorRef": "tiny", "volume": {"size": 1},
        "maintenance_window": {"weekday": 2, "start_time": "04:30", "duration_minutes": 90}}})
    assert r.status_code == 200, r.text
    iid = r.json()["instance"]["id"]
    inst = until(lambda: call(c, "GET", f"{url}/instances/{iid}").json()["instance"],
                 lambda i: i["status"] == "ACTIVE", 60, "ACTIVE")
    assert inst["maintenance_window"] == {"weekday": 2, "start_time": "04:30", "duration_minutes": 90}
    assert inst["pending_maintenance"] == [] and inst["agent_version"]

    for body, field in [({"weekday": 9, "start_time": "04:30"}, "weekday"),
                        ({"weekday": 2, "start_time": "4:30pm"}, "start_time"),
                        ({"weekday": "tue", "start_time": "04:30"}, "weekday")]:
        r = call(c, "PATCH", f"{url}/instances/{iid}", {"instance": {"maintenance_window": body}})
        assert r.status_code == 400 and f"maintenance_window.{field}" in r.text, r.text
    r = call(c, "PATCH", f"{url}/instances/{iid}", {"instance": {"maintenance_window": {
        "weekday": 5, "start_time": "22:00"}, "name": "x"}})
    assert r.status_code == 400 and "on its own" in r.text
    got = call(c, "GET", f"{url}/instances/{iid}").json()["instance"]
    assert got["maintenance_window"]["weekday"] == 2 and got["name"] == "gw-mw"

    r = call(c, "PATCH", f"{url}/instances/{iid}", {"instance": {"maintenance_window": {
        "weekday": 5, "start_time": "22:00"}}})
    assert r.status_code == 202, r.text
    got = call(c, "GET", f"{url}/instances/{iid}").json()["instance"]
    assert got["maintenance_window"] == {"weekday": 5, "start_time": "22:00", "duration_minutes": 60}

    # Nothing pending: the action is refused (FAILED_PRECONDITION's 422) naming the field.
    r = call(c, "POST", f"{url}/instances/{iid}/action", {"apply_pending_maintenance": {}})
    assert r.status_code == 422 and "no pending maintenance (field: name)" in r.text, r.text
    r = call(c, "POST", f"{url}/instances/{iid}/action", {"apply_pending_maintenance": {"kinds": "restart"}})
    assert r.status_code == 400 and "kinds" in r.text, r.text

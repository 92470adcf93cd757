"""The Trove JSON of an instance's extra services (our extension of Trove's create body and instance view):
"services" parsed from strings or {"name": ...} objects, refused with the member named when malformed, and
rendered with the endpoint and the state the guest reports; Trove's addresses/ip/port stay MySQL's."""
from __future__ import annotations

import pytest
from starlette.requests import Request

from reddwarf.client import trove, trove_configurations
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import database_pb2 as pb

BASE = {"name": "x", "flavorRef": "tiny", "volume": {"size": 1}}


def request() -> Request:
    return Request({"type": "http", "method": "GET", "path": "/v1.0/demo/instances", "headers": [],
                    "query_string": b"", "server": ("gw", 80), "scheme": "http", "root_path": "",
                    "path_params": {"tenant": "demo"}})


def test_services_in_a_create_body_as_names_or_objects() -> None:
    assert trove.create_request({**BASE, "services": ["memcached"]}).services == ("memcached",)
    assert trove.create_request({**BASE, "services": [{"name": "memcached"}]}).services == ("memcached",)
    assert trove.create_request(BASE).services == ()


@pytest.mark.parametrize("services,where", [("memcached", "instance.services"), ([3], "instance.services[0]"),
                                           (["memcached", {"nom": "x"}], "instance.services[1]"),
                                           ([""], "instance.services[0]")])
def test_a_malformed_services_member_is_refused_naming_it(services, where) -> None:
    with pytest.raises(trove.BadInput) as e:
        trove.create_request({**BASE, "services": services})
    assert where in e.value.message


def test_a_non_object_body_is_bad_input_not_a_crash() -> None:
    for body in ([None, None], "x", 3):
        with pytest.raises(trove.BadInput):
            trove.create_request(body)
        with pytest.raises(trove.BadInput):
            trove.backup_request(body)
        with pytest.raises(trove.BadInput):  # found by schemathesis once the document declared the body
            trove_configurations.create_request(body)


def test_the_instance_view_shows_the_service_with_its_endpoint_and_state() -> None:
    inst = pb.Instance(id="i1", display_name="x", status=pb.INSTANCE_STATUS_ACTIVE, flavor="flavors/tiny",
                       services=["memcached"],
                       endpoints=[pb.Endpoint(host="10.0.3.5", port=3306, service="mysql"),
                                  pb.Endpoint(host="10.0.3.5", port=11211, service="memcached")],
                       health=cpb.GuestHealth(service_state=cpb.SERVICE_STATE_RUNNING, accepting_connections=True,
                                              services={"memcached": cpb.SERVICE_STATE_CRASHED}))
    out = trove.instance(inst, request())
    assert out["services"] == [{"name": "memcached", "address": "10.0.3.5", "port": 11211, "status": "CRASHED"}]
    assert out["addresses"] == [{"address": "10.0.3.5", "type": "private", "port": 3306}]
    assert out["ip"] == ["10.0.3.5"] and out["port"] == 3306
    # Before the guest has reported it: no state yet.
    inst.health.services.clear()
    assert trove.instance(inst, request())["services"][0]["status"] == ""

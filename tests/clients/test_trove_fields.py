"""The Trove JSON carries what python-troveclient and its openstack CLI plugin read: a backup's datastore
with version_id (`backup show/create` failed with 'version_id'), an instance's operating_status and
addresses (empty columns in `instance list`), and datastore version ids. The real gateway process in front
of the in-process fake API, read through unmodified troveclient and the osc plugin's own formatting."""
from __future__ import annotations

import uuid

import pytest

from reddwarf.common.pki import TlsFiles
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import database_pb2 as pb
from tests.fixtures.gateway import start_gateway

from .fake_api import TOKEN


@pytest.fixture
def trove(api, client_pki):
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    endpoint, state = api
    files = TlsFiles(cert=client_pki.client_cert, key=client_pki.client_key, ca=client_pki.ca)
    with start_gateway(endpoint, files) as base:
        yield client.Client(session=session.Session(auth=token_endpoint.Token(f"{base}/v1.0/demo", TOKEN))), state


def add_instance(state, name: str, health: cpb.GuestHealth | None = None,
                 status: int = pb.INSTANCE_STATUS_ACTIVE) -> pb.Instance:
    ident = str(uuid.uuid4())
    inst = pb.Instance(name=f"instances/{ident}", id=ident, display_name=name, status=status,
                       flavor="flavors/small", volume=pb.Volume(size_gb=1), datastore="mariadb",
                       datastore_version="10.11", endpoints=[pb.Endpoint(host="10.0.3.17", port=3306)],
                       health=health)
    state.instances[ident] = inst
    return inst


def test_backup_show_has_the_datastore_version_id(trove):
    from troveclient.osc.v1 import database_backups
    t, state = trove
    inst = add_instance(state, "db")
    ident = str(uuid.uuid4())
    state.backups[ident] = pb.Backup(name=f"backups/{ident}", id=ident, display_name="b1", instance=inst.name,
                                     status=pb.BACKUP_STATUS_COMPLETED, datastore="mariadb",
                                     datastore_version="10.11")
    b = t.backups.get(ident)
    info = database_backups.set_attributes_for_print_detail(b)  # what `backup show` and `create` print
    assert info["datastore"] == "mariadb" and info["datastore_version"] == "10.11"
    assert info["datastore_version_id"] == "10.11"
    # The id is one the datastore listing knows.
    ds = t.datastores.list()[0]
    assert info["datastore_version_id"] in {v["id"] for v in ds.versions}


def test_instance_list_has_operating_status_addresses_and_version_ids(trove):
    from troveclient.osc.v1 import database_instances
    t, state = trove
    up = add_instance(state, "up", cpb.GuestHealth(service_state=cpb.SERVICE_STATE_RUNNING, accepting_connections=True))
    starting = add_instance(state, "starting", cpb.GuestHealth(service_state=cpb.SERVICE_STATE_RUNNING))
    down = add_instance(state, "down", cpb.GuestHealth(service_state=cpb.SERVICE_STATE_CRASHED))
    building = add_instance(state, "building", status=pb.INSTANCE_STATUS_BUILD)
    failed = add_instance(state, "failed", status=pb.INSTANCE_STATUS_ERROR)
    stopped = add_instance(state, "stopped", cpb.GuestHealth(service_state=cpb.SERVICE_STATE_RUNNING),
                           status=pb.INSTANCE_STATUS_SHUTDOWN)
    rows = {i["id"]: i for i in database_instances.get_instances_info(t.instances.list())}
    assert {k: rows[i.id]["operating_status"] for k, i in [
        ("up", up), ("starting", starting), ("down", down), ("building", building), ("failed", failed),
        ("stopped", stopped)]} == {"up": "HEALTHY", "starting": "ACTIVE", "down": "SHUTDOWN", "building": "BUILD",
                                   "failed": "ERROR", "stopped": "SHUTDOWN"}
    assert rows[up.id]["addresses"] == [{"address": "10.0.3.17", "type": "private", "port": 3306}]
    assert rows[up.id]["datastore"] == "mariadb" and rows[up.id]["datastore_version"] == "10.11"
    shown = database_instances.set_attributes_for_print_detail(t.instances.get(up.id))
    assert shown["operating_status"] == "HEALTHY" and shown["ip"] == "10.0.3.17"
    assert t.instances.get(up.id).datastore["version_id"] == "10.11"

"""python-troveclient's `instances.upgrade` (PATCH {"instance": {"datastore_version": ...}}) through the REST
gateway, on the fake drivers (the flow, not MariaDB: tests/upgrade/test_upgrade_e2e.py runs the real one)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from reddwarf.v1 import admin_pb2
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Any]]:
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    with start_cluster(tmp_path_factory.mktemp("upg-trove"), driver="fake") as c, \
            start_gateway(c.server.api, c.server.gateway_files) as base:
        url = f"{base}/v1.0/{c.tenant}"
        yield c, client.Client(session=session.Session(auth=token_endpoint.Token(url, c.token)))


def bad_request(fn: Any) -> str:
    from troveclient import exceptions
    with pytest.raises(exceptions.BadRequest) as e:
        fn()
    return str(e.value)


def test_troveclient_patch_datastore_version_starts_an_upgrade_and_bad_requests_are_400(env: tuple[Cluster, Any]) -> None:
    _, trove = env
    inst = trove.instances.create("upg", "medium", volume={"size": 1}, datastore="mariadb",
                                  datastore_version="10.11")
    until(lambda: trove.instances.get(inst.id), lambda i: i.status == "ACTIVE", 60)
    assert "datastore_version" in bad_request(lambda: trove.instances.upgrade(inst, "12.9"))
    assert "datastore_version" in bad_request(lambda: trove.instances.upgrade(inst, "10.11"))
    # An upgrade goes alone, as in Trove.
    resp, _ = trove.instances.api.client.patch(
        f"/instances/{inst.id}", body={"instance": {"datastore_version": "11.8", "name": "x"}}, raise_exc=False)
    assert resp.status_code == 400 and "datastore_version" in resp.text
    assert trove.instances.get(inst.id).datastore["version"] == "10.11"
    trove.instances.upgrade(inst, "11.8")  # accepted (202)
    # The fake guest takes no backups, so the upgrade stops at its first step with nothing changed: back to
    # ACTIVE on 10.11, the task's fault saying why (the real upgrade: tests/upgrade/test_upgrade_e2e.py).
    c, _ = env
    task = until(lambda: c.admin.ListTasks(admin_pb2.ListTasksRequest(resource=f"instances/{inst.id}")).tasks[0],
                 lambda t: t.kind == "upgrade_instance" and t.state == admin_pb2.TASK_STATE_FAILED, 60)
    assert "backups are not available" in task.fault.message and task.current_step == "backup"
    back = until(lambda: trove.instances.get(inst.id), lambda i: i.status == "ACTIVE", 60)
    assert back.datastore["version"] == "10.11"
    trove.instances.delete(inst)

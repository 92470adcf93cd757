"""The whole tenant flow through unmodified python-troveclient → the REST gateway → the real system:
create with a database and a user → more databases and users → root → backup → delete."""
from __future__ import annotations

import os

import pymysql
import pytest

from tests.fixtures.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")]


def test_troveclient_full_flow(flow):
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    c, base = flow
    trove = client.Client(session=session.Session(auth=token_endpoint.Token(f"{base}/v1.0/{c.tenant}", c.token)))
    inst = trove.instances.create("flow", "tiny", volume={"size": 1}, databases=[{"name": "shop"}],
                                  users=[{"name": "app", "password": "app-pw-123",
                                          "databases": [{"name": "shop"}]}])
    inst = until(lambda: trove.instances.get(inst.id), lambda i: i.status in ("ACTIVE", "ERROR"))
    assert inst.status == "ACTIVE"
    trove.databases.create(inst.id, [{"name": "reports"}])
    assert {d.name for d in trove.databases.list(inst.id)} >= {"shop", "reports"}
    trove.users.create(inst.id, [{"name": "bob", "password": "bob-pw-123", "databases": [{"name": "reports"}]}])
    assert "bob" in {u.name for u in trove.users.list(inst.id)}
    user, password = trove.root.create(inst.id)
    assert user == "root" and trove.root.is_root_enabled(inst.id).rootEnabled
    pymysql.connect(host=inst.ip[0], port=inst.port, user="root", password=password).close()
    b = trove.backups.create("flow-backup", inst.id)
    b = until(lambda: trove.backups.get(b.id), lambda x: x.status in ("COMPLETED", "FAILED"))
    assert b.status == "COMPLETED", b._info
    from troveclient.osc.v1 import database_backups, database_instances
    assert database_backups.set_attributes_for_print_detail(b)["datastore_version_id"]  # `backup show`
    listed = {i["id"]: i for i in database_instances.get_instances_info(trove.instances.list())}
    assert listed[inst.id]["operating_status"] == "HEALTHY"
    assert listed[inst.id]["addresses"][0]["address"] == inst.ip[0]
    trove.backups.delete(b.id)
    trove.instances.delete(inst.id)
    until(lambda: [i.id for i in trove.instances.list()], lambda ids: inst.id not in ids, 120)

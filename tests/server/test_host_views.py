"""What an operator sees of a host (Admin.GetHost/ListHosts, `reddwarf admin host list/show`): its state,
its capacity with what the instances placed on it hold, and those instances, against the real server and a
hostd on the fake drivers (no root, seconds)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.v1 import admin_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.cluster import start_cluster
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with start_cluster(tmp_path_factory.mktemp("hostviews"), driver="fake") as c:
        yield c


def invoke(c, *args):
    f = c.server.admin_files
    env = {"REDDWARF_ENDPOINT": c.server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
           "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": c.server.admin_token, "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    return CliRunner().invoke(cli.app, list(args), env=env)


def test_a_host_shows_its_instances_and_what_they_hold(cluster):
    c = cluster
    host = c.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{c.hostd.host_id}"))
    assert host.state == admin_pb2.HOST_STATE_UP and list(host.instances) == []
    assert host.capacity.memory_mb_allocated == 0 and host.capacity.memory_mb_total > 0

    inst = c.instances.CreateInstance(database_pb2.CreateInstanceRequest(instance=database_pb2.Instance(
        display_name="viewed", flavor="tiny", volume=database_pb2.Volume(size_gb=2))), metadata=c.md)
    until(lambda: c.instances.GetInstance(database_pb2.GetInstanceRequest(name=inst.name), metadata=c.md),
          lambda i: i.status == database_pb2.INSTANCE_STATUS_ACTIVE and not i.task, timeout=60, what="ACTIVE")
    [tiny] = [f for f in database_pb2_grpc.CatalogStub(c.channel).ListFlavors(
        database_pb2.ListFlavorsRequest(), metadata=c.md).flavors if f.id == "tiny"]
    host = c.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{c.hostd.host_id}"))
    assert list(host.instances) == [f"instances/{inst.id}"]
    assert host.capacity.storage_gb_allocated == 2 and host.capacity.memory_mb_allocated == tiny.limits.memory_mb
    [listed] = c.admin.ListHosts(admin_pb2.ListHostsRequest()).hosts
    assert listed == host

    r = invoke(c, "--json", "admin", "host", "list")
    assert r.exit_code == 0, r.output
    [row] = json.loads(r.output)
    assert row["instances"] == [f"instances/{inst.id}"] and row["state"] == "HOST_STATE_UP"
    r = invoke(c, "admin", "host", "list")
    assert r.exit_code == 0 and c.hostd.host_id in r.output and "UP" in r.output
    r = invoke(c, "admin", "host", "show", c.hostd.host_id)
    assert r.exit_code == 0, r.output
    assert inst.id in r.output and "fake" in r.output
    r = invoke(c, "admin", "host", "show", c.hostd.host_id, "-f", "value", "-c", "instances")
    assert r.exit_code == 0 and r.output.strip() == inst.id

    c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=c.md)
    until(lambda: c.admin.GetHost(admin_pb2.GetHostRequest(name=f"hosts/{c.hostd.host_id}")),
          lambda h: not h.instances, timeout=60, what="instance gone from the host")


def test_showing_an_unknown_host_is_not_found(cluster):
    r = invoke(cluster, "admin", "host", "show", "no-such-host")
    assert r.exit_code == 2 and "NOT_FOUND" in r.output

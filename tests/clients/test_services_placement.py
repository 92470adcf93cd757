"""The server's side of an instance's extra services, on hostd's fake drivers (seconds, no root): unknown or
repeated services are refused INVALID_ARGUMENT naming the field, with nothing stored; on a host that places
containers in host network mode (one port space shared by every instance) a memcached create ends in ERROR
with a fault naming instance.services, and gives back its container and volume; the same host still makes
an instance without it."""
from __future__ import annotations

import grpc
import pytest

from reddwarf.v1 import database_pb2 as pb
from tests.fixtures.cluster import start_cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until


def create(c, name: str, services: list[str]) -> pb.Instance:
    return c.instances.CreateInstance(pb.CreateInstanceRequest(instance=pb.Instance(
        display_name=name, flavor="tiny", volume=pb.Volume(size_gb=1), services=services)), metadata=c.md)


def listed(c) -> list[pb.Instance]:
    return list(c.instances.ListInstances(pb.ListInstancesRequest(), metadata=c.md).instances)


def test_services_are_checked_and_memcached_needs_bridge_networking(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("REDDWARF_HOSTD_NETWORK_MODE", "host")  # read by the hostd the cluster starts
    with start_cluster(tmp_path, driver="fake") as c:
        for services, field in ((["redis"], "instance.services[0]"),
                                (["memcached", "memcached"], "instance.services[1]"), ([""], "instance.services[0]")):
            with pytest.raises(grpc.RpcError) as e:
                create(c, "bad", services)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(e.value)
        assert listed(c) == []

        made = create(c, "cache", ["memcached"])
        assert list(made.services) == ["memcached"]
        failed = until(lambda: c.instances.GetInstance(pb.GetInstanceRequest(name=made.name), metadata=c.md),
                       lambda i: i.status in (pb.INSTANCE_STATUS_ERROR, pb.INSTANCE_STATUS_ACTIVE), 60)
        assert failed.status == pb.INSTANCE_STATUS_ERROR
        assert "bridge network mode" in failed.fault.message and "instance.services" in failed.fault.message + \
            failed.fault.details, failed.fault
        # The failed create gave back what it took on the host.
        hostd = c.hostd.root
        until(lambda: sorted(p.name for p in (hostd / "lxc").glob(c.hostd.prefix + "*")), lambda left: left == [],
              30, "no container left")

        plain = create(c, "plain", [])
        active = until(lambda: c.instances.GetInstance(pb.GetInstanceRequest(name=plain.name), metadata=c.md),
                       lambda i: i.status in (pb.INSTANCE_STATUS_ERROR, pb.INSTANCE_STATUS_ACTIVE), 60)
        assert active.status == pb.INSTANCE_STATUS_ACTIVE and list(active.services) == []
        assert [e.service for e in active.endpoints] == ["mysql"]
        for i in listed(c):
            c.instances.DeleteInstance(pb.DeleteInstanceRequest(name=i.name), metadata=c.md)
        until(lambda: listed(c), lambda left: left == [], 60)

"""Quotas hold under concurrency, through the real server against the fake hostd: many CreateInstance calls
at once against a quota of 3 create exactly 3 instances; the others are refused RESOURCE_EXHAUSTED."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc

from reddwarf.v1 import admin_pb2, database_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.waiting import until


def test_twenty_concurrent_creates_against_a_quota_of_three_create_exactly_three(cluster: Cluster) -> None:
    c = cluster
    tid, token = c.new_tenant()
    c.admin.UpdateQuota(admin_pb2.UpdateQuotaRequest(
        tenant=f"tenants/{tid}", quota=admin_pb2.Quota(instances=3, memory_mb=100_000, volume_gb=1000, backups=10)))
    md = (("authorization", f"Bearer {token}"),)

    def create(n: int) -> database_pb2.Instance | grpc.StatusCode:
        try:
            return c.instances.CreateInstance(database_pb2.CreateInstanceRequest(
                instance=database_pb2.Instance(display_name=f"race-{n}", flavor="tiny",
                                               volume=database_pb2.Volume(size_gb=1))), metadata=md, timeout=60)
        except grpc.RpcError as exc:
            return exc.code()

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(create, range(20)))
    made = [r for r in results if isinstance(r, database_pb2.Instance)]
    refused = [r for r in results if not isinstance(r, database_pb2.Instance)]
    try:
        assert len(made) == 3, results
        assert refused == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 17
        listed = c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances
        assert sorted(i.id for i in listed) == sorted(i.id for i in made)
        usage = c.admin.GetQuota(admin_pb2.GetQuotaRequest(tenant=f"tenants/{tid}"))
        assert usage.in_use.instances == 3 and usage.limit.instances == 3
    finally:
        for inst in made:
            until(lambda inst=inst: _delete(c, md, inst.name), lambda ok: ok, timeout=60,
                  what=f"{inst.name} delete accepted", interval=0.5)
        until(lambda: [(i.id, i.status, i.task_step, i.fault.message)
                       for i in c.instances.ListInstances(database_pb2.ListInstancesRequest(), metadata=md).instances],
              lambda left: not left, timeout=300, what="the raced instances deleted", interval=0.5)


def _delete(c: Cluster, md: tuple[tuple[str, str], ...], name: str) -> bool:
    """True once the delete is accepted (a create still running makes the instance busy for a moment)."""
    try:
        c.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=name), metadata=md)
        return True
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            return exc.code() == grpc.StatusCode.NOT_FOUND
        raise

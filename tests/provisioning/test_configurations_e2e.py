"""Configuration groups on a real instance (LXC container, loop volume, MariaDB in the guest), seen from a
MySQL client: a group given at create is in effect from the first start, static values included; changes
to an attached group show in SHOW GLOBAL VARIABLES at once; a static change leaves the instance
RESTART_REQUIRED with the old value until RestartInstance, then ACTIVE with the new one; a bad value is
refused with mysqld untouched; detaching puts the flavor's values back live.

Chained with pytest-dependency: one instance and one group shared by the steps."""
from __future__ import annotations

import os
from typing import Any

import grpc
import pymysql
import pytest

from reddwarf.agent.model import Limits
from reddwarf.agent.mycnf import size_for_limits
from reddwarf.v1 import configuration_pb2 as cpb
from reddwarf.v1 import configuration_pb2_grpc as cpb_grpc
from reddwarf.v1 import database_pb2, database_pb2_grpc
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations
from tests.fixtures.waiting import until

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC, loop devices")]

MIB = 1024 * 1024
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE
RESTART_REQUIRED = database_pb2.INSTANCE_STATUS_RESTART_REQUIRED


def get(c: Cluster, name: str) -> database_pb2.Instance:
    return c.instances.GetInstance(database_pb2.GetInstanceRequest(name=name), metadata=c.md)


def settled(c: Cluster, name: str, timeout: float = 600) -> database_pb2.Instance:
    return until(lambda: get(c, name), lambda i: not i.task and i.status in (
        ACTIVE, RESTART_REQUIRED, database_pb2.INSTANCE_STATUS_ERROR), timeout=timeout, what=f"{name} settled")


@pytest.fixture(scope="module")
def group(cluster: Cluster) -> cpb.Configuration:
    return cpb_grpc.ConfigurationsStub(cluster.channel).CreateConfiguration(cpb.CreateConfigurationRequest(
        configuration=cpb.Configuration(display_name="e2e", values={
            "max_connections": "321", "long_query_time": "1.5", "innodb_log_buffer_size": str(8 * MIB)})),
        metadata=cluster.md)


@pytest.fixture(scope="module")
def created(cluster: Cluster, group: cpb.Configuration) -> database_pb2.Instance:
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="cfg-e2e", flavor="small", volume=database_pb2.Volume(size_gb=1)),
        configuration=group.name), metadata=cluster.md)


@pytest.fixture(scope="module")
def root_password(cluster: Cluster, created: database_pb2.Instance) -> str:
    settled(cluster, created.name)
    return cluster.root.EnableRoot(database_pb2.EnableRootRequest(name=created.name), metadata=cluster.md).password


def shown(c: Cluster, inst: database_pb2.Instance, password: str, *names: str) -> dict[str, str]:
    ep = get(c, inst.name).endpoints[0]
    with pymysql.connect(host=ep.host, port=ep.port, user="root", password=password, connect_timeout=10) as conn, \
            conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN (" + ", ".join(["%s"] * len(names)) + ")", names)
        return dict(cur.fetchall())


def update(c: Cluster, group: cpb.Configuration, **values: Any) -> cpb.Configuration:
    return cpb_grpc.ConfigurationsStub(c.channel).UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, merge=True, values={k: str(v) for k, v in values.items()}), metadata=c.md)


@pytest.mark.dependency(name="created")
def test_a_group_given_at_create_is_in_effect_from_the_first_start(cluster: Cluster, created: database_pb2.Instance,
                                                                   root_password: str,
                                                                   group: cpb.Configuration) -> None:
    inst = settled(cluster, created.name)
    assert inst.status == ACTIVE and inst.configuration == group.name
    assert shown(cluster, created, root_password, "max_connections", "long_query_time", "innodb_log_buffer_size") == {
        "max_connections": "321", "long_query_time": "1.500000", "innodb_log_buffer_size": str(8 * MIB)}


@pytest.mark.dependency(name="dynamic", depends=["created"])
def test_dynamic_changes_show_in_show_global_variables_at_once(cluster: Cluster, created: database_pb2.Instance,
                                                               root_password: str, group: cpb.Configuration) -> None:
    update(cluster, group, wait_timeout=77, sql_mode="STRICT_ALL_TABLES,NO_ZERO_DATE", time_zone="+03:00",
           innodb_buffer_pool_size=256 * MIB)
    assert get(cluster, created.name).status == ACTIVE
    assert shown(cluster, created, root_password, "wait_timeout", "sql_mode", "time_zone") == {
        "wait_timeout": "77", "sql_mode": "STRICT_ALL_TABLES,NO_ZERO_DATE", "time_zone": "+03:00"}
    # The buffer pool resizes in the background, in chunks.
    until(lambda: shown(cluster, created, root_password, "innodb_buffer_pool_size"),
          lambda v: int(v["innodb_buffer_pool_size"]) == 256 * MIB, timeout=60, what="buffer pool resized")


@pytest.mark.dependency(name="refused", depends=["dynamic"])
def test_bad_values_are_refused_with_mysqld_untouched(cluster: Cluster, created: database_pb2.Instance,
                                                      root_password: str, group: cpb.Configuration) -> None:
    before = shown(cluster, created, root_password, "wait_timeout", "sql_mode", "innodb_buffer_pool_size")
    for values, field in (({"wait_timeout": "60", "sql_mode": "ANSI'; SET GLOBAL read_only=1; --"}, "values.sql_mode"),
                          # small is 512 MB: at most 384 MiB of buffer pool.
                          ({"wait_timeout": "60", "innodb_buffer_pool_size": str(385 * MIB)},
                           "values.innodb_buffer_pool_size")):
        with pytest.raises(grpc.RpcError) as e:
            update(cluster, group, **values)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field_violations(e.value) == [field]
    assert shown(cluster, created, root_password, "wait_timeout", "sql_mode", "innodb_buffer_pool_size") == before
    assert shown(cluster, created, root_password, "read_only") == {"read_only": "OFF"}


@pytest.mark.dependency(name="restart", depends=["refused"])
def test_a_static_change_is_restart_required_until_restarted(cluster: Cluster, created: database_pb2.Instance,
                                                             root_password: str, group: cpb.Configuration) -> None:
    update(cluster, group, innodb_log_buffer_size=32 * MIB, max_connections=222)
    assert get(cluster, created.name).status == RESTART_REQUIRED
    assert shown(cluster, created, root_password, "innodb_log_buffer_size", "max_connections") == {
        "innodb_log_buffer_size": str(8 * MIB), "max_connections": "222"}
    # Still a running instance: a backup (mariadb-backup reads the my.cnf with its include) completes, proven
    # by a restore in the sandbox, and the restart stays pending after it.
    bk = database_pb2_grpc.BackupsStub(cluster.channel)
    b = bk.CreateBackup(database_pb2.CreateBackupRequest(backup=database_pb2.Backup(
        display_name="cfg-e2e", instance=created.name)), metadata=cluster.md)
    b = until(lambda: bk.GetBackup(database_pb2.GetBackupRequest(name=b.name), metadata=cluster.md),
              lambda x: x.status in (database_pb2.BACKUP_STATUS_COMPLETED, database_pb2.BACKUP_STATUS_FAILED),
              timeout=600, what="backup done")
    assert b.status == database_pb2.BACKUP_STATUS_COMPLETED, b.fault.message
    assert settled(cluster, created.name).status == RESTART_REQUIRED
    bk.DeleteBackup(database_pb2.DeleteBackupRequest(name=b.name), metadata=cluster.md)
    cluster.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=created.name), metadata=cluster.md)
    until(lambda: get(cluster, created.name), lambda i: not i.task, timeout=300, what="restart ended")
    inst = settled(cluster, created.name)
    assert inst.status == ACTIVE
    assert shown(cluster, created, root_password, "innodb_log_buffer_size", "max_connections", "wait_timeout") == {
        "innodb_log_buffer_size": str(32 * MIB), "max_connections": "222", "wait_timeout": "77"}


@pytest.mark.dependency(depends=["restart"])
def test_detach_puts_the_flavors_values_back_and_the_group_can_then_go(cluster: Cluster,
                                                                        created: database_pb2.Instance,
                                                                        root_password: str,
                                                                        group: cpb.Configuration) -> None:
    s = cpb_grpc.ConfigurationsStub(cluster.channel)
    inst = s.DetachConfiguration(cpb.DetachConfigurationRequest(instance=created.name), metadata=cluster.md)
    assert not inst.configuration
    _, conns = size_for_limits(Limits(memory_mb=512))
    assert shown(cluster, created, root_password, "max_connections", "wait_timeout", "time_zone") == {
        "max_connections": str(conns), "wait_timeout": "28800", "time_zone": "SYSTEM"}
    assert inst.status == RESTART_REQUIRED  # innodb_log_buffer_size goes back at the next restart
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=group.name), metadata=cluster.md)
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=created.name), metadata=cluster.md)
    until(lambda: [i.id for i in cluster.instances.ListInstances(database_pb2.ListInstancesRequest(),
                                                                metadata=cluster.md).instances],
          lambda ids: created.id not in ids, timeout=300, what="instance deleted")

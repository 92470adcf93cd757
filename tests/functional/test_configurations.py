"""Configuration groups through the server's public API against the fake hostd (guests with the fake
datastore): parameter rules, create / show / list / PUT-replace / PATCH-merge / unset / delete, a group given
at create, attach and detach, a static change putting instances in RESTART_REQUIRED until each restarts, and
every refusal (bad values, a buffer pool beyond the flavor, a group in use, another tenant's group) naming
its field with nothing changed on the guests.

The steps share two instances and one group and are chained with pytest-dependency."""
from __future__ import annotations

import grpc
import pytest

from reddwarf.v1 import configuration_pb2 as cpb
from reddwarf.v1 import configuration_pb2_grpc as cpb_grpc
from reddwarf.v1 import database_pb2
from tests.fixtures.cluster import Cluster
from tests.fixtures.errors import field_violations

from .test_instance_flows import agent_actions, get, wait_active, wait_task

MIB = 1024 * 1024
RESTART_REQUIRED = database_pb2.INSTANCE_STATUS_RESTART_REQUIRED
ACTIVE = database_pb2.INSTANCE_STATUS_ACTIVE


def stub(c: Cluster) -> cpb_grpc.ConfigurationsStub:
    return cpb_grpc.ConfigurationsStub(c.channel)


def refused(call, code: grpc.StatusCode) -> list[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call()
    assert e.value.code() == code, e.value.details()
    return field_violations(e.value)


def applied(c: Cluster, iid: str) -> list[str]:
    return [a for a in agent_actions(c, iid) if a.startswith("apply_configuration")]


@pytest.fixture(scope="module")
def group(cluster: Cluster) -> cpb.Configuration:
    return stub(cluster).CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="web", description="for the shop",
        values={"max_connections": "300", "sql_mode": "strict_trans_tables", "slow_query_log": "true"})),
        metadata=cluster.md)


@pytest.fixture(scope="module")
def born_with(cluster: Cluster, group: cpb.Configuration) -> database_pb2.Instance:
    """An instance created with the group."""
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="cfg-a", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        configuration=group.name), metadata=cluster.md)


@pytest.fixture(scope="module")
def plain(cluster: Cluster) -> database_pb2.Instance:
    """An instance created without one (medium: 1 GB, so a 768 MiB buffer pool fits and 769 does not)."""
    return cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="cfg-b", flavor="medium", volume=database_pb2.Volume(size_gb=1))),
        metadata=cluster.md)


def test_parameter_rules_are_served_per_datastore_version(cluster: Cluster) -> None:
    s = stub(cluster)
    listed = s.ListConfigurationParameters(cpb.ListConfigurationParametersRequest(
        parent="datastores/mariadb/versions/10.11"), metadata=cluster.md).parameters
    by_name = {p.parameter: p for p in listed}
    assert len(by_name) >= 40
    mc = by_name["max_connections"]
    assert (mc.type, mc.min, mc.max, mc.dynamic, mc.restart_required) == ("integer", 10, 100000, True, False)
    assert by_name["innodb_buffer_pool_size"].flavor_bound
    assert by_name["innodb_log_buffer_size"].restart_required
    assert "STRICT_TRANS_TABLES" in by_name["sql_mode"].allowed_values
    one = s.GetConfigurationParameter(cpb.GetConfigurationParameterRequest(
        name="datastores/mariadb/versions/10.11/parameters/long_query_time"), metadata=cluster.md)
    assert one.type == "float" and one.dynamic
    assert refused(lambda: s.GetConfigurationParameter(cpb.GetConfigurationParameterRequest(
        name="datastores/mariadb/versions/10.11/parameters/init_file"), metadata=cluster.md),
        grpc.StatusCode.NOT_FOUND) == ["name"]
    assert refused(lambda: s.ListConfigurationParameters(cpb.ListConfigurationParametersRequest(
        parent="datastores/mariadb/versions/9.9"), metadata=cluster.md), grpc.StatusCode.NOT_FOUND) == ["parent"]
    assert refused(lambda: s.ListConfigurationParameters(cpb.ListConfigurationParametersRequest(
        parent="mariadb"), metadata=cluster.md), grpc.StatusCode.INVALID_ARGUMENT) == ["parent"]


@pytest.mark.parametrize(("values", "field"), [
    ({"max_connections": "lots"}, "configuration.values.max_connections"),
    ({"max_connections": "1"}, "configuration.values.max_connections"),
    ({"sql_mode": "ANSI'; DROP DATABASE mysql; --"}, "configuration.values.sql_mode"),
    ({"time_zone": "+01:00\ninit_file=/tmp/x"}, "configuration.values.time_zone"),
    ({"init_file": "/tmp/x"}, "configuration.values.init_file"),
])
def test_a_group_with_a_bad_value_is_refused_and_not_made(cluster: Cluster, values: dict[str, str],
                                                          field: str) -> None:
    s = stub(cluster)
    before = len(s.ListConfigurations(cpb.ListConfigurationsRequest(), metadata=cluster.md).configurations)
    assert refused(lambda: s.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="bad", values=values)), metadata=cluster.md), grpc.StatusCode.INVALID_ARGUMENT) == [field]
    assert len(s.ListConfigurations(cpb.ListConfigurationsRequest(), metadata=cluster.md).configurations) == before


@pytest.mark.dependency(name="group")
def test_a_group_is_made_with_canonical_values_and_shown_to_its_tenant_only(cluster: Cluster,
                                                                          group: cpb.Configuration) -> None:
    s = stub(cluster)
    assert dict(group.values) == {"max_connections": "300", "sql_mode": "STRICT_TRANS_TABLES", "slow_query_log": "ON"}
    assert (group.datastore, group.datastore_version, group.instance_count) == ("mariadb", "10.11", 0)
    got = s.GetConfiguration(cpb.GetConfigurationRequest(name=group.name), metadata=cluster.md)
    assert got.display_name == "web" and got.description == "for the shop"
    assert group.id in {g.id for g in s.ListConfigurations(cpb.ListConfigurationsRequest(),
                                                            metadata=cluster.md).configurations}
    other = cluster.other_tenant_md()
    assert refused(lambda: s.GetConfiguration(cpb.GetConfigurationRequest(name=group.name), metadata=other),
                   grpc.StatusCode.NOT_FOUND) == ["name"]
    assert not s.ListConfigurations(cpb.ListConfigurationsRequest(), metadata=other).configurations


@pytest.mark.dependency(name="born", depends=["group"])
def test_an_instance_created_with_the_group_has_it_from_the_start(cluster: Cluster, group: cpb.Configuration,
                                                                  born_with: database_pb2.Instance) -> None:
    inst = wait_active(cluster, born_with.name)
    assert inst.configuration == group.name and inst.status == ACTIVE
    # Written by prepare before mysqld's first start: no apply command, no restart needed.
    assert applied(cluster, inst.id) == []
    members = stub(cluster).ListConfigurationInstances(cpb.ListConfigurationInstancesRequest(name=group.name),
                                                       metadata=cluster.md).instances
    assert [(m.id, m.restart_required) for m in members] == [(inst.id, False)]


def test_create_with_another_tenants_or_a_missing_group_is_refused(cluster: Cluster, group: cpb.Configuration) -> None:
    other = cluster.other_tenant_md()
    for md, name in ((other, group.name), (cluster.md, "configurations/nope")):
        assert refused(lambda md=md, name=name: cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="x", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            configuration=name), metadata=md), grpc.StatusCode.NOT_FOUND) == ["configuration"]


@pytest.mark.dependency(name="attached", depends=["born"])
def test_attach_applies_the_group_and_refuses_a_buffer_pool_beyond_the_flavor(
        cluster: Cluster, group: cpb.Configuration, plain: database_pb2.Instance) -> None:
    s = stub(cluster)
    iid = wait_active(cluster, plain.name).id
    big = s.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="big", values={"innodb_buffer_pool_size": str(769 * MIB)})), metadata=cluster.md)
    assert refused(lambda: s.AttachConfiguration(cpb.AttachConfigurationRequest(
        instance=plain.name, configuration=big.name), metadata=cluster.md),
        grpc.StatusCode.INVALID_ARGUMENT) == ["configuration.values.innodb_buffer_pool_size"]
    assert applied(cluster, iid) == [] and not get(cluster, plain.name).configuration
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=big.name), metadata=cluster.md)

    inst = s.AttachConfiguration(cpb.AttachConfigurationRequest(instance=plain.name, configuration=group.name),
                                 metadata=cluster.md)
    assert inst.configuration == group.name and inst.status == ACTIVE
    assert applied(cluster, iid) == ["apply_configuration max_connections=300,slow_query_log=ON,"
                                     "sql_mode=STRICT_TRANS_TABLES"]
    other = s.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="other", values={"wait_timeout": "60"})), metadata=cluster.md)
    assert refused(lambda: s.AttachConfiguration(cpb.AttachConfigurationRequest(
        instance=plain.name, configuration=other.name), metadata=cluster.md),
        grpc.StatusCode.FAILED_PRECONDITION) == ["instance"]
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=other.name), metadata=cluster.md)


@pytest.mark.dependency(name="updated", depends=["attached"])
def test_put_replaces_patch_merges_and_a_bad_update_changes_nothing(
        cluster: Cluster, group: cpb.Configuration, plain: database_pb2.Instance,
        born_with: database_pb2.Instance) -> None:
    s = stub(cluster)
    before = applied(cluster, plain.id)
    assert refused(lambda: s.UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, merge=True, values={"wait_timeout": "120", "max_connections": "7"}), metadata=cluster.md),
        grpc.StatusCode.INVALID_ARGUMENT) == ["values.max_connections"]
    # Beyond the flavor of one attached instance (cfg-a is tiny: 192 MiB at most): refused for all.
    assert refused(lambda: s.UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, merge=True, values={"innodb_buffer_pool_size": str(512 * MIB)}), metadata=cluster.md),
        grpc.StatusCode.INVALID_ARGUMENT) == ["values.innodb_buffer_pool_size"]
    assert dict(s.GetConfiguration(cpb.GetConfigurationRequest(name=group.name), metadata=cluster.md).values) \
        == dict(group.values)
    assert applied(cluster, plain.id) == before

    merged = s.UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, merge=True, values={"wait_timeout": "120"}), metadata=cluster.md)
    assert dict(merged.values) == {**group.values, "wait_timeout": "120"} and merged.instance_count == 2
    replaced = s.UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, values={"max_connections": "250", "wait_timeout": "120"}, display_name="web2"),
        metadata=cluster.md)
    assert dict(replaced.values) == {"max_connections": "250", "wait_timeout": "120"}
    assert replaced.display_name == "web2"
    unset = s.UpdateConfiguration(cpb.UpdateConfigurationRequest(name=group.name, merge=True,
                                                                 unset=["wait_timeout"]), metadata=cluster.md)
    assert dict(unset.values) == {"max_connections": "250"}
    for iid in (plain.id, born_with.id):
        assert applied(cluster, iid)[-1] == "apply_configuration max_connections=250"
    assert get(cluster, plain.name).status == ACTIVE


@pytest.mark.dependency(name="restart", depends=["updated"])
def test_a_static_value_makes_instances_restart_required_until_each_restarts(
        cluster: Cluster, group: cpb.Configuration, plain: database_pb2.Instance,
        born_with: database_pb2.Instance) -> None:
    s = stub(cluster)
    s.UpdateConfiguration(cpb.UpdateConfigurationRequest(
        name=group.name, merge=True, values={"innodb_log_buffer_size": str(32 * MIB)}), metadata=cluster.md)
    assert get(cluster, plain.name).status == RESTART_REQUIRED
    assert get(cluster, born_with.name).status == RESTART_REQUIRED
    listed = cluster.instances.ListInstances(database_pb2.ListInstancesRequest(status=RESTART_REQUIRED),
                                             metadata=cluster.md).instances
    assert {plain.id, born_with.id} <= {i.id for i in listed}
    # Databases can still be managed meanwhile, as in Trove.
    cluster.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=plain.name), metadata=cluster.md)
    cluster.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=plain.name), metadata=cluster.md)
    wait_task(cluster, plain.id, "restart_instance")
    assert get(cluster, plain.name).status == ACTIVE
    assert get(cluster, born_with.name).status == RESTART_REQUIRED
    members = {m.id: m.restart_required for m in s.ListConfigurationInstances(
        cpb.ListConfigurationInstancesRequest(name=group.name), metadata=cluster.md).instances}
    assert members == {plain.id: False, born_with.id: True}
    cluster.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=born_with.name), metadata=cluster.md)
    wait_task(cluster, born_with.id, "restart_instance")
    assert get(cluster, born_with.name).status == ACTIVE


@pytest.mark.dependency(depends=["restart"])
def test_a_group_in_use_is_not_deleted_until_detached(cluster: Cluster, group: cpb.Configuration,
                                                     plain: database_pb2.Instance,
                                                     born_with: database_pb2.Instance) -> None:
    s = stub(cluster)
    assert refused(lambda: s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=group.name),
                                                 metadata=cluster.md), grpc.StatusCode.FAILED_PRECONDITION) == ["name"]
    for inst in (plain, born_with):
        out = s.DetachConfiguration(cpb.DetachConfigurationRequest(instance=inst.name), metadata=cluster.md)
        assert not out.configuration
        assert applied(cluster, inst.id)[-1] == "apply_configuration "
        # The static value leaves with the group: mysqld started with it, so a restart is pending again.
        assert out.status == RESTART_REQUIRED
    assert refused(lambda: s.DetachConfiguration(cpb.DetachConfigurationRequest(instance=plain.name),
                                                 metadata=cluster.md), grpc.StatusCode.FAILED_PRECONDITION) == ["instance"]
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=group.name), metadata=cluster.md)
    assert refused(lambda: s.GetConfiguration(cpb.GetConfigurationRequest(name=group.name), metadata=cluster.md),
                   grpc.StatusCode.NOT_FOUND) == ["name"]
    for inst in (plain, born_with):
        cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)


def test_a_resize_to_a_flavor_too_small_for_the_groups_buffer_pool_is_refused(cluster: Cluster) -> None:
    s = stub(cluster)
    big = s.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="pool", values={"innodb_buffer_pool_size": str(512 * MIB)})), metadata=cluster.md)
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="cfg-c", flavor="medium", volume=database_pb2.Volume(size_gb=1)),
        configuration=big.name), metadata=cluster.md)
    wait_active(cluster, inst.name)
    # small has 512 MB: at most 384 MiB of buffer pool.
    assert refused(lambda: cluster.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(
        name=inst.name, flavor="small"), metadata=cluster.md), grpc.StatusCode.INVALID_ARGUMENT) == ["flavor"]
    after = get(cluster, inst.name)
    assert after.flavor == "flavors/medium" and after.status == ACTIVE and not after.task
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
    wait_task(cluster, inst.id, "delete_instance")
    # The deleted instance no longer holds the group.
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=big.name), metadata=cluster.md)


def test_a_stop_and_start_also_ends_restart_required(cluster: Cluster) -> None:
    s = stub(cluster)
    g = s.CreateConfiguration(cpb.CreateConfigurationRequest(configuration=cpb.Configuration(
        display_name="stopstart", values={"max_connections": "150"})), metadata=cluster.md)
    inst = cluster.instances.CreateInstance(database_pb2.CreateInstanceRequest(
        instance=database_pb2.Instance(display_name="cfg-d", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
        configuration=g.name), metadata=cluster.md)
    wait_active(cluster, inst.name)
    s.UpdateConfiguration(cpb.UpdateConfigurationRequest(name=g.name, merge=True, values={
        "performance_schema": "ON"}), metadata=cluster.md)
    assert get(cluster, inst.name).status == RESTART_REQUIRED
    cluster.instances.StopInstance(database_pb2.StopInstanceRequest(name=inst.name), metadata=cluster.md)
    wait_task(cluster, inst.id, "stop_instance")
    cluster.instances.StartInstance(database_pb2.StartInstanceRequest(name=inst.name), metadata=cluster.md)
    wait_task(cluster, inst.id, "start_instance")
    assert get(cluster, inst.name).status == ACTIVE
    s.DetachConfiguration(cpb.DetachConfigurationRequest(instance=inst.name), metadata=cluster.md)
    cluster.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=inst.name), metadata=cluster.md)
    wait_task(cluster, inst.id, "delete_instance")
    s.DeleteConfiguration(cpb.DeleteConfigurationRequest(name=g.name), metadata=cluster.md)

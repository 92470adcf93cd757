"""Configuration groups through the REST gateway, driven by unmodified python-troveclient, by the `openstack
database configuration ...` commands of python-openstackclient with the trove plugin, and by the `reddwarf`
CLI — against the real server and a hostd with the fake drivers (guests are agents with the fake datastore),
so the flow is the real API's in seconds and without root.

Chained with pytest-dependency: one group and one instance shared by the steps."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until

OPENSTACK = Path(sys.executable).parent / "openstack"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str, Any]]:
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    with start_cluster(tmp_path_factory.mktemp("cfg-trove"), driver="fake") as c, \
            start_gateway(c.server.api, c.server.gateway_files) as base:
        url = f"{base}/v1.0/{c.tenant}"
        yield c, url, client.Client(session=session.Session(auth=token_endpoint.Token(url, c.token)))


@pytest.fixture(scope="module")
def instance(env: tuple[Cluster, str, Any]) -> Any:
    _, _, trove = env
    inst = trove.instances.create("cfg-trove", "medium", volume={"size": 1})
    return until(lambda: trove.instances.get(inst.id), lambda i: i.status in ("ACTIVE", "ERROR"), 60)


def bad_request(fn: Any) -> str:
    from troveclient import exceptions
    with pytest.raises(exceptions.BadRequest) as e:
        fn()
    return str(e.value)


@pytest.mark.dependency(name="made")
def test_troveclient_creates_shows_lists_and_reads_parameters(env: tuple[Cluster, str, Any]) -> None:
    _, _, trove = env
    params = trove.configuration_parameters.parameters("mariadb", "10.11")
    by_name = {p.name: p for p in params}
    assert len(by_name) >= 40
    assert (by_name["max_connections"].type, by_name["max_connections"].min, by_name["max_connections"].max,
            by_name["max_connections"].restart_required) == ("integer", 10, 100000, False)
    assert by_name["innodb_log_buffer_size"].restart_required
    one = trove.configuration_parameters.get_parameter("mariadb", "10.11", "long_query_time")
    assert one.type == "float"
    assert trove.configuration_parameters.get_parameter_by_version("10.11", "wait_timeout").type == "integer"

    g = trove.configurations.create("web", json.dumps({"max_connections": 300, "slow_query_log": True,
                                                      "sql_mode": "STRICT_TRANS_TABLES"}),
                                    description="shop", datastore="mariadb", datastore_version="10.11")
    assert g.values == {"max_connections": 300, "slow_query_log": True, "sql_mode": "STRICT_TRANS_TABLES"}
    assert (g.datastore_name, g.datastore_version_name) == ("mariadb", "10.11")
    assert trove.configurations.get(g.id).name == "web"
    assert g.id in {x.id for x in trove.configurations.list()}
    # The openstack plugin's own formatting of `configuration show`.
    from troveclient.osc.v1 import database_configurations
    shown = database_configurations.set_attributes_for_print_detail(trove.configurations.get(g.id))
    assert json.loads(shown["values"])["max_connections"] == 300


def test_troveclient_bad_values_are_400_naming_the_field(env: tuple[Cluster, str, Any]) -> None:
    _, _, trove = env
    assert "values.max_connections" in bad_request(lambda: trove.configurations.create(
        "bad", json.dumps({"max_connections": "lots"})))
    assert "values.sql_mode" in bad_request(lambda: trove.configurations.create(
        "bad", json.dumps({"sql_mode": "ANSI'; DROP DATABASE mysql; --"})))
    assert "values.max_connections" in bad_request(lambda: trove.configurations.create(
        "bad", json.dumps({"max_connections": True})))
    assert "configuration.values.x" in bad_request(lambda: trove.configurations.create(
        "bad", json.dumps({"x": [1]})))
    assert "bad" not in {x.name for x in trove.configurations.list()}


@pytest.mark.dependency(name="attached", depends=["made"])
def test_troveclient_attaches_updates_and_detaches(env: tuple[Cluster, str, Any], instance: Any) -> None:
    c, _, trove = env
    assert instance.status == "ACTIVE"
    g = next(x for x in trove.configurations.list() if x.name == "web")
    trove.instances.update(instance.id, configuration=g.id)
    got = trove.instances.get(instance.id)
    assert got.configuration["id"] == g.id and got.status == "ACTIVE"
    assert [i.id for i in trove.configurations.instances(g.id)] == [instance.id]
    assert trove.instances.configuration(instance.id).configuration["max_connections"] == 300
    # PATCH merges, PUT replaces.
    trove.configurations.edit(g.id, json.dumps({"wait_timeout": 120}))
    assert trove.configurations.get(g.id).values == {"max_connections": 300, "slow_query_log": True,
                                                     "sql_mode": "STRICT_TRANS_TABLES", "wait_timeout": 120}
    trove.configurations.update(g.id, json.dumps({"max_connections": 250}), name="web")
    assert trove.configurations.get(g.id).values == {"max_connections": 250}
    # A static parameter: RESTART_REQUIRED until restarted.
    trove.configurations.edit(g.id, json.dumps({"innodb_log_buffer_size": 33554432}))
    assert trove.instances.get(instance.id).status == "RESTART_REQUIRED"
    trove.instances.restart(instance.id)
    until(lambda: trove.instances.get(instance.id), lambda i: i.status == "ACTIVE", 60)
    # Delete of a group in use is refused (Trove answers 4xx); detach, then delete.
    from troveclient import exceptions
    with pytest.raises(exceptions.UnprocessableEntity, match="detach it first"):
        trove.configurations.delete(g.id)
    trove.instances.update(instance.id, remove_configuration=True)
    assert not hasattr(trove.instances.get(instance.id), "configuration")
    trove.configurations.delete(g.id)
    assert g.id not in {x.id for x in trove.configurations.list()}


def openstack(url: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    return subprocess.run([str(OPENSTACK), "--os-auth-type", "admin_token", "--os-endpoint", url, "--os-token", token,
                           "database", *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow  # a dozen `openstack` processes, each seconds of imports
@pytest.mark.skipif(not OPENSTACK.exists() and not shutil.which("openstack"), reason="python-openstackclient missing")
@pytest.mark.dependency(depends=["attached"])
def test_the_openstack_cli_manages_configurations_through_the_gateway(env: tuple[Cluster, str, Any],
                                                                      instance: Any) -> None:
    c, url, trove = env

    def ok(*args: str) -> str:
        res = openstack(url, c.token, *args)
        assert res.returncode == 0, f"openstack database {' '.join(args)}: {res.stderr[-2000:]}"
        return res.stdout

    made = json.loads(ok("configuration", "create", "cli", '{"max_connections": 321}', "--datastore", "mariadb",
                         "--datastore-version", "10.11", "-f", "json"))
    gid = made["id"]
    assert json.loads(made["values"]) == {"max_connections": 321}
    assert gid in {r["ID"] for r in json.loads(ok("configuration", "list", "-f", "json"))}
    params = json.loads(ok("configuration", "parameter", "list", "10.11", "--datastore", "mariadb", "-f", "json"))
    assert {"Name": "max_connections", "Type": "integer", "Min Size": 10, "Max Size": 100000,
            "Restart Required": False} in params
    shown = json.loads(ok("configuration", "parameter", "show", "10.11", "sql_mode", "--datastore", "mariadb",
                          "-f", "json"))
    assert shown["type"] == "string"
    ok("configuration", "parameter", "set", gid, '{"wait_timeout": 99}')
    assert trove.configurations.get(gid).values == {"max_connections": 321, "wait_timeout": 99}
    ok("configuration", "set", gid, '{"wait_timeout": 98}')
    shown_group = json.loads(ok("configuration", "show", gid, "-f", "json"))
    assert json.loads(shown_group["values"]) == {"wait_timeout": 98} and shown_group["name"] == "cli"
    ok("configuration", "attach", instance.id, gid)
    assert trove.instances.get(instance.id).configuration["id"] == gid
    assert json.loads(ok("configuration", "instances", gid, "-f", "json")) == [{"ID": instance.id,
                                                                               "Name": "cfg-trove"}]
    bad = openstack(url, c.token, "configuration", "parameter", "set", gid, '{"wait_timeout": "soon"}')
    assert bad.returncode != 0 and "values.wait_timeout" in bad.stderr
    ok("configuration", "detach", instance.id)
    ok("configuration", "delete", gid)
    assert gid not in {r["ID"] for r in json.loads(ok("configuration", "list", "-f", "json"))}


@pytest.mark.dependency(depends=["attached"])
def test_the_reddwarf_cli_manages_configurations(env: tuple[Cluster, str, Any], instance: Any) -> None:
    c, _, _ = env
    cli_env = {**os.environ, "REDDWARF_ENDPOINT": c.server.api, "REDDWARF_TOKEN": c.token,
               "REDDWARF_CA": str(c.server.client_files.ca), "REDDWARF_CERT": str(c.server.client_files.cert),
               "REDDWARF_KEY": str(c.server.client_files.key), "REDDWARF_CONFIG": "/nonexistent"}

    def rd(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", *args], capture_output=True, text=True,
                             timeout=60, env=cli_env)
        assert (res.returncode == 0) == ok, f"reddwarf {' '.join(args)}: {res.stdout} {res.stderr}"
        return res

    made = json.loads(rd("configuration", "create", "rdcli", "--set", "max_connections=222", "--set",
                         "slow_query_log=on", "--json").stdout)
    assert made["values"] == {"max_connections": "222", "slow_query_log": "ON"}
    rd("configuration", "update", "rdcli", "--set", "wait_timeout=60", "--unset", "slow_query_log")
    shown = json.loads(rd("configuration", "show", "rdcli", "--json").stdout)
    assert shown["values"] == {"max_connections": "222", "wait_timeout": "60"}
    assert "values.wait_timeout" in rd("configuration", "update", "rdcli", "--set", "wait_timeout=x", ok=False).stderr
    attached = json.loads(rd("configuration", "attach", instance.id, "rdcli", "--json").stdout)
    assert attached["configuration"] == f"configurations/{made['id']}"
    listed = rd("configuration", "instances", "rdcli", "-f", "value", "-c", "id").stdout.split()
    assert listed == [instance.id]
    assert "configuration" in rd("configuration", "delete", "rdcli", ok=False).stderr
    rd("configuration", "detach", instance.id)
    rd("configuration", "delete", "rdcli")
    params = rd("datastore", "parameters", "mariadb", "10.11", "-f", "value", "-c", "name").stdout.split()
    assert "innodb_buffer_pool_size" in params and len(params) >= 40

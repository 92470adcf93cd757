"""The lifecycle controls through the surfaces users touch, against the fake cluster: the REST gateway
(Trove's PUT/PATCH /instances/{id}, the stop/start actions, ?tag= filters, deletion protection as 422,
?final_backup=), unmodified python-troveclient's `instances.update(name=...)` and mgmt `stop`, and the
`reddwarf` CLI (instance update/stop/start, --tag filters, -f value -c tags)."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from rich.console import Console
from typer.testing import CliRunner

from reddwarf.client import Client, ClientConfig, cli
from tests.fixtures.cluster import Cluster
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def rest(cluster: Cluster) -> Iterator[tuple[str, dict[str, str]]]:
    """(the tenant's Trove base URL, its headers)."""
    with start_gateway(cluster.server.api, cluster.server.gateway_files,
                       log=cluster.server.state_dir / "gateway.log") as base:
        yield f"{base}/v1.0/{cluster.tenant}", {"X-Auth-Token": cluster.token}


@pytest.fixture
def sdk(cluster: Cluster) -> Iterator[Client]:
    f = cluster.server.client_files
    with Client(ClientConfig(endpoint=cluster.server.api, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                             token=cluster.token, timeout=30)) as c:
        yield c


@pytest.fixture
def invoke(sdk, monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=100))
    monkeypatch.setattr(cli.State, "factory", lambda: sdk)

    def run(*args: str):
        return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "100"})
    return run


def trove_status(rest, iid: str) -> dict:
    url, h = rest
    return httpx.get(f"{url}/instances/{iid}", headers=h).json()["instance"]


def settled(rest, iid: str, status: str) -> dict:
    return until(lambda: trove_status(rest, iid), lambda i: i["status"] in (status, "ERROR"), timeout=60,
                 what=status, interval=0.2)


@pytest.fixture(scope="module")
def made(rest) -> dict:
    url, h = rest
    r = httpx.post(f"{url}/instances", headers=h, json={"instance": {
        "name": "rest-db", "flavorRef": "tiny", "volume": {"size": 1}, "tags": {"env": "prod"},
        "deletion_protection": True}})
    assert r.status_code == 200, r.text
    inst = r.json()["instance"]
    assert inst["tags"] == {"env": "prod"} and inst["deletion_protection"] is True
    assert settled(rest, inst["id"], "ACTIVE")["status"] == "ACTIVE"
    return inst


def test_rest_put_and_patch_rename_protect_and_tag(rest, made):
    url, h = rest
    iid = made["id"]
    r = httpx.put(f"{url}/instances/{iid}", headers=h, json={"instance": {"name": "rest-db-2"}})
    assert r.status_code == 202, r.text
    r = httpx.patch(f"{url}/instances/{iid}", headers=h, json={"instance": {"tags": {"env": "prod", "tier": "gold"}}})
    assert r.status_code == 202, r.text
    got = trove_status(rest, iid)
    assert got["name"] == "rest-db-2" and got["tags"] == {"env": "prod", "tier": "gold"}
    names = {i["name"] for i in httpx.get(f"{url}/instances", params={"tag": "tier=gold"}, headers=h)
             .json()["instances"]}
    assert names == {"rest-db-2"}
    assert httpx.get(f"{url}/instances", params=[("tag", "tier=gold"), ("tag", "env=dev")],
                     headers=h).json()["instances"] == []


@pytest.mark.parametrize("body,status,fragment", [
    ({"instance": {"configuration": ["abc"]}}, 400, "instance.configuration"),
    ({"instance": {"configuration": "abc", "name": "x"}}, 400, "instance.configuration"),
    ({"instance": {"configuration": "abc"}}, 404, "configuration"),
    ({"instance": {}}, 400, "nothing to change"),
    ({"instance": {"name": ""}}, 400, "instance.display_name"),
    ({"instance": {"tags": {"reddwarf:x": "1"}}}, 400, "instance.tags"),
    ({"instance": {"tags": ["env"]}}, 400, "instance.tags"),
    ({"instance": {"deletion_protection": "no"}}, 400, "deletion_protection"),
])
def test_rest_bad_updates_are_refused_and_change_nothing(rest, made, body, status, fragment):
    url, h = rest
    before = trove_status(rest, made["id"])
    r = httpx.put(f"{url}/instances/{made['id']}", headers=h, json=body)
    assert r.status_code == status and fragment in r.text, r.text
    after = trove_status(rest, made["id"])
    assert (after["name"], after["tags"], after["deletion_protection"]) == \
        (before["name"], before["tags"], before["deletion_protection"])


def test_rest_delete_of_a_protected_instance_is_422_and_changes_nothing(rest, made):
    url, h = rest
    r = httpx.delete(f"{url}/instances/{made['id']}", headers=h)
    assert r.status_code == 422 and "deletion_protection" in r.json()["unprocessableEntity"]["message"]
    assert trove_status(rest, made["id"])["status"] == "ACTIVE"


def test_rest_stop_and_start_actions(rest, made):
    url, h = rest
    iid = made["id"]
    r = httpx.post(f"{url}/instances/{iid}/action", headers=h, json={"stop": {}})
    assert r.status_code == 202, r.text
    assert settled(rest, iid, "SHUTDOWN")["operating_status"] == "SHUTDOWN"
    r = httpx.post(f"{url}/instances/{iid}/action", headers=h, json={"stop": {}})
    assert r.status_code == 422 and "already stopped" in r.text
    r = httpx.post(f"{url}/instances/{iid}/action", headers=h, json={"start": {}})
    assert r.status_code == 202, r.text
    assert settled(rest, iid, "ACTIVE")["status"] == "ACTIVE"
    r = httpx.post(f"{url}/instances/{iid}/action", headers=h, json={"pause": {}})
    assert r.status_code == 400 and "stop, start" in r.text


def test_troveclient_renames_and_stops_unmodified(cluster, rest, made):
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    url, _ = rest
    trove = client.Client(session=session.Session(auth=token_endpoint.Token(url, cluster.token)))
    trove.instances.update(made["id"], name="via-troveclient")
    assert trove.instances.get(made["id"]).name == "via-troveclient"
    trove.mgmt_instances.stop(made["id"])  # POST /mgmt/instances/{id}/action {"stop": {}}
    assert settled(rest, made["id"], "SHUTDOWN")["status"] == "SHUTDOWN"
    httpx.post(f"{url}/instances/{made['id']}/action", headers={"X-Auth-Token": cluster.token}, json={"start": {}})
    assert settled(rest, made["id"], "ACTIVE")["status"] == "ACTIVE"


def test_cli_update_tags_stop_start_and_delete(invoke, sdk):
    r = invoke("instance", "create", "cli-db", "--flavor", "tiny", "--size", "1", "--tag", "env=dev",
               "--tag", "team=web", "--deletion-protection", "-f", "value", "-c", "id")
    assert r.exit_code == 0, r.output
    iid = r.output.strip()
    r = invoke("instance", "update", "cli-db", "--name", "cli-db-2", "--tag", "owner=ann", "--remove-tag", "team",
               "-f", "value", "-c", "name", "-c", "tags")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == ["cli-db-2", "env=dev, owner=ann"]
    r = invoke("instance", "list", "--tag", "owner=ann", "-f", "value", "-c", "id")
    assert r.output.split() == [iid]
    assert invoke("instance", "list", "--tag", "owner=bob", "-f", "value", "-c", "id").output.split() == []
    r = invoke("instance", "update", "cli-db-2", "--tag", "novalue")
    assert r.exit_code == 2 and "KEY=VALUE" in r.output
    r = invoke("instance", "update", "cli-db-2")
    assert r.exit_code == 2 and "nothing to change" in r.output
    r = invoke("instance", "delete", "cli-db-2")
    assert r.exit_code == 1 and "deletion_protection" in r.output
    r = invoke("instance", "stop", "cli-db-2", "-f", "value", "-c", "status")
    assert r.exit_code == 0 and r.output.strip() == "SHUTDOWN", r.output
    r = invoke("instance", "start", "cli-db-2", "-f", "value", "-c", "status")
    assert r.exit_code == 0 and r.output.strip() == "ACTIVE", r.output
    r = invoke("instance", "update", iid, "--no-deletion-protection", "--clear-tags", "-f", "value",
               "-c", "deletion_protection", "-c", "tags")
    assert r.exit_code == 0 and r.output.splitlines() == ["off", ""], r.output
    r = invoke("instance", "delete", "cli-db-2", "--final-backup", "last-words")
    assert r.exit_code == 0, r.output
    inst = until(lambda: sdk.get_instance(iid), lambda i: not i.task, timeout=60, what="delete ended",
                 interval=0.2)
    assert "final backup" in inst.fault.message  # the fake datastore has no backups: nothing deleted
    r = invoke("backup", "list", "--tag", "nope=1", "-f", "value", "-c", "id")
    assert r.exit_code == 0 and r.output.strip() == ""
    r = invoke("backup", "update", "last-words", "--tag", "why=final", "-f", "value", "-c", "tags")
    assert r.exit_code == 0 and r.output.strip() == "why=final", r.output
    assert invoke("backup", "list", "--tag", "why=final", "-f", "value", "-c", "name").output.split() == \
        ["last-words"]
    assert invoke("instance", "delete", iid).exit_code == 0


def test_rest_delete_with_a_final_backup_that_fails_keeps_the_instance_with_its_fault(rest, made):
    url, h = rest
    iid = made["id"]
    assert httpx.patch(f"{url}/instances/{iid}", headers=h,
                       json={"instance": {"deletion_protection": False}}).status_code == 202
    r = httpx.delete(f"{url}/instances/{iid}", params={"final_backup": "rest-final"}, headers=h)
    assert r.status_code == 202, r.text
    inst = until(lambda: trove_status(rest, iid), lambda i: i["status"] != "SHUTDOWN", timeout=60,
                 what="delete ended", interval=0.2)  # DELETING reads SHUTDOWN on Trove's wire
    assert inst["status"] == "ACTIVE" and "final backup" in inst["fault"]["message"]
    backups = httpx.get(f"{url}/backups", headers=h).json()["backups"]
    assert [b["status"] for b in backups if b["name"] == "rest-final"] == ["FAILED"]

    b = [b for b in backups if b["name"] == "rest-final"][0]
    r = httpx.patch(f"{url}/backups/{b['id']}", headers=h, json={"backup": {"tags": {"kept": "yes"}}})
    assert r.status_code == 200 and r.json()["backup"]["tags"] == {"kept": "yes"}, r.text
    r = httpx.patch(f"{url}/backups/{b['id']}", headers=h, json={"backup": {"tags": {"kept": "no;"}}})
    assert r.status_code == 400 and "backup.tags" in r.text
    r = httpx.put(f"{url}/backups/{b['id']}", headers=h, json={"backup": {"instance": "x"}})
    assert r.status_code == 400 and "backup.instance" in r.text
    assert [x["name"] for x in httpx.get(f"{url}/backups", params={"tag": "kept=yes"}, headers=h)
            .json()["backups"]] == ["rest-final"]

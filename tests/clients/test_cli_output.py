"""What the `reddwarf` CLI prints, against the in-process fake API: field/value tables that keep the id and
endpoint whole in 80 columns, full ids in lists, `-f value -c FIELD` and `--json` for scripts, and
resources named by id or display name (an ambiguous name is an error listing the ids)."""
from __future__ import annotations

import json
import uuid

import pytest
from rich.console import Console
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.v1 import database_pb2 as pb


def add_instance(state, name: str, host: str = "10.123.45.67") -> pb.Instance:
    ident = str(uuid.uuid4())
    inst = pb.Instance(name=f"instances/{ident}", id=ident, display_name=name, status=pb.INSTANCE_STATUS_ACTIVE,
                       flavor="flavors/small", volume=pb.Volume(size_gb=2), datastore="mariadb",
                       datastore_version="10.11", endpoints=[pb.Endpoint(host=host, port=33061)])
    state.instances[ident] = inst
    return inst


def add_backup(state, name: str, instance: pb.Instance) -> pb.Backup:
    ident = str(uuid.uuid4())
    b = pb.Backup(name=f"backups/{ident}", id=ident, display_name=name, instance=instance.name,
                  status=pb.BACKUP_STATUS_COMPLETED, datastore="mariadb", datastore_version="10.11")
    state.backups[ident] = b
    return b


@pytest.fixture
def state(api):
    return api[1]


@pytest.fixture
def invoke(client, monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=80))
    monkeypatch.setattr(cli.State, "factory", lambda: client)

    def run(*args: str):
        return CliRunner().invoke(cli.app, list(args), env={"COLUMNS": "80"})
    yield run


def test_show_prints_a_field_value_table_with_the_whole_id_and_endpoint_in_80_columns(state, invoke):
    inst = add_instance(state, "demo-db")
    r = invoke("instance", "show", inst.id)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert "Field" in lines[1] and "Value" in lines[1]
    assert any(inst.id in line and "id" in line for line in lines)
    assert any("10.123.45.67:33061" in line and "endpoint" in line for line in lines)
    assert any("name" in line and "demo-db" in line for line in lines)
    assert "…" not in r.output


def test_list_keeps_full_ids_in_80_columns(state, invoke):
    insts = [add_instance(state, f"a-rather-long-instance-name-{n}") for n in range(3)]
    r = invoke("instance", "list")
    assert r.exit_code == 0, r.output
    assert all(len(line) <= 80 for line in r.output.splitlines())
    for inst in insts:
        assert inst.id in r.output
    b = add_backup(state, "nightly", insts[0])
    r = invoke("backup", "list")
    assert r.exit_code == 0 and b.id in r.output and "…" not in r.output, r.output


def test_value_format_prints_exactly_the_chosen_fields(state, invoke):
    inst = add_instance(state, "demo-db")
    r = invoke("instance", "show", "demo-db", "-f", "value", "-c", "id")
    assert r.exit_code == 0 and r.output == inst.id + "\n", r.output
    r = invoke("instance", "show", inst.id, "-f", "value", "-c", "name", "-c", "endpoint")
    assert r.output == "demo-db\n10.123.45.67:33061\n"
    other = add_instance(state, "other")
    r = invoke("instance", "list", "-f", "value", "-c", "id", "-c", "name")
    assert sorted(r.output.splitlines()) == sorted([f"{inst.id} demo-db", f"{other.id} other"])
    r = invoke("instance", "show", inst.id, "-f", "value", "-c", "nope")
    assert r.exit_code == 2 and "no column nope" in r.output


def test_json_on_list_and_show_parses(state, invoke):
    inst = add_instance(state, "demo-db")
    r = invoke("instance", "show", "demo-db", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["id"] == inst.id
    r = invoke("instance", "list", "--json")
    assert [i["id"] for i in json.loads(r.output)] == [inst.id]
    r = invoke("instance", "list", "-f", "json", "-c", "id")
    assert json.loads(r.output) == [{"id": inst.id}]
    r = invoke("--json", "flavor", "list")  # the global flag still works
    assert len(json.loads(r.output)) == 7


def test_names_work_where_ids_do_and_ambiguous_names_list_the_ids(state, invoke):
    one = add_instance(state, "demo-db")
    r = invoke("instance", "show", "demo-db", "-f", "value", "-c", "id")
    assert r.output.strip() == one.id
    two = add_instance(state, "demo-db")
    r = invoke("instance", "show", "demo-db")
    assert r.exit_code == 2
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("error: INVALID_ARGUMENT: 2 instances are named 'demo-db'")
    assert one.id in last and two.id in last
    r = invoke("instance", "show", "no-such-db")
    assert r.exit_code == 2 and r.output.strip().splitlines()[-1].startswith("error: NOT_FOUND: instance")
    assert "(field: name)" in r.output
    # A display name the server could never read as an id (a slash) is looked up by name directly.
    slashed = add_instance(state, "team/db")
    assert invoke("instance", "show", "team/db", "-f", "value", "-c", "id").output.strip() == slashed.id


def test_backups_by_name(state, invoke):
    inst = add_instance(state, "demo-db")
    b = add_backup(state, "nightly", inst)
    r = invoke("backup", "show", "nightly", "-f", "value", "-c", "id", "-c", "datastore version")
    assert r.exit_code == 0 and r.output == f"{b.id}\n10.11\n", r.output
    r = invoke("backup", "list", "--instance", "demo-db", "-f", "value", "-c", "id")
    assert r.output.strip() == b.id
    add_backup(state, "nightly", inst)
    r = invoke("backup", "show", "nightly")
    assert r.exit_code == 2 and "2 backups are named 'nightly'" in r.output
    r = invoke("backup", "show", "weekly")
    assert r.exit_code == 2 and "NOT_FOUND: backup 'weekly' not found" in r.output


def test_sdk_find_helpers(state, client):
    inst = add_instance(state, "x")
    assert client.find_instance("x").id == inst.id
    assert client.instance_id(inst.name) == inst.id
    from reddwarf.client import InvalidArgument, NotFound
    with pytest.raises(NotFound):
        client.find_instance("instances/" + str(uuid.uuid4()))
    add_instance(state, "x")
    with pytest.raises(InvalidArgument):
        client.instance_id("x")


def test_create_keeps_the_instance_name_with_users_and_prints_fields(state, invoke, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("app-password-1\n")
    r = invoke("instance", "create", "shop-db", "--flavor", "f0", "--size", "1", "--user", "app=shop",
               "--password-file", str(pw), "--no-wait", "-f", "value", "-c", "name", "-c", "status")
    assert r.exit_code == 0, r.output
    assert r.output == "shop-db\nBUILD\n"  # the instance's name, not the last --user's

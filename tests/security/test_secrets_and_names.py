"""Secrets and names: tokens expire by default, the admin token is never printed, the CLI takes no secret on
its command line, ids are matched whole (no trailing newline) and `#mysql50#` database names are refused."""
from __future__ import annotations

import datetime as dt
import io
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from typer.testing import CliRunner

from reddwarf.client import cli
from reddwarf.common import names
from reddwarf.common.errors import InvalidArgument
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2, database_pb2, database_pb2_grpc
from tests.fixtures.errors import field_violations

THIRTY_DAYS = dt.timedelta(days=30)


@pytest.fixture(scope="module")
def admin(server):
    with server.channel(server.admin_files) as ch:
        yield admin_pb2_grpc.AdminStub(ch)


# -- tokens ------------------------------------------------------------------------------------------
def test_init_writes_the_admin_token_to_a_0600_file_and_never_prints_it(tmp_path) -> None:
    from reddwarf.server import db, main, models
    from reddwarf.server.settings import Settings
    settings = Settings(state_dir=str(tmp_path / "server"))
    out = io.StringIO()
    main.init(settings, out=out)
    token_path = tmp_path / "server" / "admin.token"
    token = token_path.read_text().strip()
    assert token and token not in out.getvalue()
    assert str(token_path) in out.getvalue()
    assert oct(token_path.stat().st_mode & 0o777) == "0o600"
    sessions = db.session_factory(db.make_engine(settings.db_url))
    with sessions() as s:
        row = s.query(models.Token).filter_by(admin=True).one()
        assert row.expires_at is not None
        assert abs(row.expires_at - (dt.datetime.utcnow() + THIRTY_DAYS)) < dt.timedelta(minutes=5)


def test_tokens_expire_by_default(server, admin) -> None:
    tid = "tttl"
    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    tok = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}"))
    expires = tok.expire_time.ToDatetime()
    assert abs(expires - (dt.datetime.utcnow() + THIRTY_DAYS)) < dt.timedelta(minutes=5)


def test_an_expired_token_is_unauthenticated(server, admin) -> None:
    tid = "texp"
    admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    secret = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}", ttl_seconds=1)).secret
    with server.channel() as ch:
        stub = database_pb2_grpc.CatalogStub(ch)
        stub.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=server.metadata(secret))
        time.sleep(2.1)
        with pytest.raises(grpc.RpcError) as e:
            stub.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=server.metadata(secret))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "expired" in (e.value.details() or "")


# -- names -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,field", [
    (lambda a: a.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id="tnl\n"))), "tenant.id"),
    (lambda a: a.RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(id="hnl\n",
                                                                                 address="127.0.0.1:1"))),
     "host.id"),
    (lambda a: a.RegisterHost(admin_pb2.RegisterHostRequest(host=admin_pb2.Host(id="hnl2",
                                                                                 address="127.0.0.1:1\n"))),
     "host.address"),
])
def test_ids_with_a_trailing_newline_are_refused_naming_the_field(admin, call, field) -> None:
    with pytest.raises(grpc.RpcError) as e:
        call(admin)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value)[0] == field


@pytest.mark.parametrize("name", ["#mysql50#x", "#MYSQL50#x", "#mysql50#"])
def test_mysql50_database_names_are_refused_naming_the_field(server, admin, name) -> None:
    tid = "tm50"
    try:
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS
    secret = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}")).secret
    with server.channel() as ch, pytest.raises(grpc.RpcError) as e:
        database_pb2_grpc.InstancesStub(ch).CreateInstance(database_pb2.CreateInstanceRequest(
            instance=database_pb2.Instance(display_name="m50", flavor="tiny", volume=database_pb2.Volume(size_gb=1)),
            databases=[common_pb2.Database(database=name)]), metadata=server.metadata(secret))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(e.value)[0] == "databases[0].database"


def test_name_validators_refuse_what_dollar_let_through() -> None:
    with pytest.raises(InvalidArgument) as e:
        names.validate_database("#mysql50#x", "databases[0].database")
    assert e.value.violations[0][0] == "databases[0].database"
    for host in ("%\n", "db-1\n", "10.0.0.0/255.0.0.0\n"):
        with pytest.raises(InvalidArgument):
            names.validate_host(host)
    from reddwarf.common.pki import validate_role_id
    with pytest.raises(InvalidArgument):
        validate_role_id("host", "h1\n")


# -- the CLI -----------------------------------------------------------------------------------------
class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            self.calls.append((name, args, kw))
            if name == "create_instance":
                return database_pb2.Instance(name="instances/x", id="x")
            if name.startswith("list_"):
                return []
            return common_pb2.User(user=str(args[1]) if len(args) > 1 else "")
        return call


@pytest.fixture
def fake(monkeypatch):
    c = FakeClient()
    monkeypatch.setattr(cli.State, "factory", lambda: c)
    return c


def run(*args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli.app, list(args), env={"REDDWARF_PASSWORD": "", **(env or {})})


@pytest.mark.parametrize("args", [
    ["--token", "rdt_secret", "flavor", "list"],
    ["user", "create", "inst", "bob", "--password", "pw-on-the-command-line"],
    ["user", "password", "inst", "bob", "--password", "pw-on-the-command-line"],
    ["instance", "create", "db", "--flavor", "tiny", "--user", "bob:pw-on-the-command-line", "--no-wait"],
])
def test_cli_refuses_secrets_on_its_command_line(fake, args) -> None:
    r = run(*args)
    assert r.exit_code != 0
    assert "command line" in r.output
    assert not [c for c in fake.calls if c[0] != "list_flavors"]


def test_cli_help_offers_no_secret_options() -> None:
    for args in (["--help"], ["user", "create", "--help"], ["user", "password", "--help"]):
        r = run(*args)
        assert "--password " not in r.output and "--token " not in r.output
        assert "--token-file" in r.output or "--password-file" in r.output


def test_cli_reads_passwords_from_the_environment_or_a_file(fake, tmp_path: Path) -> None:
    assert run("user", "create", "inst", "bob", env={"REDDWARF_PASSWORD": "from-env-1"}).exit_code == 0
    pw = tmp_path / "pw"
    pw.write_text("from-file-2\n")
    assert run("user", "password", "inst", "bob", "--password-file", str(pw)).exit_code == 0
    pws = tmp_path / "pws"
    pws.write_text("alice-pw\nbob-pw\n")
    r = run("instance", "create", "db", "--flavor", "tiny", "--user", "alice=shop,crm", "--user", "bob",
            "--password-file", str(pws), "--no-wait")
    assert r.exit_code == 0, r.output
    by = {c[0]: c for c in fake.calls}
    assert by["create_user"][1][2] == "from-env-1"
    assert by["change_password"][1][2] == "from-file-2"
    users = by["create_instance"][2]["users"]
    assert [(u.name, u.password, u.databases) for u in users] == [("alice", "alice-pw", ("shop", "crm")),
                                                                  ("bob", "bob-pw", ())]


def test_cli_without_a_password_source_or_terminal_says_how(fake) -> None:
    r = run("user", "create", "inst", "bob")
    assert r.exit_code != 0
    assert "--password-file" in r.output and "REDDWARF_PASSWORD" in r.output
    assert fake.calls == []


def test_cli_token_file(fake, tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("rdt_from_file\n")
    os.chmod(tok, 0o600)
    assert run("--token-file", str(tok), "flavor", "list").exit_code == 0
    assert cli.State.token == "rdt_from_file"

"""The tenant-facing MySQL CA through the SDK and the CLI against a real server: GetInstanceCa answers
the MySQL CA (not the deployment's internal one) to the owner only, `reddwarf instance ca -o FILE` saves
it, and a bad access.allowed_cidrs entry is INVALID_ARGUMENT naming its index; Trove's create body carries
access.allowed_cidrs."""
from __future__ import annotations

import pytest
from cryptography import x509
from typer.testing import CliRunner

from reddwarf.client import Client, ClientConfig, cli, trove
from reddwarf.client.errors import InvalidArgument, NotFound
from tests.fixtures.server import start_server

from .tenant import new_tenant


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("mysqlca")) as server:
        tokens = [new_tenant(server, p)[1] for p in ("a", "b")]
        yield server, tokens


def client(server, token: str) -> Client:
    f = server.client_files
    return Client(ClientConfig(endpoint=server.api, ca=str(f.ca), cert=str(f.cert), key=str(f.key), token=token))


def test_the_owner_gets_the_mysql_ca_and_the_cli_saves_it(env, tmp_path) -> None:
    server, (token, other) = env
    c = client(server, token)
    inst = c.create_instance("tls", "tiny", 1, allowed_cidrs=["10.0.0.0/8"], require_secure_transport=True)
    ca = c.get_instance_ca(inst.id)
    cert = x509.load_pem_x509_certificate(ca.ca_pem.encode())
    assert "MySQL" in cert.subject.rfc4514_string()
    assert ca.ca_pem.encode() != server.ca.cert_pem  # not the internal mTLS CA
    assert c.get_instance_ca(inst.id).ca_pem == ca.ca_pem  # made once
    with pytest.raises(NotFound):
        client(server, other).get_instance_ca(inst.id)
    f = server.client_files
    env_vars = {"REDDWARF_ENDPOINT": server.api, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert),
                "REDDWARF_KEY": str(f.key), "REDDWARF_TOKEN": token, "REDDWARF_CONFIG": "/nonexistent"}
    cli.State.factory = None
    out = tmp_path / "mysql-ca.pem"
    r = CliRunner().invoke(cli.app, ["instance", "ca", inst.id, "-o", str(out)], env=env_vars)
    assert r.exit_code == 0, r.output
    assert out.read_text() == ca.ca_pem


def test_a_bad_cidr_names_its_index(env) -> None:
    server, (token, _) = env
    with pytest.raises(InvalidArgument) as exc:
        client(server, token).create_instance("x", "tiny", 1, allowed_cidrs=["10.0.0.0/8", "300.0.0.0/8"])
    assert exc.value.field == "access.allowed_cidrs[1]"


def test_trove_create_body_carries_access_allowed_cidrs() -> None:
    body = {"name": "x", "flavorRef": "tiny", "volume": {"size": 1}, "access": {"allowed_cidrs": ["10.0.0.0/8"]}}
    assert trove.create_request(body).allowed_cidrs == ("10.0.0.0/8",)
    with pytest.raises(trove.BadInput):
        trove.create_request({**body, "access": {"allowed_cidrs": "10.0.0.0/8"}})

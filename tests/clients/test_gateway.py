"""The Trove v1.0 REST gateway as a real process in front of the real server: Trove's paths, bodies,
status codes and error shapes, the tenant check, and python-troveclient (unmodified) talking to it."""
from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import pytest

from tests.fixtures.gateway import start_gateway
from tests.fixtures.server import start_server

from .tenant import new_tenant


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("gw")) as server:
        tid, token = new_tenant(server, "t")
        with start_gateway(server.api, server.gateway_files, log=server.state_dir / "gateway.log") as base:
            yield base, tid, token, server


def test_version_discovery(gw):
    base, *_ = gw
    r = httpx.get(base + "/")
    assert r.status_code == 200 and r.json()["versions"][0]["id"] == "v1.0"


def test_flavors_in_trove_shape(gw):
    base, tid, token, _ = gw
    r = httpx.get(f"{base}/v1.0/{tid}/flavors", headers={"X-Auth-Token": token})
    assert r.status_code == 200
    flavors = {f["id"]: f for f in r.json()["flavors"]}
    assert flavors["small"]["ram"] == 512 and flavors["small"]["links"]
    r = httpx.get(f"{base}/v1.0/{tid}/datastores", headers={"X-Auth-Token": token})
    assert r.json()["datastores"][0]["versions"][0]["name"] == "10.11"


@pytest.mark.parametrize("headers,tenant,code", [({}, None, 401), ({"X-Auth-Token": "nope"}, None, 401),
                                                 (None, "someone-else", 403)])
def test_auth_errors(gw, headers, tenant, code):
    base, tid, token, _ = gw
    h = {"X-Auth-Token": token} if headers is None else headers
    r = httpx.get(f"{base}/v1.0/{tenant or tid}/flavors", headers=h)
    assert r.status_code == code
    assert list(r.json()) == [{401: "unauthorized", 403: "forbidden"}[code]]


def test_a_remembered_token_is_still_checked_on_every_request(gw):
    """The gateway remembers which tenant a token belongs to; that never lets it reach another tenant's path,
    and a token revoked after it was remembered is refused at once (the server checks it on every call)."""
    from reddwarf.v1 import admin_pb2, admin_pb2_grpc
    base, tid, _, server = gw
    admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
    tok = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}"))
    h = {"X-Auth-Token": tok.secret}
    assert httpx.get(f"{base}/v1.0/{tid}/flavors", headers=h).status_code == 200  # now remembered
    assert httpx.get(f"{base}/v1.0/someone-else/flavors", headers=h).status_code == 403
    admin.RevokeToken(admin_pb2.RevokeTokenRequest(name=tok.name))
    r = httpx.get(f"{base}/v1.0/{tid}/flavors", headers=h)
    assert r.status_code == 401 and "revoked" in r.text


def test_unknown_instance_is_item_not_found(gw):
    base, tid, token, _ = gw
    r = httpx.get(f"{base}/v1.0/{tid}/instances/{uuid.uuid4()}", headers={"X-Auth-Token": token})
    assert r.status_code == 404 and r.json()["itemNotFound"]["code"] == 404


@pytest.mark.parametrize("body,fragment", [
    (b"{not json", "not JSON"), (b'{"instance": 3}', "instance"),
    (b'{"instance": {"name": "x", "flavorRef": "huge", "volume": {"size": 1}}}', "flavor"),
    (b'{"instance": {"name": "x", "flavorRef": "tiny", "volume": {"size": "ten"}}}', "volume.size"),
    (b'{"instance": {"name": "x", "flavorRef": "tiny", "volume": {"size": 1}, '
     b'"databases": [{"name": "a`; DROP DATABASE mysql; --"}]}}', "database"),
])
def test_bad_create_bodies_are_trove_errors_and_create_nothing(gw, body, fragment):
    base, tid, token, _ = gw
    r = httpx.post(f"{base}/v1.0/{tid}/instances", content=body,
                   headers={"X-Auth-Token": token, "Content-Type": "application/json"})
    assert r.status_code in (400, 404)
    (kind, err), = r.json().items()
    assert kind in ("badRequest", "itemNotFound") and fragment in err["message"]
    assert httpx.get(f"{base}/v1.0/{tid}/instances", headers={"X-Auth-Token": token}).json() == {"instances": []}


def test_body_size_is_limited(gw):
    base, tid, token, _ = gw
    r = httpx.post(f"{base}/v1.0/{tid}/instances", content=b"x" * (2 << 20), headers={"X-Auth-Token": token})
    assert r.status_code == 413 and "overLimit" in r.json()


def test_openapi_describes_the_routes(gw):
    base, *_ = gw
    doc = httpx.get(base + "/openapi.json").json()
    assert "/v1.0/{tenant}/instances/{instance_id}/action" in doc["paths"]
    assert "post" in doc["paths"]["/v1.0/{tenant}/instances"]


def test_python_troveclient_lists_flavors_through_the_gateway(gw):
    from keystoneauth1 import session, token_endpoint
    from troveclient.v1 import client
    base, tid, token, _ = gw
    sess = session.Session(auth=token_endpoint.Token(f"{base}/v1.0/{tid}", token))
    trove = client.Client(session=sess)
    names = sorted(f.name for f in trove.flavors.list())
    assert names == ["large", "medium", "small", "tiny"]
    assert [i for i in trove.instances.list()] == []


def test_schemathesis_finds_no_server_errors(gw, tmp_path):
    """Property-based requests generated from the gateway's own OpenAPI document, for the token's own tenant
    (other tenants are a plain 403): no 5xx, whatever comes in."""
    import os
    import re
    base, tid, token, _ = gw
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(f'[parameters]\n"path.tenant" = "{tid}"\n')
    st = os.path.join(os.path.dirname(sys.executable), "st")
    r = subprocess.run([st, "--config-file", str(cfg), "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
                        "-H", f"X-Auth-Token: {token}", "--max-examples", "8", "--seed", "7", "--workers", "2",
                        "--phases", "examples,coverage,fuzzing"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays in tmp
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    ran = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert ran and int(ran.group(2)) > 100, r.stdout[-2000:]  # it really generated and checked requests
    assert "Authentication failed" not in r.stdout, r.stdout[-2000:]

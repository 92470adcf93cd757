"""The gateway's OpenAPI document describes every route's request and response bodies: it is a valid OpenAPI
3.1 document (openapi-spec-validator), it declares a schema for every route the gateway serves, real
responses of the running gateway (in front of a real server and a hostd with the fake drivers) validate
against the declared schemas, a body missing a field a Trove client reads does not, and schemathesis finds
the GET routes' responses conforming."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec

from reddwarf.client.gateway import build_routes
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.gateway import start_gateway
from tests.fixtures.waiting import until


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Cluster, dict[str, Any]]]:
    with start_cluster(tmp_path_factory.mktemp("openapi"), driver="fake") as c, \
            start_gateway(c.server.api, c.server.gateway_files) as base:
        doc = httpx.get(base + "/openapi.json").json()
        yield base, c, doc


def response_schema(doc: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    """The declared body schema, with the document's components beside it so its $refs resolve."""
    resp = doc["paths"][path][method.lower()]["responses"][str(status)]
    return {**resp["content"]["application/json"]["schema"], "components": doc["components"]}


def check(doc: dict[str, Any], path: str, method: str, response: httpx.Response) -> None:
    assert response.headers["content-type"].startswith("application/json"), response.text
    jsonschema.Draft202012Validator(response_schema(doc, path, method, response.status_code)).validate(
        response.json())


def test_the_document_is_valid_openapi_and_declares_every_route(gw) -> None:
    base, c, doc = gw
    validate_spec(doc)
    app = build_routes("127.0.0.1:1", c.server.gateway_files)
    served = {(r.path, m) for r in app.routes for m in (getattr(r, "methods", None) or {"GET"}) - {"HEAD"}
              if r.path != "/openapi.json"}
    documented = {(p, m.upper()) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert not op.get("x-undeclared"), f"{method.upper()} {path} has no declared schemas"
            ok = [code for code in op["responses"] if code.startswith("2")]
            assert ok, f"{method.upper()} {path} declares no success response"
            if method in ("post", "put", "patch") and not path.endswith("/root"):
                assert op["requestBody"]["content"]["application/json"]["schema"], f"{method} {path}"
            if path.startswith("/v1.0/{tenant}/"):
                assert "$ref" in op["responses"]["404"]["content"]["application/json"]["schema"]


def test_real_responses_validate_against_the_declared_schemas(gw) -> None:
    base, c, doc = gw
    t = "/v1.0/{tenant}"
    rest = httpx.Client(base_url=f"{base}/v1.0/{c.tenant}", headers={"X-Auth-Token": c.token}, timeout=60)
    with rest:
        create_body = {"instance": {"name": "schema-db", "flavorRef": "tiny", "volume": {"size": 1},
                                    "databases": [{"name": "shop"}],
                                    "users": [{"name": "app", "password": "app-pw-123",
                                               "databases": [{"name": "shop"}]}]}}
        request_schema = {**doc["paths"][t + "/instances"]["post"]["requestBody"]["content"]["application/json"]
                          ["schema"], "components": doc["components"]}
        jsonschema.Draft202012Validator(request_schema).validate(create_body)
        # What `openstack database instance create` sends (troveclient's body, nulls and extra members included).
        jsonschema.Draft202012Validator(request_schema).validate({"instance": {
            "name": "x", "flavorRef": "tiny", "volume": {"size": 1, "type": None}, "databases": [{"name": "shop"}],
            "users": [{"name": "app", "password": "pw", "databases": [{"name": "shop"}]}],
            "datastore": {"type": "mariadb", "version": "10.11"}, "nics": [], "access": {"is_public": False},
            "modules": [], "locality": None, "services": ["memcached"]}})
        with pytest.raises(jsonschema.ValidationError):  # the schema refuses what the gateway refuses
            jsonschema.Draft202012Validator(request_schema).validate({"instance": {"flavorRef": "tiny"}})
        made = rest.post("/instances", json=create_body)
        assert made.status_code == 200, made.text
        check(doc, t + "/instances", "POST", made)
        iid = made.json()["instance"]["id"]
        until(lambda: rest.get(f"/instances/{iid}").json()["instance"]["status"], lambda s: s == "ACTIVE", 60)
        backup = rest.post("/backups", json={"backup": {"name": "b", "instance": iid}})
        check(doc, t + "/backups", "POST", backup)
        bid = backup.json()["backup"]["id"]
        until(lambda: rest.get(f"/backups/{bid}").json()["backup"]["status"],
              lambda s: s in ("COMPLETED", "FAILED"), 60)  # the fake datastore has no backups: FAILED
        i = "/instances/{instance_id}"
        for path, url in [("/limits", "/limits"), ("/flavors", "/flavors"), ("/flavors/{flavor_id}", "/flavors/tiny"),
                          ("/datastores", "/datastores"), ("/datastores/{datastore}/versions",
                                                           "/datastores/mariadb/versions"),
                          ("/instances", "/instances"), (i, f"/instances/{iid}"),
                          (i + "/databases", f"/instances/{iid}/databases"), (i + "/users", f"/instances/{iid}/users"),
                          (i + "/users/{user}", f"/instances/{iid}/users/app"),
                          (i + "/users/{user}/databases", f"/instances/{iid}/users/app/databases"),
                          (i + "/root", f"/instances/{iid}/root"), ("/backups", "/backups"),
                          ("/backups/{backup_id}", f"/backups/{bid}")]:
            r = rest.get(url)
            assert r.status_code == 200, (url, r.text)
            check(doc, t + path, "GET", r)
        # Configuration groups and their parameters (the configuration work's routes).
        group = rest.post("/configurations", json={"configuration": {
            "name": "g", "values": {"max_connections": 120}, "datastore": {"type": "mariadb", "version": "10.11"}}})
        assert group.status_code == 200, group.text
        check(doc, t + "/configurations", "POST", group)
        gid = group.json()["configuration"]["id"]
        for path, url in [("/configurations", "/configurations"), ("/configurations/{configuration_id}",
                                                                    f"/configurations/{gid}"),
                          ("/configurations/{configuration_id}/instances", f"/configurations/{gid}/instances"),
                          ("/datastores/{datastore}/versions/{version}/parameters",
                           "/datastores/mariadb/versions/10.11/parameters"),
                          ("/datastores/{datastore}/versions/{version}/parameters/{name}",
                           "/datastores/mariadb/versions/10.11/parameters/max_connections"),
                          ("/datastores/versions/{version}/parameters", "/datastores/versions/10.11/parameters"),
                          (i + "/configuration", f"/instances/{iid}/configuration")]:
            r = rest.get(url)
            assert r.status_code == 200, (url, r.text)
            check(doc, t + path, "GET", r)
        assert rest.delete(f"/configurations/{gid}").status_code == 202
        root = rest.post(f"/instances/{iid}/root")
        check(doc, t + i + "/root", "POST", root)
        for path in ("/", "/v1.0"):
            check(doc, path, "GET", httpx.get(base + path))
        # Errors are Trove faults, as declared.
        check(doc, t + i, "GET", rest.get(f"/instances/{uuid.uuid4()}"))
        check(doc, t + "/instances", "POST", rest.post("/instances", json={"instance": {"name": "x"}}))
        check(doc, t + "/flavors", "GET", httpx.get(f"{base}/v1.0/{c.tenant}/flavors"))  # 401

        # A body missing a field troveclient reads (a backup's datastore version_id) fails the declared schema.
        b = rest.get(f"/backups/{bid}").json()
        del b["backup"]["datastore"]["version_id"]
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.Draft202012Validator(response_schema(doc, t + "/backups/{backup_id}", "GET", 200)).validate(b)
        rest.delete(f"/backups/{bid}")
        assert rest.delete(f"/instances/{iid}").status_code == 202
        until(lambda: rest.get("/instances").json()["instances"], lambda left: left == [], 60)


def test_schemathesis_finds_the_get_routes_conforming(gw, tmp_path) -> None:
    """schemathesis against the running gateway: every GET route's responses (200s for the tenant's own
    listings, 404 faults for generated ids) conform to the declared status codes and body schemas."""
    base, c, _ = gw
    cfg = tmp_path / "schemathesis.toml"
    cfg.write_text(f'[parameters]\n"path.tenant" = "{c.tenant}"\n')
    st = os.path.join(os.path.dirname(sys.executable), "st")
    r = subprocess.run([st, "--config-file", str(cfg), "run", f"{base}/openapi.json", "--include-method", "GET",
                        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                        "response_schema_conformance", "-H", f"X-Auth-Token: {c.token}", "--max-examples", "5",
                        "--seed", "11", "--phases", "examples,fuzzing"],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-1000:]
    ran = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert ran and int(ran.group(2)) > 20, r.stdout[-2000:]

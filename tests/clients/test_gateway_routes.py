"""The gateway's dict dispatch (clients/gateway_routes.py) picks the route Starlette's regex list would, for every
route and method and for the paths that tell them apart; whatever it does not settle goes to Starlette."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from starlette.routing import Match, Route

from reddwarf.client.gateway import build_routes, not_allowed, not_found
from reddwarf.client.gateway_routes import DictRouter
from reddwarf.common.pki import TlsFiles

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def app_and_router() -> tuple[Any, DictRouter]:
    app = build_routes("127.0.0.1:1", TlsFiles(Path("cert"), Path("key"), Path("ca")))
    return app, DictRouter(app, {404: not_found, 405: not_allowed})


def starlette_choice(app: Any, method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    """What Starlette's Router runs: the first route in order that matches fully (path and method)."""
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    for r in app.routes:
        match, child = r.matches(scope)
        if match is Match.FULL:
            return r, child["path_params"]
    return None


def paths(app: Any) -> list[str]:
    out = ["/", "/v1.0", "/v1.0/", "//", "", "/v1.0/t1/flavors/", "/v1.0//flavors", "/v1.0/t1/flavors/a/b",
           "/v1.0/t1/datastores/versions/11.8/parameters",          # {version} alone, or {datastore}="versions"?
           "/v1.0/t1/datastores/versions/versions/11.8/parameters",  # {datastore}="versions"
           "/v1.0/t1/datastores/versions/11.8/parameters/x",
           "/v1.0/t1/mgmt/instances/i1/action", "/v1.0/t1/instances/i1/users/u1/databases/d1",
           "/v2.0/t1/flavors", "/openapi.json", "/nothing", "/v1.0/t1/instances/i%2F1"]
    for r in app.routes:
        out.append(r.path.replace("{", "").replace("}", ""))  # each parameter filled with its own name
    return out


def test_the_dict_picks_what_starlette_picks_for_every_route_method_and_tricky_path() -> None:
    app, router = app_and_router()
    checked = 0
    for path in paths(app):
        for method in METHODS:
            want = starlette_choice(app, method, path)
            got = router.match(method, path)
            if want is None:
                assert got is None, (method, path)
                continue
            assert got is not None, (method, path)
            entry, params = got
            route, want_params = want
            assert params == want_params, (method, path)
            assert entry.methods == frozenset(route.methods or ()), (method, path)
            # The same endpoint, or, for a sync one, Starlette runs it.
            assert entry.endpoint is route.endpoint or entry.endpoint is None, (method, path)
            checked += 1
    assert checked > 60  # every route matched at least once under its own methods


def call(router: DictRouter, method: str, path: str) -> tuple[int, dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(b"host", b"gw")], "http_version": "1.1", "scheme": "http", "server": ("gw", 80),
             "client": ("c", 1), "root_path": "", "asgi": {"version": "3.0"}}
    asyncio.run(router(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body)


def test_what_the_dict_does_not_settle_is_answered_by_starlette_as_before() -> None:
    _, router = app_and_router()
    assert call(router, "GET", "/v1.0/") == (200, {"version": {
        "id": "v1.0", "status": "CURRENT", "updated": "2012-08-01T00:00:00Z",
        "links": [{"href": "http://gw/v1.0/", "rel": "self"}]}})
    status, body = call(router, "GET", "/nothing")
    assert status == 404 and body["itemNotFound"]["message"] == "no such resource: /nothing"
    status, body = call(router, "POST", "/v1.0/t1/flavors")
    assert status == 405 and body["computeFault"]["message"] == "POST is not allowed on /v1.0/t1/flavors"
    # A route the dict settles, without a token: the gateway's own 401, not Starlette's.
    status, body = call(router, "GET", "/v1.0/t1/flavors/small")
    assert status == 401 and "X-Auth-Token" in body["unauthorized"]["message"]

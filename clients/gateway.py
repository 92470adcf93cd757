"""`reddwarf-gateway`: a thin REST layer that speaks OpenStack Trove's v1.0 JSON over the gRPC API, built
on the SDK's AsyncClient.

Each request's `X-Auth-Token` becomes the client's bearer token; the gateway's own certificate (role
`gateway`) is transport only and grants nothing. The `{tenant}` in the path must be the token's tenant.
Errors answer with the HTTP status of their row in the one error table (reddwarf.common.errors) and Trove's
bodies ({"itemNotFound": {"code": 404, "message": ...}}).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reddwarf.common import errors
from reddwarf.common.pki import TlsFiles
from reddwarf.common.tls import aio_channel

from . import trove
from .aio import AsyncClient
from .config import ClientConfig

MAX_BODY = 1 << 20
# Every call's deadline: longer than anything the server does before it answers (its guest commands give
# up after 120 s), so the server's own error is what the caller sees.
CALL_TIMEOUT = 300.0

Handler = Callable[[Request, AsyncClient], Awaitable[Response]]


def error(code: int, message: str) -> JSONResponse:
    return JSONResponse(trove.fault(code, message), status_code=code)


def from_error(err: errors.RedDwarfError) -> JSONResponse:
    """The Trove error for a failed call or a refused request, by its row in the error table."""
    if err.http_status == 500:
        return error(500, "internal error")  # its text is for the server's log, not the caller
    message = err.message
    if err.violations:
        message += " (field: " + ", ".join(field for field, _ in err.violations) + ")"
    return error(err.http_status, message)


class Gateway:
    def __init__(self, api_address: str, files: TlsFiles) -> None:
        self.api_address, self.files = api_address, files

    async def start(self) -> None:
        # grpc.aio channels belong to the event loop that creates them: the server's, at startup.
        self.channel = aio_channel(self.api_address, self.files)
        self.client = AsyncClient(ClientConfig(endpoint=self.api_address, timeout=CALL_TIMEOUT),
                                  channel=self.channel)

    async def stop(self) -> None:
        await self.channel.close()

    # -- plumbing --------------------------------------------------------------------------------
    async def _client(self, request: Request) -> AsyncClient:
        """The client calling as the request's token, once the token is known to own the path's tenant."""
        token = request.headers.get("x-auth-token", "").strip()
        if not token:
            raise errors.Unauthenticated("X-Auth-Token is required")
        rd = self.client.with_token(token)
        tenant = request.path_params.get("tenant")
        if tenant is not None:
            caller = await rd.get_caller()
            if caller.tenant != f"tenants/{tenant}" and not caller.admin:
                raise errors.PermissionDenied(f"the token does not belong to tenant {tenant}")
        return rd

    @staticmethod
    async def _json(request: Request, key: str | None = None) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise errors.ResourceExhausted(f"request body larger than {MAX_BODY} bytes")
        try:
            data = json.loads(body or b"null")
        except ValueError:
            raise errors.InvalidArgument("malformed request body: not JSON") from None
        if key is not None:
            if not isinstance(data, dict) or not isinstance(data.get(key), dict | list):
                raise errors.InvalidArgument(f"request body must be a JSON object with a {key!r} member")
            return data[key]
        return data

    def route(self, fn: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request, await self._client(request))
            except errors.RedDwarfError as e:
                return from_error(e)
        return handler

    @staticmethod
    def _instance(request: Request) -> str:
        return str(request.path_params["instance_id"])

    @staticmethod
    def _user(request: Request) -> str:
        return str(request.path_params["user"])

    # -- catalog ---------------------------------------------------------------------------------
    async def list_flavors(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"flavors": [trove.flavor(f, request) for f in await rd.list_flavors()]})

    async def get_flavor(self, request: Request, rd: AsyncClient) -> Response:
        f = await rd.get_flavor(request.path_params["flavor_id"])
        return JSONResponse({"flavor": trove.flavor(f, request)})

    async def list_datastores(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"datastores": [trove.datastore(d) for d in await rd.list_datastores()]})

    async def list_versions(self, request: Request, rd: AsyncClient) -> Response:
        d = await rd.get_datastore(request.path_params["datastore"])
        return JSONResponse({"versions": trove.datastore(d)["versions"]})

    # -- instances -------------------------------------------------------------------------------
    async def create_instance(self, request: Request, rd: AsyncClient) -> Response:
        c = trove.create_request(await self._json(request, "instance"))
        inst = await rd.create_instance(c.name, c.flavor, c.size_gb, databases=c.databases, users=c.users,
                                        datastore=c.datastore, datastore_version=c.datastore_version,
                                        restore_from=c.restore_from, allowed_cidrs=c.allowed_cidrs)
        return JSONResponse({"instance": trove.instance(inst, request)}, status_code=200)

    async def list_instances(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"instances": [trove.instance(i, request) async for i in rd.list_instances()]})

    async def get_instance(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"instance": trove.instance(await rd.get_instance(self._instance(request)), request)})

    async def delete_instance(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_instance(self._instance(request))
        return Response(status_code=202)

    async def action(self, request: Request, rd: AsyncClient) -> Response:
        body = await self._json(request)
        instance = self._instance(request)
        if not isinstance(body, dict) or len(body) != 1:
            raise errors.InvalidArgument("action body must hold exactly one action: restart or resize")
        if "restart" in body:
            await rd.restart_instance(instance)
        elif "resize" in body and isinstance(body["resize"], dict):
            r = body["resize"]
            if "flavorRef" in r:
                await rd.resize_flavor(instance, trove.ref_id(r["flavorRef"], "flavorRef"))
            elif isinstance(r.get("volume"), dict) and "size" in r["volume"]:
                await rd.resize_volume(instance, trove.int_field(r["volume"]["size"], "volume.size"))
            else:
                raise errors.InvalidArgument("resize needs flavorRef or volume.size")
        else:
            raise errors.InvalidArgument("unknown action; expected restart or resize")
        return Response(status_code=202)

    # -- databases / users / root ----------------------------------------------------------------
    async def list_databases(self, request: Request, rd: AsyncClient) -> Response:
        dbs = await rd.list_databases(self._instance(request))
        return JSONResponse({"databases": [trove.database(d) for d in dbs]})

    async def create_databases(self, request: Request, rd: AsyncClient) -> Response:
        for d in trove.databases(await self._json(request, "databases")):
            await rd.create_database(self._instance(request), d)
        return Response(status_code=202)

    async def delete_database(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_database(self._instance(request), request.path_params["name"])
        return Response(status_code=202)

    async def list_users(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"users": [trove.user(u) for u in await rd.list_users(self._instance(request))]})

    async def create_users(self, request: Request, rd: AsyncClient) -> Response:
        for u in trove.users(await self._json(request, "users")):
            await rd.create_user(self._instance(request), u.name, u.password, u.host, u.databases)
        return Response(status_code=202)

    async def change_passwords(self, request: Request, rd: AsyncClient) -> Response:
        for u in trove.users(await self._json(request, "users")):
            await rd.change_password(self._instance(request), u.name, u.password, u.host or "%")
        return Response(status_code=202)

    async def get_user(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"user": trove.user(await rd.get_user(self._instance(request), self._user(request)))})

    async def delete_user(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_user(self._instance(request), self._user(request))
        return Response(status_code=202)

    async def user_databases(self, request: Request, rd: AsyncClient) -> Response:
        names = await rd.list_access(self._instance(request), self._user(request))
        return JSONResponse({"databases": [{"name": d} for d in names]})

    async def grant(self, request: Request, rd: AsyncClient) -> Response:
        dbs = trove.databases(await self._json(request, "databases"))
        await rd.grant_access(self._instance(request), self._user(request), [d.name for d in dbs])
        return Response(status_code=202)

    async def revoke(self, request: Request, rd: AsyncClient) -> Response:
        await rd.revoke_access(self._instance(request), self._user(request), request.path_params["name"])
        return Response(status_code=202)

    async def enable_root(self, request: Request, rd: AsyncClient) -> Response:
        creds = await rd.enable_root(self._instance(request))
        return JSONResponse({"user": {"name": creds.user, "password": creds.password}})

    async def root_status(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"rootEnabled": await rd.root_enabled(self._instance(request))})

    async def disable_root(self, request: Request, rd: AsyncClient) -> Response:
        await rd.disable_root(self._instance(request))
        return Response(status_code=204)

    # -- backups ---------------------------------------------------------------------------------
    async def create_backup(self, request: Request, rd: AsyncClient) -> Response:
        b = trove.backup_request(await self._json(request, "backup"))
        out = await rd.create_backup(b.instance, b.name, b.description, b.parent)
        return JSONResponse({"backup": trove.backup(out)}, status_code=202)

    async def list_backups(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"backups": [trove.backup(b) async for b in rd.list_backups()]})

    async def get_backup(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"backup": trove.backup(await rd.get_backup(request.path_params["backup_id"]))})

    async def delete_backup(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_backup(request.path_params["backup_id"])
        return Response(status_code=202)


async def versions(request: Request) -> Response:
    base = str(request.base_url).rstrip("/")
    v = {"id": "v1.0", "status": "CURRENT", "updated": "2012-08-01T00:00:00Z",
         "links": [{"href": f"{base}/v1.0/", "rel": "self"}]}
    return JSONResponse({"versions": [v]} if request.url.path in ("", "/") else {"version": v})


def build_app(api_address: str, files: TlsFiles) -> Starlette:
    g = Gateway(api_address, files)
    t = "/v1.0/{tenant}"
    i = t + "/instances/{instance_id}"
    R = Route
    routes = [
        R("/", versions), R("/v1.0", versions), R("/v1.0/", versions),
        R("/openapi.json", lambda r: JSONResponse(trove.openapi(routes_spec))),
        R(t + "/flavors", g.route(g.list_flavors)), R(t + "/flavors/{flavor_id}", g.route(g.get_flavor)),
        R(t + "/datastores", g.route(g.list_datastores)),
        R(t + "/datastores/{datastore}/versions", g.route(g.list_versions)),
        R(t + "/instances", g.route(g.list_instances), methods=["GET"]),
        R(t + "/instances", g.route(g.create_instance), methods=["POST"]),
        R(i, g.route(g.get_instance), methods=["GET"]), R(i, g.route(g.delete_instance), methods=["DELETE"]),
        R(i + "/action", g.route(g.action), methods=["POST"]),
        R(i + "/databases", g.route(g.list_databases), methods=["GET"]),
        R(i + "/databases", g.route(g.create_databases), methods=["POST"]),
        R(i + "/databases/{name}", g.route(g.delete_database), methods=["DELETE"]),
        R(i + "/users", g.route(g.list_users), methods=["GET"]),
        R(i + "/users", g.route(g.create_users), methods=["POST"]),
        R(i + "/users", g.route(g.change_passwords), methods=["PUT"]),
        R(i + "/users/{user}", g.route(g.get_user), methods=["GET"]),
        R(i + "/users/{user}", g.route(g.delete_user), methods=["DELETE"]),
        R(i + "/users/{user}/databases", g.route(g.user_databases), methods=["GET"]),
        R(i + "/users/{user}/databases", g.route(g.grant), methods=["PUT"]),
        R(i + "/users/{user}/databases/{name}", g.route(g.revoke), methods=["DELETE"]),
        R(i + "/root", g.route(g.enable_root), methods=["POST"]),
        R(i + "/root", g.route(g.root_status), methods=["GET"]),
        R(i + "/root", g.route(g.disable_root), methods=["DELETE"]),
        R(t + "/backups", g.route(g.list_backups), methods=["GET"]),
        R(t + "/backups", g.route(g.create_backup), methods=["POST"]),
        R(t + "/backups/{backup_id}", g.route(g.get_backup), methods=["GET"]),
        R(t + "/backups/{backup_id}", g.route(g.delete_backup), methods=["DELETE"]),
    ]
    routes_spec = [(r.path, sorted((r.methods or {"GET"}) - {"HEAD"})) for r in routes if r.path.startswith("/v1.0/")]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no such resource: {request.url.path}")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await g.start()
        yield
        await g.stop()

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed}, lifespan=lifespan)


def main(argv: list[str] | None = None) -> int:
    import uvicorn
    p = argparse.ArgumentParser(prog="reddwarf-gateway")
    p.add_argument("--listen", default=os.environ.get("REDDWARF_GATEWAY_LISTEN", "127.0.0.1:8778"))
    p.add_argument("--api", default=os.environ.get("REDDWARF_ENDPOINT", "127.0.0.1:8779"))
    p.add_argument("--cert", default=os.environ.get("REDDWARF_GATEWAY_CERT", ""))
    p.add_argument("--key", default=os.environ.get("REDDWARF_GATEWAY_KEY", ""))
    p.add_argument("--ca", default=os.environ.get("REDDWARF_CA", ""))
    a = p.parse_args(argv)
    if not (a.cert and a.key and a.ca):
        raise SystemExit("reddwarf-gateway needs --cert, --key and --ca (its gateway certificate)")
    host, _, port = a.listen.rpartition(":")
    uvicorn.run(build_app(a.api, TlsFiles(Path(a.cert), Path(a.key), Path(a.ca))), host=host, port=int(port),
                log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`reddwarf-gateway`: a thin REST layer that speaks OpenStack Trove's v1.0 JSON over the gRPC API.

Each request's `X-Auth-Token` becomes the gRPC bearer token; the gateway's own certificate (role
`gateway`) is transport only and grants nothing. The `{tenant}` in the path must be the token's tenant.
gRPC errors map onto Trove's status codes and bodies ({"itemNotFound": {"code": 404, "message": ...}}).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reddwarf.common.pki import TlsFiles
from reddwarf.common.tls import aio_channel
from reddwarf.v1 import database_pb2, database_pb2_grpc

from . import trove

MAX_BODY = 1 << 20
ERROR_NAMES = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound", 409: "conflictingRequest",
               413: "overLimit", 422: "unprocessableEntity", 500: "instanceFault", 503: "serviceUnavailable"}
GRPC_TO_HTTP = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.NOT_FOUND: 404,
                grpc.StatusCode.ALREADY_EXISTS: 409, grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
                grpc.StatusCode.FAILED_PRECONDITION: 422, grpc.StatusCode.UNAVAILABLE: 503,
                grpc.StatusCode.DEADLINE_EXCEEDED: 503}


class HttpError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def error(code: int, message: str) -> JSONResponse:
    return JSONResponse({ERROR_NAMES.get(code, "computeFault"): {"code": code, "message": message}}, status_code=code)


def from_rpc(exc: grpc.aio.AioRpcError) -> JSONResponse:
    code = GRPC_TO_HTTP.get(exc.code(), 500)
    message = exc.details() or exc.code().name
    st = rpc_status.from_call(exc)  # type: ignore[arg-type]
    for d in st.details if st else []:
        br = error_details_pb2.BadRequest()
        if d.Unpack(br) and br.field_violations:
            message += " (field: " + ", ".join(v.field for v in br.field_violations) + ")"
    if code == 500:
        message = "internal error"
    return error(code, message)


class Gateway:
    def __init__(self, api_address: str, files: TlsFiles) -> None:
        self.api_address, self.files = api_address, files

    async def start(self) -> None:
        # grpc.aio channels belong to the event loop that creates them: the server's, at startup.
        self.channel = aio_channel(self.api_address, self.files)
        self.catalog = database_pb2_grpc.CatalogStub(self.channel)
        self.instances = database_pb2_grpc.InstancesStub(self.channel)
        self.databases = database_pb2_grpc.DatabasesStub(self.channel)
        self.users = database_pb2_grpc.UsersStub(self.channel)
        self.root = database_pb2_grpc.RootStub(self.channel)
        self.backups = database_pb2_grpc.BackupsStub(self.channel)

    # -- plumbing --------------------------------------------------------------------------------
    async def _auth(self, request: Request) -> tuple[tuple[str, str], ...]:
        token = request.headers.get("x-auth-token", "").strip()
        if not token:
            raise HttpError(401, "X-Auth-Token is required")
        md = (("authorization", f"Bearer {token}"),)
        tenant = request.path_params.get("tenant")
        if tenant is not None:
            caller = await self.catalog.GetCaller(database_pb2.GetCallerRequest(), metadata=md, timeout=30)
            if caller.tenant != f"tenants/{tenant}" and not caller.admin:
                raise HttpError(403, f"the token does not belong to tenant {tenant}")
        return md

    async def _json(self, request: Request, key: str | None = None) -> Any:
        body = await request.body()
        if len(body) > MAX_BODY:
            raise HttpError(413, f"request body larger than {MAX_BODY} bytes")
        try:
            data = json.loads(body or b"null")
        except ValueError:
            raise HttpError(400, "malformed request body: not JSON") from None
        if key is not None:
            if not isinstance(data, dict) or not isinstance(data.get(key), dict | list):
                raise HttpError(400, f"request body must be a JSON object with a {key!r} member")
            return data[key]
        return data

    def route(self, fn: Callable[[Request, tuple[tuple[str, str], ...]], Awaitable[Response]]):  # type: ignore[no-untyped-def]
        async def handler(request: Request) -> Response:
            try:
                md = await self._auth(request)
                return await fn(request, md)
            except HttpError as e:
                return error(e.code, e.message)
            except grpc.aio.AioRpcError as e:
                return from_rpc(e)
            except trove.BadInput as e:
                return error(400, str(e))
        return handler

    @staticmethod
    def _iname(request: Request) -> str:
        return f"instances/{request.path_params['instance_id']}"

    @staticmethod
    async def _all(rpc: Any, request_type: Any, field: str, md: Any) -> list[Any]:
        """Every item of a paged gRPC list: Trove's list calls return whole collections."""
        items: list[Any] = []
        token = ""
        while True:
            resp = await rpc(request_type(page_token=token), metadata=md)
            items += list(getattr(resp, field))
            token = resp.next_page_token
            if not token:
                return items

    # -- catalog ---------------------------------------------------------------------------------
    async def list_flavors(self, request: Request, md: Any) -> Response:
        flavors = await self._all(self.catalog.ListFlavors, database_pb2.ListFlavorsRequest, "flavors", md)
        return JSONResponse({"flavors": [trove.flavor(f, request) for f in flavors]})

    async def get_flavor(self, request: Request, md: Any) -> Response:
        f = await self.catalog.GetFlavor(database_pb2.GetFlavorRequest(name=f"flavors/{request.path_params['flavor_id']}"),
                                         metadata=md)
        return JSONResponse({"flavor": trove.flavor(f, request)})

    async def list_datastores(self, request: Request, md: Any) -> Response:
        resp = await self.catalog.ListDatastores(database_pb2.ListDatastoresRequest(), metadata=md)
        return JSONResponse({"datastores": [trove.datastore(d) for d in resp.datastores]})

    async def list_versions(self, request: Request, md: Any) -> Response:
        d = await self.catalog.GetDatastore(database_pb2.GetDatastoreRequest(
            name=f"datastores/{request.path_params['datastore']}"), metadata=md)
        return JSONResponse({"versions": trove.datastore(d)["versions"]})

    # -- instances -------------------------------------------------------------------------------
    async def create_instance(self, request: Request, md: Any) -> Response:
        body = await self._json(request, "instance")
        inst = await self.instances.CreateInstance(trove.create_request(body), metadata=md)
        return JSONResponse({"instance": trove.instance(inst, request)}, status_code=200)

    async def list_instances(self, request: Request, md: Any) -> Response:
        items = await self._all(self.instances.ListInstances, database_pb2.ListInstancesRequest, "instances", md)
        return JSONResponse({"instances": [trove.instance(i, request) for i in items]})

    async def get_instance(self, request: Request, md: Any) -> Response:
        i = await self.instances.GetInstance(database_pb2.GetInstanceRequest(name=self._iname(request)), metadata=md)
        return JSONResponse({"instance": trove.instance(i, request)})

    async def delete_instance(self, request: Request, md: Any) -> Response:
        await self.instances.DeleteInstance(database_pb2.DeleteInstanceRequest(name=self._iname(request)), metadata=md)
        return Response(status_code=202)

    async def action(self, request: Request, md: Any) -> Response:
        body = await self._json(request)
        name = self._iname(request)
        if not isinstance(body, dict) or len(body) != 1:
            raise HttpError(400, "action body must hold exactly one action: restart or resize")
        if "restart" in body:
            await self.instances.RestartInstance(database_pb2.RestartInstanceRequest(name=name), metadata=md)
        elif "resize" in body and isinstance(body["resize"], dict):
            r = body["resize"]
            if "flavorRef" in r:
                await self.instances.ResizeInstance(database_pb2.ResizeInstanceRequest(
                    name=name, flavor=trove.ref_id(r["flavorRef"], "flavorRef")), metadata=md)
            elif isinstance(r.get("volume"), dict) and "size" in r["volume"]:
                await self.instances.ResizeVolume(database_pb2.ResizeVolumeRequest(
                    name=name, size_gb=trove.int_field(r["volume"]["size"], "volume.size")), metadata=md)
            else:
                raise HttpError(400, "resize needs flavorRef or volume.size")
        else:
            raise HttpError(400, "unknown action; expected restart or resize")
        return Response(status_code=202)

    # -- databases / users / root ----------------------------------------------------------------
    async def list_databases(self, request: Request, md: Any) -> Response:
        resp = await self.databases.ListDatabases(database_pb2.ListDatabasesRequest(parent=self._iname(request)),
                                                  metadata=md)
        return JSONResponse({"databases": [trove.database(d) for d in resp.databases]})

    async def create_databases(self, request: Request, md: Any) -> Response:
        dbs = await self._json(request, "databases")
        for d in trove.databases(dbs):
            await self.databases.CreateDatabase(database_pb2.CreateDatabaseRequest(parent=self._iname(request),
                                                                                   database=d), metadata=md)
        return Response(status_code=202)

    async def delete_database(self, request: Request, md: Any) -> Response:
        await self.databases.DeleteDatabase(database_pb2.DeleteDatabaseRequest(
            name=f"{self._iname(request)}/databases/{request.path_params['name']}"), metadata=md)
        return Response(status_code=202)

    def _uname(self, request: Request) -> str:
        user = request.path_params["user"]
        return f"{self._iname(request)}/users/{user if '@' in user else user + '@%'}"

    async def list_users(self, request: Request, md: Any) -> Response:
        resp = await self.users.ListUsers(database_pb2.ListUsersRequest(parent=self._iname(request)), metadata=md)
        return JSONResponse({"users": [trove.user(u) for u in resp.users]})

    async def create_users(self, request: Request, md: Any) -> Response:
        for u in trove.users(await self._json(request, "users")):
            await self.users.CreateUser(database_pb2.CreateUserRequest(parent=self._iname(request), user=u), metadata=md)
        return Response(status_code=202)

    async def change_passwords(self, request: Request, md: Any) -> Response:
        for u in trove.users(await self._json(request, "users")):
            await self.users.UpdateUser(database_pb2.UpdateUserRequest(
                name=f"{self._iname(request)}/users/{u.user}@{u.host or '%'}", password=u.password), metadata=md)
        return Response(status_code=202)

    async def get_user(self, request: Request, md: Any) -> Response:
        u = await self.users.GetUser(database_pb2.GetUserRequest(name=self._uname(request)), metadata=md)
        return JSONResponse({"user": trove.user(u)})

    async def delete_user(self, request: Request, md: Any) -> Response:
        await self.users.DeleteUser(database_pb2.DeleteUserRequest(name=self._uname(request)), metadata=md)
        return Response(status_code=202)

    async def user_databases(self, request: Request, md: Any) -> Response:
        resp = await self.users.ListAccess(database_pb2.ListAccessRequest(name=self._uname(request)), metadata=md)
        return JSONResponse({"databases": [{"name": d} for d in resp.databases]})

    async def grant(self, request: Request, md: Any) -> Response:
        dbs = trove.databases(await self._json(request, "databases"))
        await self.users.GrantAccess(database_pb2.GrantAccessRequest(name=self._uname(request),
                                                                     databases=[d.database for d in dbs]), metadata=md)
        return Response(status_code=202)

    async def revoke(self, request: Request, md: Any) -> Response:
        await self.users.RevokeAccess(database_pb2.RevokeAccessRequest(
            name=self._uname(request), database=request.path_params["name"]), metadata=md)
        return Response(status_code=202)

    async def enable_root(self, request: Request, md: Any) -> Response:
        creds = await self.root.EnableRoot(database_pb2.EnableRootRequest(name=self._iname(request)), metadata=md)
        return JSONResponse({"user": {"name": creds.user, "password": creds.password}})

    async def root_status(self, request: Request, md: Any) -> Response:
        st = await self.root.GetRootStatus(database_pb2.GetRootStatusRequest(name=self._iname(request)), metadata=md)
        return JSONResponse({"rootEnabled": st.enabled})

    async def disable_root(self, request: Request, md: Any) -> Response:
        await self.root.DisableRoot(database_pb2.DisableRootRequest(name=self._iname(request)), metadata=md)
        return Response(status_code=204)

    # -- backups ---------------------------------------------------------------------------------
    async def create_backup(self, request: Request, md: Any) -> Response:
        b = trove.backup_request(await self._json(request, "backup"))
        out = await self.backups.CreateBackup(database_pb2.CreateBackupRequest(backup=b), metadata=md)
        return JSONResponse({"backup": trove.backup(out)}, status_code=202)

    async def list_backups(self, request: Request, md: Any) -> Response:
        items = await self._all(self.backups.ListBackups, database_pb2.ListBackupsRequest, "backups", md)
        return JSONResponse({"backups": [trove.backup(b) for b in items]})

    async def get_backup(self, request: Request, md: Any) -> Response:
        b = await self.backups.GetBackup(database_pb2.GetBackupRequest(name=f"backups/{request.path_params['backup_id']}"),
                                         metadata=md)
        return JSONResponse({"backup": trove.backup(b)})

    async def delete_backup(self, request: Request, md: Any) -> Response:
        await self.backups.DeleteBackup(database_pb2.DeleteBackupRequest(
            name=f"backups/{request.path_params['backup_id']}"), metadata=md)
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
        await g.channel.close()

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
    from pathlib import Path
    host, _, port = a.listen.rpartition(":")
    uvicorn.run(build_app(a.api, TlsFiles(Path(a.cert), Path(a.key), Path(a.ca))), host=host, port=int(port),
                log_level="warning")
    return 0



if __name__ == "__main__":
    sys.exit(main())

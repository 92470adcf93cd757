"""`reddwarf-gateway`: a thin REST layer that speaks OpenStack Trove's v1.0 JSON over the gRPC API, built
on the SDK's AsyncClient.

Each request's `X-Auth-Token` becomes the client's bearer token; the gateway's own certificate (role
`gateway`) is transport only and grants nothing. The `{tenant}` in the path must be the token's tenant.
Errors answer with the HTTP status of their row in the one error table (reddwarf.common.errors) and Trove's
bodies ({"itemNotFound": {"code": 404, "message": ...}}); the server's API rate limit is 429 with Retry-After.

What a hostile client meets before any handler runs:
- TLS (uvicorn's ssl options, TLS 1.2 or later) with --tls-cert/--tls-key; without them the gateway
  listens on loopback only and refuses to start on any other address;
- bodies: a declared Content-Length over max_body is 413 before a byte of the body is read; any body
  (a lying length, chunked) is read as it streams and refused at max_body + 1 bytes; a body that needs
  parsing without Content-Length or chunked framing is 411; a body must arrive whole within body_timeout
  of the first read (408), and the rest of a refused body is discarded for at most body_timeout before
  the connection is closed;
- connections: at most limit_concurrency (uvicorn answers 503 beyond), a request head at most
  max_header_bytes (431 beyond) that must be complete within header_timeout of the connection or of its first
  byte (uvicorn has only the idle keep-alive timeout, so the protocol adds this deadline), idle
  keep-alive connections closed after keep_alive_timeout. The protocol (clients/gateway_http.py) is uvicorn's
  httptools one with these added;
- framing: a doubled or malformed Content-Length, Content-Length with Transfer-Encoding, an HTTP/1.1 request
  without exactly one Host: 400 and the connection closed.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import ipaddress
import json
import math
import os
import re
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reddwarf.common import config, errors
from reddwarf.common.pki import TlsFiles

from . import trove, trove_configurations, trove_schemas
from .aio import AsyncClient
from .config import ClientConfig
from .gateway_http import guarded_protocol
from .gateway_routes import DictRouter
from .resources import maintenance_window

MAX_BODY = 1 << 20
# Every call's deadline: longer than anything the server does before it answers (its guest commands give
# up after 120 s), so the server's own error is what the caller sees.
# Tokens whose tenant the gateway remembers (see Gateway._owner).
CALLERS_KEPT = 10_000
CALL_TIMEOUT = 300.0
# A caller's X-Request-Id (or X-Openstack-Request-Id) passed on to the event history when it looks like one.
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")

Handler = Callable[[Request, AsyncClient], Awaitable[Response]]


@dataclass(frozen=True)
class GatewaySettings:
    """The gateway's settings: defaults < REDDWARF_GATEWAY_<NAME> (REDDWARF_ENDPOINT / REDDWARF_CA for api and
    ca) < flags."""
    cert: str = ""                      # the gateway's client certificate for the API (role gateway)
    key: str = ""
    ca: str = ""
    api: str = "127.0.0.1:8779"
    listen: str = "127.0.0.1:8778"
    tls_cert: str = ""                  # HTTPS certificate chain (PEM); required off loopback
    tls_key: str = ""
    max_body: int = MAX_BODY            # bytes of a request body
    limit_concurrency: int = 100        # open connections + running requests; beyond them uvicorn answers 503
    max_header_bytes: int = 16 * 1024   # a request line and its headers (431 beyond)
    header_timeout: float = 10.0        # seconds for a whole request head
    body_timeout: float = 30.0          # seconds for a whole body, from the first read of it
    keep_alive_timeout: int = 5         # seconds an idle keep-alive connection stays open

    def __post_init__(self) -> None:
        for key in ("max_body", "limit_concurrency", "max_header_bytes", "header_timeout", "body_timeout",
                    "keep_alive_timeout"):
            if not getattr(self, key) > 0:
                raise config.ConfigError(f"{key} must be more than 0, got {getattr(self, key)!r}", key=key)

    @classmethod
    def load(cls, env: dict[str, str] | None = None, overrides: dict[str, Any] | None = None) -> GatewaySettings:
        env = dict(os.environ) if env is None else env
        base = {"api": env.get("REDDWARF_ENDPOINT") or None, "ca": env.get("REDDWARF_CA") or None}
        return config.build(cls, ("environment", base),
                            ("environment", config.env_values(cls, env, "REDDWARF_GATEWAY_")),
                            ("flags", overrides or {}))


def is_loopback(host: str) -> bool:
    """Whether host names only this machine: localhost or a loopback address (not 0.0.0.0, not a name)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_listen(s: GatewaySettings) -> tuple[str, int]:
    """(host, port) to listen on, or SystemExit when the settings would serve plain HTTP off loopback."""
    host, sep, port = s.listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"reddwarf-gateway: --listen must be host:port, got {s.listen!r}")
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SystemExit("reddwarf-gateway: --tls-cert and --tls-key go together")
    if not s.tls_cert and not is_loopback(host):
        raise SystemExit(f"reddwarf-gateway: refusing to listen on {s.listen} without TLS: tokens would cross "
                         "the network in clear. Give --tls-cert and --tls-key (REDDWARF_GATEWAY_TLS_CERT/_KEY) "
                         "or listen on loopback (127.0.0.1, ::1, localhost)")
    return host.strip("[]"), int(port)


def error(code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(trove.fault(code, message), status_code=code, headers=headers)


def from_error(err: errors.RedDwarfError) -> JSONResponse:
    """The Trove error for a failed call or a refused request, by its row in the error table (a rate limit,
    ResourceExhausted with a retry delay, is 429 with Retry-After)."""
    status = errors.http_status_of(err)
    if status == 500:
        return error(500, "internal error")  # its text is for the server's log, not the caller
    message = err.message
    if err.violations:
        message += " (field: " + ", ".join(field for field, _ in err.violations) + ")"
    if status == 429 and err.retry_after is not None:
        after = str(max(1, math.ceil(err.retry_after)))
        body = trove.fault(429, message)
        body["overLimit"]["retryAfter"] = after
        return JSONResponse(body, status_code=429, headers={"Retry-After": after})
    return error(status, message)


class BodyTooLarge(errors.ResourceExhausted):
    """A request body past the gateway's cap (413)."""


class LengthRequired(errors.InvalidArgument, http_status=411):
    """A body to parse that has neither Content-Length nor chunked framing."""


class BodyTimeout(errors.DeadlineExceeded, http_status=408):
    """A body that stopped arriving."""


class BodyLimit:
    """ASGI middleware in front of the app: Content-Length checked before anything is read, the body counted
    as it streams in and refused at max_body + 1 bytes (whatever its headers said), the whole body due
    within body_timeout of the first read. The app sees BodyTooLarge / BodyTimeout raised from receive()
    and answers them (Gateway.route turns them into 413 / 408)."""

    def __init__(self, app: ASGIApp, max_body: int, body_timeout: float) -> None:
        self.app, self.max_body, self.body_timeout = app, max_body, body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lengths = set()
        framed = False  # a body comes only with Content-Length or Transfer-Encoding (RFC 9112 6.3)
        for k, v in scope["headers"]:
            if k == b"content-length":
                lengths.add(v.strip())
            elif k == b"transfer-encoding":
                framed = True
        if not lengths and not framed:  # no body: nothing to count or wait for (most GETs and DELETEs)
            await self.app(scope, receive, send)
            return
        if lengths:
            # The HTTP parser already refuses a malformed or doubled Content-Length; this holds without it too.
            value = lengths.pop() if len(lengths) == 1 else b""
            if not value.isdigit() or len(value) > 18:
                await error(400, "malformed Content-Length")(scope, receive, send)
                return
            if int(value) > self.max_body:
                await error(413, f"request body of {int(value)} bytes is larger than {self.max_body}")(
                    scope, receive, send)
                return
        seen = 0
        done = False
        deadline: float | None = None
        max_body, timeout = self.max_body, self.body_timeout

        async def capped() -> Message:
            nonlocal seen, done, deadline
            if done:  # the body is in: what follows is http.disconnect, whenever it comes
                return await receive()
            if seen > max_body:
                raise BodyTooLarge(f"request body larger than {max_body} bytes")
            # One deadline for the whole body from the app's first read: a byte now and then does not
            # keep a slow body alive.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout if deadline is None else deadline
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise BodyTimeout(f"request body not received within {timeout:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > max_body:
                    raise BodyTooLarge(f"request body larger than {max_body} bytes")
            else:
                done = True
            return message

        await self.app(scope, capped, send)


class Gateway:
    def __init__(self, api_address: str, files: TlsFiles) -> None:
        self.api_address, self.files = api_address, files
        self._owners: dict[bytes, tuple[str, bool]] = {}  # sha256(token) → (tenant, admin); see _owner

    async def start(self) -> None:
        # grpc.aio channels belong to the event loop that creates them: the server's, at startup.
        # The SDK's own channel: api may list several servers, balanced and retried as the SDK does.
        self.client = AsyncClient(ClientConfig(endpoint=self.api_address, ca=str(self.files.ca),
                                               cert=str(self.files.cert), key=str(self.files.key),
                                               timeout=CALL_TIMEOUT))

    async def stop(self) -> None:
        await self.client.close()

    # -- plumbing --------------------------------------------------------------------------------
    async def _client(self, request: Request) -> AsyncClient:
        """The client calling as the request's token, once the token is known to own the path's tenant."""
        token = request.headers.get("x-auth-token", "").strip()
        if not token:
            raise errors.Unauthenticated("X-Auth-Token is required")
        rd = self.client.with_token(token)
        rid = request.headers.get("x-request-id") or request.headers.get("x-openstack-request-id") or ""
        if REQUEST_ID.fullmatch(rid):  # anything else is not passed on (gRPC metadata is printable ASCII)
            rd = rd.with_request_id(rid)
        tenant = request.path_params.get("tenant")
        if tenant is not None:
            owner = await self._owner(rd, token)
            if owner[0] != f"tenants/{tenant}" and not owner[1]:
                raise errors.PermissionDenied(f"the token does not belong to tenant {tenant}")
        return rd

    async def _owner(self, rd: AsyncClient, token: str) -> tuple[str, bool]:
        """(tenant, admin) of a token, asked of the server once per token: which tenant a token belongs to never
        changes, and the server still authenticates the token on every call this request makes (a revoked or
        expired token is refused there), so the answer can be kept. Bounded: past CALLERS_KEPT it starts over."""
        key = hashlib.sha256(token.encode()).digest()
        owner = self._owners.get(key)
        if owner is None:
            caller = await rd.get_caller()
            owner = (caller.tenant, caller.admin)
            if len(self._owners) >= CALLERS_KEPT:
                self._owners.clear()
            self._owners[key] = owner
        return owner

    @staticmethod
    async def _json(request: Request, key: str | None = None) -> Any:
        if "content-length" not in request.headers and "chunked" not in request.headers.get(
                "transfer-encoding", "").lower():
            raise LengthRequired("a request body needs Content-Length (or chunked transfer encoding)")
        # BodyLimit counts what streams in and stops at its cap; this keeps the pieces, never more.
        chunks = [chunk async for chunk in request.stream()]
        body = b"".join(chunks)
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

    async def limits(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"limits": trove.limits(await rd.get_limits())})

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
                                        restore_from=c.restore_from, allowed_cidrs=c.allowed_cidrs, tags=c.tags,
                                        deletion_protection=c.deletion_protection, configuration=c.configuration,
                                        services=c.services, maintenance_window=maintenance_window(c.maintenance_window))
        return JSONResponse({"instance": trove.instance(inst, request)}, status_code=200)

    async def list_instances(self, request: Request, rd: AsyncClient) -> Response:
        tags = request.query_params.getlist("tag")  # ?tag=env=prod&tag=team: all must match
        return JSONResponse({"instances": [trove.instance(i, request) async for i in rd.list_instances(tags=tags)]})

    async def update_instance(self, request: Request, rd: AsyncClient) -> Response:
        """Trove's PUT/PATCH /instances/{id} {"instance": {"name": ...}}, plus deletion_protection and tags, and
        `configuration` (attach a group by id, detach with null: apply_instance_configuration)."""
        body = await self._json(request, "instance")
        if isinstance(body, dict) and "configuration" in body:
            # As in Trove, a configuration change goes alone: one call, all or nothing.
            if len(body) > 1:
                raise trove.BadInput("instance.configuration is changed on its own, not with "
                                     + ", ".join(sorted(set(body) - {"configuration"})))
            await self.apply_instance_configuration(rd, self._instance(request), body)
            return Response(status_code=202)
        if isinstance(body, dict) and "maintenance_window" in body:
            # Our extension, changed on its own like `configuration`.
            if len(body) > 1:
                raise trove.BadInput("instance.maintenance_window is changed on its own, not with "
                                     + ", ".join(sorted(set(body) - {"maintenance_window"})))
            w = trove.window_field(body, "instance")
            if w is None:
                raise trove.BadInput("instance.maintenance_window must be an object")
            await rd.set_maintenance_window(self._instance(request), *w)
            return Response(status_code=202)
        if isinstance(body, dict) and "datastore_version" in body:
            # Trove's upgrade: PATCH {"instance": {"datastore_version": "11.8"}}, alone as in Trove.
            if len(body) > 1:
                raise trove.BadInput("instance.datastore_version is changed on its own, not with "
                                     + ", ".join(sorted(set(body) - {"datastore_version"})))
            version = body["datastore_version"]
            if not isinstance(version, str) or not version:
                raise trove.BadInput("instance.datastore_version must be a version name such as \"11.8\"")
            await rd.upgrade_instance(self._instance(request), version)
            return Response(status_code=202)
        u = trove.update_request(body)
        await rd.update_instance(self._instance(request), name=u.name, deletion_protection=u.deletion_protection,
                                 tags=u.tags)
        return Response(status_code=202)

    async def get_instance(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"instance": trove.instance(await rd.get_instance(self._instance(request)), request)})

    async def delete_instance(self, request: Request, rd: AsyncClient) -> Response:
        # ?final_backup=NAME: a DELETE has no body, so the final backup's name comes as a query parameter.
        await rd.delete_instance(self._instance(request), final_backup=request.query_params.get("final_backup"))
        return Response(status_code=202)

    async def action(self, request: Request, rd: AsyncClient) -> Response:
        body = await self._json(request)
        instance = self._instance(request)
        if not isinstance(body, dict) or len(body) != 1:
            raise errors.InvalidArgument("action body must hold exactly one action: restart, resize, stop or start")
        if "restart" in body:
            await rd.restart_instance(instance)
        elif "stop" in body:  # Trove's mgmt action {"stop": {}}; here for the tenant too, as RDS has it
            await rd.stop_instance(instance)
        elif "start" in body:
            await rd.start_instance(instance)
        elif "apply_pending_maintenance" in body:  # our extension: run pending maintenance now
            arg = body["apply_pending_maintenance"]
            kinds = arg.get("kinds") if isinstance(arg, dict) else None
            if kinds is not None and (not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds)):
                raise errors.InvalidArgument("apply_pending_maintenance.kinds must be a list of strings",
                                             field="kinds")
            await rd.apply_pending_maintenance(instance, kinds or ())
        elif "resize" in body and isinstance(body["resize"], dict):
            r = body["resize"]
            if "flavorRef" in r:
                await rd.resize_flavor(instance, trove.ref_id(r["flavorRef"], "flavorRef"))
            elif isinstance(r.get("volume"), dict) and "size" in r["volume"]:
                await rd.resize_volume(instance, trove.int_field(r["volume"]["size"], "volume.size"))
            else:
                raise errors.InvalidArgument("resize needs flavorRef or volume.size")
        else:
            raise errors.InvalidArgument("unknown action; expected restart, resize, stop, start or "
                                         "apply_pending_maintenance")
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
        out = await rd.create_backup(b.instance, b.name, b.description, b.parent, tags=b.tags)
        return JSONResponse({"backup": trove.backup(out)}, status_code=202)

    async def list_backups(self, request: Request, rd: AsyncClient) -> Response:
        tags = request.query_params.getlist("tag")
        return JSONResponse({"backups": [trove.backup(b) async for b in rd.list_backups(tags=tags)]})

    async def get_backup(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"backup": trove.backup(await rd.get_backup(request.path_params["backup_id"]))})

    async def update_backup(self, request: Request, rd: AsyncClient) -> Response:
        u = trove.backup_update_request(await self._json(request, "backup"))
        out = await rd.update_backup(request.path_params["backup_id"], name=u.name, description=u.description,
                                     tags=u.tags)
        return JSONResponse({"backup": trove.backup(out)})

    async def delete_backup(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_backup(request.path_params["backup_id"])
        return Response(status_code=202)

    # -- configuration groups (clients/trove_configurations.py) ----------------------------------
    @staticmethod
    def _group(request: Request) -> str:
        return str(request.path_params["configuration_id"])

    async def list_configurations(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"configurations": [trove_configurations.configuration(g, request)
                                                for g in await rd.list_configurations()]})

    async def create_configuration(self, request: Request, rd: AsyncClient) -> Response:
        name, values, description, datastore, version = trove_configurations.create_request(
            await self._json(request, "configuration"))
        g = await rd.create_configuration(name, values, description, datastore, version)
        return JSONResponse({"configuration": trove_configurations.configuration(g, request)})

    async def get_configuration(self, request: Request, rd: AsyncClient) -> Response:
        g = await rd.get_configuration(self._group(request))
        return JSONResponse({"configuration": trove_configurations.configuration(g, request)})

    async def update_configuration(self, request: Request, rd: AsyncClient) -> Response:
        """PUT replaces the group's values, PATCH sets them on top (Trove's update and edit)."""
        body = await self._json(request, "configuration")
        if not isinstance(body, dict):
            raise trove.BadInput("configuration must be an object")
        values = trove_configurations.values_from_json(body.get("values", {}), "configuration.values")
        for key in ("name", "description"):
            if body.get(key) is not None and not isinstance(body[key], str):
                raise trove.BadInput(f"configuration.{key} must be a string")
        await rd.update_configuration(self._group(request), values, merge=request.method == "PATCH",
                                      name=body.get("name") or None, description=body.get("description"))
        return Response(status_code=202)

    async def delete_configuration(self, request: Request, rd: AsyncClient) -> Response:
        await rd.delete_configuration(self._group(request))
        return Response(status_code=202)

    async def configuration_instances(self, request: Request, rd: AsyncClient) -> Response:
        members = await rd.list_configuration_instances(self._group(request))
        return JSONResponse({"instances": [{"id": m.id, "name": m.display_name} for m in members]})

    async def _version_of(self, rd: AsyncClient, version: str) -> str:
        """The datastore of a version given alone (Trove's /datastores/versions/{id}/parameters)."""
        owners = [d.id for d in await rd.list_datastores() if any(v.version == version for v in d.versions)]
        if len(owners) != 1:
            raise errors.NotFound(f"datastore version {version!r} is {'ambiguous' if owners else 'unknown'}; "
                                  "name its datastore", field="version")
        return owners[0]

    async def list_parameters(self, request: Request, rd: AsyncClient) -> Response:
        version = str(request.path_params["version"])
        ds = str(request.path_params.get("datastore") or await self._version_of(rd, version))
        params = await rd.list_parameters(ds, version)
        return JSONResponse({"configuration-parameters": [trove_configurations.parameter(p) for p in params]})

    async def get_parameter(self, request: Request, rd: AsyncClient) -> Response:
        version = str(request.path_params["version"])
        ds = str(request.path_params.get("datastore") or await self._version_of(rd, version))
        p = await rd.get_parameter(ds, version, str(request.path_params["name"]))
        return JSONResponse(trove_configurations.parameter(p))

    async def instance_configuration(self, request: Request, rd: AsyncClient) -> Response:
        """Trove's GET /instances/{id}/configuration: the values the instance's group sets."""
        inst = await rd.get_instance(self._instance(request))
        values: dict[str, Any] = {}
        if inst.configuration:
            g = await rd.get_configuration(inst.configuration)
            values = trove_configurations.typed(g.datastore, g.datastore_version, dict(g.values))
        return JSONResponse({"instance": {"configuration": values}})

    async def apply_instance_configuration(self, rd: AsyncClient, instance: str, body: dict[str, Any]) -> bool:
        """The `configuration` member of an instance PUT/PATCH: an id attaches that group, null detaches.
        False when the body has none (for an instance update handler that also takes other members)."""
        if "configuration" not in body:
            return False
        ref = body["configuration"]
        if ref is None:
            await rd.detach_configuration(instance)
        else:
            await rd.attach_configuration(instance, trove.ref_id(ref, "instance.configuration"))
        return True
    # -- guest logs ------------------------------------------------------------------------------
    async def list_logs(self, request: Request, rd: AsyncClient) -> Response:
        return JSONResponse({"logs": [trove.guest_log(g) for g in await rd.list_logs(self._instance(request))]})

    async def log_action(self, request: Request, rd: AsyncClient) -> Response:
        """Trove's POST /log: enable or disable, publish (save into the backup store), or, with none of
        them, show. Discard has nothing to do: every save is an object of its own, none accumulates."""
        a = trove.log_action(await self._json(request))
        instance = self._instance(request)
        if a.enable:
            g = await rd.enable_log(instance, a.name)
        elif a.disable:
            g = await rd.disable_log(instance, a.name)
        else:
            g = await rd.get_log(instance, a.name)
        saved = await rd.save_log(instance, a.name) if a.publish else None
        return JSONResponse({"log": trove.guest_log(g, saved)})


async def versions(request: Request) -> Response:
    base = str(request.base_url).rstrip("/")
    v = {"id": "v1.0", "status": "CURRENT", "updated": "2012-08-01T00:00:00Z",
         "links": [{"href": f"{base}/v1.0/", "rel": "self"}]}
    return JSONResponse({"versions": [v]} if request.url.path in ("", "/") else {"version": v})


async def not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"no such resource: {request.url.path}")


async def not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}")


def build_app(api_address: str, files: TlsFiles, max_body: int = MAX_BODY, body_timeout: float = 30.0) -> ASGIApp:
    """The gateway's ASGI app: the Trove routes, dispatched from a dict (clients/gateway_routes.py), behind
    BodyLimit."""
    return BodyLimit(DictRouter(build_routes(api_address, files), {404: not_found, 405: not_allowed}),
                     max_body, body_timeout)


def build_routes(api_address: str, files: TlsFiles) -> Starlette:
    g = Gateway(api_address, files)
    t = "/v1.0/{tenant}"
    i = t + "/instances/{instance_id}"
    R = Route
    routes = [
        R("/", versions), R("/v1.0", versions), R("/v1.0/", versions),
        R("/openapi.json", lambda r: JSONResponse(trove_schemas.openapi(routes_spec))),
        R(t + "/limits", g.route(g.limits), methods=["GET"]),
        R(t + "/flavors", g.route(g.list_flavors)), R(t + "/flavors/{flavor_id}", g.route(g.get_flavor)),
        R(t + "/datastores", g.route(g.list_datastores)),
        R(t + "/datastores/{datastore}/versions", g.route(g.list_versions)),
        R(t + "/instances", g.route(g.list_instances), methods=["GET"]),
        R(t + "/instances", g.route(g.create_instance), methods=["POST"]),
        R(i, g.route(g.get_instance), methods=["GET"]), R(i, g.route(g.delete_instance), methods=["DELETE"]),
        R(i, g.route(g.update_instance), methods=["PUT", "PATCH"]),
        R(i + "/action", g.route(g.action), methods=["POST"]),
        R(t + "/mgmt/instances/{instance_id}/action", g.route(g.action), methods=["POST"]),
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
        R(i + "/log", g.route(g.list_logs), methods=["GET"]),
        R(i + "/log", g.route(g.log_action), methods=["POST"]),
        R(t + "/backups", g.route(g.list_backups), methods=["GET"]),
        R(t + "/backups", g.route(g.create_backup), methods=["POST"]),
        R(t + "/backups/{backup_id}", g.route(g.get_backup), methods=["GET"]),
        R(t + "/backups/{backup_id}", g.route(g.delete_backup), methods=["DELETE"]),
        R(t + "/backups/{backup_id}", g.route(g.update_backup), methods=["PUT", "PATCH"]),
        R(t + "/configurations", g.route(g.list_configurations), methods=["GET"]),
        R(t + "/configurations", g.route(g.create_configuration), methods=["POST"]),
        R(t + "/configurations/{configuration_id}", g.route(g.get_configuration), methods=["GET"]),
        R(t + "/configurations/{configuration_id}", g.route(g.update_configuration), methods=["PUT", "PATCH"]),
        R(t + "/configurations/{configuration_id}", g.route(g.delete_configuration), methods=["DELETE"]),
        R(t + "/configurations/{configuration_id}/instances", g.route(g.configuration_instances), methods=["GET"]),
        R(t + "/datastores/{datastore}/versions/{version}/parameters", g.route(g.list_parameters)),
        R(t + "/datastores/{datastore}/versions/{version}/parameters/{name}", g.route(g.get_parameter)),
        R(t + "/datastores/versions/{version}/parameters", g.route(g.list_parameters)),
        R(t + "/datastores/versions/{version}/parameters/{name}", g.route(g.get_parameter)),
        R(i + "/configuration", g.route(g.instance_configuration), methods=["GET"]),
    ]
    routes_spec = [(r.path, sorted((r.methods or {"GET"}) - {"HEAD"})) for r in routes if r.path != "/openapi.json"]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await g.start()
        yield
        await g.stop()

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed}, lifespan=lifespan)


def _tls12(cfg: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    ctx = default()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def uvicorn_config(s: GatewaySettings) -> uvicorn.Config:
    """The uvicorn.Config for the settings (SystemExit for plain HTTP off loopback)."""
    host, port = check_listen(s)
    app = build_app(s.api, TlsFiles(Path(s.cert), Path(s.key), Path(s.ca)), s.max_body, s.body_timeout)
    tls: dict[str, Any] = ({"ssl_certfile": s.tls_cert, "ssl_keyfile": s.tls_key, "ssl_context_factory": _tls12}
                           if s.tls_cert else {})
    return uvicorn.Config(app, host=host, port=port, log_level="warning", ws="none", lifespan="on",
                          http=guarded_protocol(s.max_header_bytes, s.header_timeout, s.body_timeout),
                          limit_concurrency=s.limit_concurrency, timeout_keep_alive=s.keep_alive_timeout,
                          server_header=False, **tls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reddwarf-gateway", description="Settings also come from "
                                "REDDWARF_GATEWAY_<NAME> (REDDWARF_ENDPOINT and REDDWARF_CA for --api and --ca). --api may "
                                "list several servers, comma-separated.")
    for name in ("listen", "api", "cert", "key", "ca", "tls-cert", "tls-key"):
        p.add_argument(f"--{name}")
    for name, kind in (("max-body", int), ("limit-concurrency", int), ("max-header-bytes", int),
                       ("header-timeout", float), ("body-timeout", float), ("keep-alive-timeout", int)):
        p.add_argument(f"--{name}", type=kind)
    try:
        s = GatewaySettings.load(overrides={k: v for k, v in vars(p.parse_args(argv)).items() if v is not None})
    except config.ConfigError as exc:
        raise SystemExit(f"reddwarf-gateway: {exc}") from None
    if not (s.cert and s.key and s.ca):
        raise SystemExit("reddwarf-gateway needs --cert, --key and --ca (its gateway certificate)")
    uvicorn.Server(uvicorn_config(s)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Who is calling the API port, from the verified certificate and nothing else a peer can forge.

- every call needs a client certificate from the deployment CA (gRPC enforces the chain; we read the
  spiffe identity and refuse serials revoked in the certificates table);
- an `admin` certificate is an admin principal;
- a `client` or `gateway` certificate is transport only: the caller adds `authorization: Bearer <token>`;
  tokens are looked up by SHA-256 (never stored in clear), expired or revoked ones refused (tokens expire
  by default, `token_expiry`); an admin token makes an admin principal;
- `server`, `host`, `instance` and `monitor` certificates never act on the public or admin API: a stolen
  guest key cannot list anyone's instances, nor a scraper's key act as a tenant;
- the standard health and reflection services are open to any valid certificate.
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
import inspect
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.clock import now as _now
from reddwarf.common.errors import PermissionDenied, RedDwarfError, Unauthenticated, abort
from reddwarf.common.pki import Identity
from reddwarf.common.tls import peer_identity

from . import models
from .app import Context

ADMIN_TENANT = "admin"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
ADMIN_SERVICE = "/reddwarf.v1.Admin/"
MACHINE_ROLES = ("server", "host", "instance", "monitor")


@dataclass(frozen=True)
class Principal:
    tenant_id: str | None
    admin: bool
    identity: Identity

    @property
    def caller_key(self) -> str:
        """Stable caller id for binding page tokens."""
        return f"{self.identity.uri}|{self.tenant_id or ''}|{int(self.admin)}"


_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)


def current_principal(context: Context | None = None) -> Principal:
    p = _principal.get()
    if p is None:  # only reachable if a servicer is mounted without the interceptor
        raise Unauthenticated("no authenticated caller")
    return p


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret(prefix: str = "rdt") -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_expiry(ttl_seconds: int, default_seconds: int) -> dt.datetime | None:
    """When a new token expires: its own TTL, else the deployment's default (tokens expire by default;
    only a default of 0, set deliberately, makes tokens that never expire)."""
    ttl = ttl_seconds or default_seconds
    return _now() + dt.timedelta(seconds=ttl) if ttl > 0 else None


def serial_hex(serial: int) -> str:
    return format(serial, "x")


def certificate_revoked(sessions: sessionmaker[Session], serial: int) -> bool:
    """Whether the certificates table marks this serial revoked (the server's revocation source)."""
    with sessions() as s:
        row = s.get(models.Certificate, serial_hex(serial))
        return row is not None and row.revoked_at is not None


class Authenticator:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def is_revoked(self, serial: int) -> bool:
        return certificate_revoked(self.sessions, serial)

    def authenticate(self, method: str, identity: Identity | None, metadata: dict[str, str]) -> Principal | None:
        if identity is None:
            raise Unauthenticated("a client certificate issued by this deployment's CA is required")
        if self.is_revoked(identity.serial):
            raise Unauthenticated(f"certificate {serial_hex(identity.serial)} of {identity.uri} is revoked")
        if method.startswith(OPEN_SERVICES):
            return None
        if identity.role in MACHINE_ROLES:
            raise PermissionDenied(f"{identity.role} certificates may not call the public or admin API")
        if identity.role == "admin":
            principal = Principal(ADMIN_TENANT, True, identity)
        else:
            principal = self._from_token(identity, metadata.get("authorization", ""))
        if method.startswith(ADMIN_SERVICE) and not principal.admin:
            raise PermissionDenied("the admin API needs an admin certificate or an admin token")
        return principal

    def _from_token(self, identity: Identity, header: str) -> Principal:
        scheme, _, secret = header.partition(" ")
        if not header:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata (a tenant token is "
                                  f"required with a {identity.role} certificate)")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        with self.sessions() as s:
            token = s.scalar(select(models.Token).where(models.Token.secret_hash == hash_secret(secret.strip())))
            if token is None:
                raise Unauthenticated("unknown token")
            if token.revoked_at is not None:
                raise Unauthenticated("token has been revoked")
            if token.expires_at is not None and token.expires_at <= _now():
                raise Unauthenticated("token has expired")
            return Principal(token.tenant_id, token.admin, identity)


def _guard_handler(handler: grpc.RpcMethodHandler[Any, Any],
                   check: Callable[[Context], Awaitable[bool]]) -> grpc.RpcMethodHandler[Any, Any]:
    """The same method handler, each call running `check(context)` first: a check that returns False has
    aborted the call, and the method does not run."""
    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request_or_iterator: Any, context: Context) -> Any:
            if not await check(context):
                return None
            result = behavior(request_or_iterator, context)
            return await result if inspect.isawaitable(result) else result
        return wrapper

    def stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request_or_iterator: Any, context: Context) -> Any:
            if not await check(context):
                return
            async for item in behavior(request_or_iterator, context):
                yield item
        return wrapper

    de, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), de, ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), de, ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), de, ser)
    if handler.stream_stream:
        return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), de, ser)
    raise TypeError(f"a method handler with no behaviour: {handler!r}")


class CheckingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs `check` before every call of every method, unary or streaming: a check
    that returns False has aborted the call, and the method does not run."""

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None

        async def check(context: Context) -> bool:
            return await self.check(handler_call_details, context)

        return _guard_handler(handler, check)

    async def check(self, details: grpc.HandlerCallDetails, context: Context) -> bool:
        raise NotImplementedError


class AuthInterceptor(CheckingInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self.auth = authenticator

    async def check(self, details: grpc.HandlerCallDetails, context: Context) -> bool:
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        try:
            principal = await asyncio.to_thread(self.auth.authenticate, details.method, peer_identity(context),
                                                metadata)
        except RedDwarfError as err:
            await abort(context, err)
            return False
        _principal.set(principal)
        return True

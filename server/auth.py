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

What authentication reads from the state DB (is this serial revoked, what does this token hash name) is
kept in memory for at most `auth_cache_seconds` (default 1 s), so a call that hits the cache neither hops
to a thread nor opens a session. Staleness is bounded both ways:
- on the server that revokes (a committed change to a token or certificate row through its sessions), the
  cache is dropped at commit: that server refuses the revoked credential on the very next call;
- another server sharing the state DB refuses it within `auth_cache_seconds`. 0 turns the cache off (every
  call reads the DB, as before).
A token's expiry is compared with the clock on every call, cached or not, and unknown tokens are never
cached (a flood of made-up tokens cannot evict the real ones; each costs a DB read as it always did).
"""
from __future__ import annotations

import asyncio
import contextvars
import datetime as dt
import hashlib
import inspect
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import event, select
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
    # The token the caller presented (its id, never the secret); "" for a certificate-only admin.
    token_id: str = ""

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


@dataclass(frozen=True)
class _TokenRow:
    tenant_id: str | None
    admin: bool
    revoked: bool
    expires_at: dt.datetime | None
    token_id: str


class _Miss(Exception):
    """The cache cannot answer: read the state DB (in a thread)."""


class AuthCache:
    """Revocation and token lookups, each kept for at most `ttl` seconds (see the module docstring).

    `generation` moves whenever this process commits a change to a token or certificate row; a lookup that
    started before the move is not stored, so a read racing a revocation cannot re-cache the old answer."""

    MAX_ENTRIES = 50_000  # a bound on memory: past it the cache starts over

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.generation = 0
        self._lock = threading.Lock()
        self._certs: dict[int, tuple[float, bool]] = {}
        self._tokens: dict[str, tuple[float, _TokenRow]] = {}

    def invalidate(self) -> None:
        with self._lock:
            self.generation += 1
            self._certs.clear()
            self._tokens.clear()

    def cert(self, serial: int) -> bool:
        hit = self._certs.get(serial)
        if hit is None or hit[0] < time.monotonic():
            raise _Miss
        return hit[1]

    def token(self, secret_hash: str) -> _TokenRow:
        hit = self._tokens.get(secret_hash)
        if hit is None or hit[0] < time.monotonic():
            raise _Miss
        return hit[1]

    def put_cert(self, serial: int, revoked: bool, generation: int) -> None:
        self._put(self._certs, serial, revoked, generation)

    def put_token(self, secret_hash: str, row: _TokenRow, generation: int) -> None:
        self._put(self._tokens, secret_hash, row, generation)

    def _put(self, table: dict[Any, tuple[float, Any]], key: Any, value: Any, generation: int) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if generation != self.generation:
                return
            if len(self._certs) + len(self._tokens) >= self.MAX_ENTRIES:
                self._certs.clear()
                self._tokens.clear()
            table[key] = (time.monotonic() + self.ttl, value)

    def watch(self, sessions: sessionmaker[Session]) -> None:
        """Drop the cache whenever a session of `sessions` commits a change to a token or certificate."""
        def after_flush(session: Session, _ctx: Any) -> None:
            if any(isinstance(o, (models.Token, models.Certificate))
                   for o in (*session.new, *session.dirty, *session.deleted)):
                session.info["reddwarf_auth_changed"] = True

        def after_commit(session: Session) -> None:
            if session.info.pop("reddwarf_auth_changed", False):
                self.invalidate()

        event.listen(sessions, "after_flush", after_flush)
        event.listen(sessions, "after_commit", after_commit)


class Authenticator:
    def __init__(self, sessions: sessionmaker[Session], cache_seconds: float = 0.0) -> None:
        self.sessions = sessions
        self.cache = AuthCache(cache_seconds)
        self.cache.watch(sessions)

    def is_revoked(self, serial: int, cached_only: bool = False) -> bool:
        try:
            return self.cache.cert(serial)
        except _Miss:
            if cached_only:
                raise
        generation = self.cache.generation
        revoked = certificate_revoked(self.sessions, serial)
        self.cache.put_cert(serial, revoked, generation)
        return revoked

    def authenticate(self, method: str, identity: Identity | None, metadata: dict[str, str],
                     cached_only: bool = False) -> Principal | None:
        """The caller's principal (None for the open services), or an error. With cached_only it raises
        _Miss instead of reading the state DB, so the event loop can try it without blocking."""
        if identity is None:
            raise Unauthenticated("a client certificate issued by this deployment's CA is required")
        if self.is_revoked(identity.serial, cached_only):
            raise Unauthenticated(f"certificate {serial_hex(identity.serial)} of {identity.uri} is revoked")
        if method.startswith(OPEN_SERVICES):
            return None
        if identity.role in MACHINE_ROLES:
            raise PermissionDenied(f"{identity.role} certificates may not call the public or admin API")
        if identity.role == "admin":
            principal = Principal(ADMIN_TENANT, True, identity)
        else:
            principal = self._from_token(identity, metadata.get("authorization", ""), cached_only)
        if method.startswith(ADMIN_SERVICE) and not principal.admin:
            raise PermissionDenied("the admin API needs an admin certificate or an admin token")
        return principal

    def _from_token(self, identity: Identity, header: str, cached_only: bool) -> Principal:
        scheme, _, secret = header.partition(" ")
        if not header:
            raise Unauthenticated("missing `authorization: Bearer <token>` metadata (a tenant token is "
                                  f"required with a {identity.role} certificate)")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthenticated("authorization metadata must be `Bearer <token>`")
        secret_hash = hash_secret(secret.strip())
        try:
            token: _TokenRow | None = self.cache.token(secret_hash)
        except _Miss:
            if cached_only:
                raise
            generation = self.cache.generation
            with self.sessions() as s:
                row = s.scalar(select(models.Token).where(models.Token.secret_hash == secret_hash))
                token = None if row is None else _TokenRow(row.tenant_id, row.admin, row.revoked_at is not None,
                                                           row.expires_at, row.id)
            if token is not None:
                self.cache.put_token(secret_hash, token, generation)
        if token is None:
            raise Unauthenticated("unknown token")
        if token.revoked:
            raise Unauthenticated("token has been revoked")
        if token.expires_at is not None and token.expires_at <= _now():
            raise Unauthenticated("token has expired")
        return Principal(token.tenant_id, token.admin, identity, token.token_id)


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


@dataclass(frozen=True)
class CallDetails:
    """What a check needs of a call (grpc.HandlerCallDetails' fields), read from the call's context."""
    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...]


class CheckingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that runs `check` before every call of every method, unary or streaming: a check
    that returns False has aborted the call, and the method does not run.

    The guarded handler is built once per method and reused (gRPC hands back the same handler object for a
    method on every call), so a call pays for its check and nothing else."""

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]] = {}

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        known = self._guarded.get(method)
        if known is not None and known[0] is handler:
            return known[1]

        async def check(context: Context) -> bool:
            return await self.check(CallDetails(method, tuple(context.invocation_metadata() or ())), context)

        guarded = _guard_handler(handler, check)
        self._guarded[method] = (handler, guarded)
        return guarded

    async def check(self, details: CallDetails, context: Context) -> bool:
        raise NotImplementedError


class AuthInterceptor(CheckingInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        super().__init__()
        self.auth = authenticator

    async def check(self, details: CallDetails, context: Context) -> bool:
        metadata = {k: v for k, v in (details.invocation_metadata or ()) if isinstance(v, str)}
        identity = peer_identity(context)
        try:
            try:  # from the cache, on the loop: no thread, no session
                principal = self.auth.authenticate(details.method, identity, metadata, cached_only=True)
            except _Miss:
                principal = await asyncio.to_thread(self.auth.authenticate, details.method, identity, metadata)
        except RedDwarfError as err:
            await abort(context, err)
            return False
        _principal.set(principal)
        return True

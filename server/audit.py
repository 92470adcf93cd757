"""The event history's recording side: who asked for which change through the API and how it ended (an
interceptor on the API port, so the REST gateway's calls are covered too), and every status change of an
instance, backup or host (a hook on the state DB's sessions, in the same transaction as the change).

What a caller asked is kept as its request in JSON with every secret field redacted (passwords, tokens,
keys, certificates and CSRs, by field name), truncated. Not to be confused with server/events.py, the
in-memory bus that wakes WatchInstance streams.

Cost: an API event is queued and written by a background writer in batches, so the call it records never
waits for it; a status event is one more row in a transaction that is being written anyway.
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import inspect
import json
import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import delete, event, select
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.clock import now as utcnow

from . import models
from .app import Context
from .auth import Principal, _principal

log = logging.getLogger("reddwarf.server.audit")

# Methods that only read; everything else on the API port is a change and is recorded.
READ_PREFIXES = ("Get", "List", "Watch", "Tail")
SECRET_FIELD = re.compile(r"password|secret|token|key|credential|pem|csr|passphrase", re.IGNORECASE)
REDACTED = "<redacted>"
SUMMARY_MAX = 2000
REQUEST_ID_MAX = 64
FLUSH_SECONDS = 0.2
KINDS = ("api", "status")

# The request id and caller of the API call being served, seen by the status hook (asyncio.to_thread copies
# the context into the worker thread).
_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def is_change(method: str) -> bool:
    """`/reddwarf.v1.Instances/CreateInstance` is a change; Get/List/Watch/Tail methods and the standard
    health and reflection services are not."""
    service, _, name = method.rpartition("/")
    return service.startswith("/reddwarf.") and not name.startswith(READ_PREFIXES)


def redact(value: Any) -> Any:
    """A copy of a request's JSON form with every field that may hold a secret replaced, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if SECRET_FIELD.search(k) and v not in ("", None, [], {}) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def summarize(request: Any) -> str:
    if not isinstance(request, Message):
        return ""
    data = redact(json_format.MessageToDict(request, preserving_proto_field_name=True))
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return text if len(text) <= SUMMARY_MAX else text[:SUMMARY_MAX - 3] + "..."


_RESOURCE = re.compile(r"^(instances|backups|hosts|tenants)/([A-Za-z0-9._@%-]{1,64})")


def resource_of(*messages: Any) -> str:
    """The resource a call acted on: the first of name/parent/instance/backup... fields (request first, then
    the response, which names what a create made) that reads "<collection>/<id>"."""
    for msg in messages:
        if not isinstance(msg, Message):
            continue
        for fname in ("name", "parent", "instance", "backup", "resource"):
            fd = msg.DESCRIPTOR.fields_by_name.get(fname)
            if fd is None:
                continue
            value = getattr(msg, fname)
            if isinstance(value, Message):  # CreateBackupRequest.backup.instance, ...
                value = resource_of(value)
            m = _RESOURCE.match(value) if isinstance(value, str) else None
            if m:
                return f"{m.group(1)}/{m.group(2)}"
    return ""


def new_request_id(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and value.strip():
            return value.strip()[:REQUEST_ID_MAX]
    return f"req-{uuid.uuid4()}"


@dataclass
class EventWriter:
    """API events queued by the interceptor and written in batches by `run`."""
    sessions: sessionmaker[Session]
    queue: list[models.Event] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, ev: models.Event) -> None:
        self.queue.append(ev)
        if len(self.queue) >= 100:
            self.wake.set()

    def _write(self, batch: list[models.Event]) -> None:
        with self.sessions() as s, s.begin():
            s.add_all(batch)

    async def flush(self) -> None:
        batch, self.queue = self.queue, []
        if batch:
            try:
                await asyncio.to_thread(self._write, batch)
            except Exception:  # noqa: BLE001 - the history must never break the API; logged, not retried
                log.exception("writing events failed", extra={"count": len(batch)})

    async def run(self) -> None:
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), FLUSH_SECONDS)
                self.wake.clear()
                await self.flush()
        finally:
            await self.flush()


class AuditInterceptor(grpc.aio.ServerInterceptor):
    """Records each change method's call once it ended: caller, request id, redacted request, status code.
    Goes after the AuthInterceptor, whose principal it reads."""

    def __init__(self, writer: EventWriter) -> None:
        self.writer = writer

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not handler.unary_unary or not is_change(method):
            return handler
        behavior = handler.unary_unary
        metadata = handler_call_details.invocation_metadata

        async def audited(request: Any, context: Context) -> Any:
            rid = new_request_id(metadata)
            _request_id.set(rid)
            response, code, detail = None, "OK", ""
            try:
                result = behavior(request, context)
                response = await result if inspect.isawaitable(result) else result
                return response
            except BaseException as exc:
                code = _code_name(context, exc)
                detail = (context.details() if hasattr(context, "details") else "") or str(exc)
                raise
            finally:
                self.writer.add(self._event(method, request, response, rid, code, detail))

        return grpc.unary_unary_rpc_method_handler(audited, handler.request_deserializer,
                                                   handler.response_serializer)

    @staticmethod
    def _event(method: str, request: Any, response: Any, rid: str, code: str, detail: str) -> models.Event:
        p = _principal.get()
        return models.Event(time=utcnow(), kind="api", tenant_id=(p.tenant_id or "") if p else "",
                            resource=resource_of(request, response), actor=actor(p),
                            request_id=rid, method=method[:128], summary=summarize(request), code=code,
                            detail=(detail or "")[:1000])


def actor(p: Principal | None) -> str:
    """Who called: the verified certificate's identity, and the token it presented (its id, not the secret)."""
    if p is None:
        return ""
    return f"{p.identity.uri} token/{p.token_id}"[:255] if p.token_id else p.identity.uri


def _code_name(context: Context, exc: BaseException) -> str:
    code: Any = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):
        with contextlib.suppress(ValueError):
            return next(c.name for c in grpc.StatusCode if c.value[0] == code)
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


# -- status changes ------------------------------------------------------------------------------------

# model → (its status column, its collection, how to find its tenant)
_WATCHED: dict[type[models.Base], tuple[str, str, Callable[[Any], str]]] = {
    models.Instance: ("status", "instances", lambda r: r.tenant_id or ""),
    models.Backup: ("status", "backups", lambda r: r.tenant_id or ""),
    models.Host: ("state", "hosts", lambda r: ""),
}


def _status_event(row: Any, new: str, old: str) -> models.Event:
    column, collection, tenant = _WATCHED[type(row)]
    p = _principal.get()
    return models.Event(time=utcnow(), kind="status", tenant_id=tenant(row), resource=f"{collection}/{row.id}"[:128],
                        actor=actor(p), request_id=_request_id.get(), method="", summary="",
                        code="", status=str(new)[:64], previous_status=str(old or "")[:64], detail="")


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    added: list[models.Event] = []
    for row in session.new:
        spec = _WATCHED.get(type(row))
        if spec is not None:
            added.append(_status_event(row, getattr(row, spec[0]) or _default(row, spec[0]), ""))
    for row in session.dirty:
        spec = _WATCHED.get(type(row))
        if spec is None:
            continue
        hist = sa_inspect(row).attrs[spec[0]].history
        if hist.added and hist.deleted and hist.added[0] != hist.deleted[0]:
            added.append(_status_event(row, hist.added[0], hist.deleted[0]))
    for row in session.deleted:
        spec = _WATCHED.get(type(row))
        if spec is not None:
            added.append(_status_event(row, "DELETED", getattr(row, spec[0]) or ""))
    if added:
        session.add_all(added)


def _default(row: Any, column: str) -> str:
    """The column's default, for a new row whose status was left to it."""
    col = sa_inspect(type(row)).columns[column]
    default = col.default.arg if col.default is not None else ""
    return str(default) if not callable(default) else ""


def record_status_changes(sessions: sessionmaker[Session]) -> None:
    """Every session of this sessionmaker records the status changes it flushes."""
    event.listen(sessions, "before_flush", _before_flush)


def stop_recording(sessions: sessionmaker[Session]) -> None:
    if event.contains(sessions, "before_flush", _before_flush):
        event.remove(sessions, "before_flush", _before_flush)


# -- retention -----------------------------------------------------------------------------------------

def prune(sessions: sessionmaker[Session], retention_days: float, batch: int = 5000) -> int:
    """Deletes events older than the retention (in batches, so a large backlog never holds one long lock)."""
    if retention_days <= 0:
        return 0
    cutoff = utcnow() - dt.timedelta(days=retention_days)
    total = 0
    while True:
        with sessions() as s, s.begin():
            ids = s.scalars(select(models.Event.id).where(models.Event.time < cutoff).limit(batch)).all()
            if not ids:
                return total
            s.execute(delete(models.Event).where(models.Event.id.in_(ids)))
            total += len(ids)


async def prune_loop(sessions: sessionmaker[Session], retention_days: float, every: float) -> None:
    while True:
        try:
            n = await asyncio.to_thread(prune, sessions, retention_days)
            if n:
                log.info("events pruned", extra={"count": n, "retention_days": retention_days})
        except Exception:  # noqa: BLE001 - tried again next round
            log.exception("pruning events failed")
        await asyncio.sleep(every)

"""The Events service: the event history (server/audit.py records it), oldest first, filtered and paged.
A tenant sees only its own tenant's events; an admin sees all, or one tenant's."""
from __future__ import annotations

import asyncio
import datetime as dt
import json
from dataclasses import dataclass

from google.protobuf import timestamp_pb2
from sqlalchemy import select

from reddwarf.common.errors import InvalidArgument, PermissionDenied, grpc_edge
from reddwarf.v1 import observe_pb2, observe_pb2_grpc

from . import models
from .app import App, Context
from .audit import KINDS
from .auth import current_principal
from .pagination import Page, Paginator

METHOD = "ListEvents"


def _time(ts: timestamp_pb2.Timestamp) -> dt.datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime()  # naive UTC, as the state DB stores times


def event_pb(e: models.Event) -> observe_pb2.Event:
    pb = observe_pb2.Event(id=e.id, kind=e.kind, tenant=e.tenant_id, resource=e.resource, actor=e.actor,
                           request_id=e.request_id, method=e.method, summary=e.summary, code=e.code,
                           status=e.status, previous_status=e.previous_status, detail=e.detail)
    pb.time.FromDatetime(e.time)
    return pb


@dataclass(eq=False)
class EventsServicer(observe_pb2_grpc.EventsServicer):
    app: App
    pages: Paginator

    @grpc_edge
    async def ListEvents(self, request: observe_pb2.ListEventsRequest,
                         context: Context) -> observe_pb2.ListEventsResponse:
        p = current_principal(context)
        if request.kind and request.kind not in KINDS:
            raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}", field="kind")
        if request.tenant and not p.admin and request.tenant != p.tenant_id:
            raise PermissionDenied("only admins may read another tenant's events", field="tenant")
        since, until = _time(request.since), _time(request.until)
        if since and until and since > until:
            raise InvalidArgument("since must not be after until", field="since")
        resource = request.resource.strip()
        if len(resource) > 128:
            raise InvalidArgument("resource must be at most 128 characters", field="resource")
        tenant = request.tenant if p.admin else (p.tenant_id or "")
        filt = json.dumps([resource, request.kind, since.isoformat() if since else "",
                           until.isoformat() if until else "", tenant, p.admin])
        # Keyset paging: the token carries the id of the last event returned, so events recorded while a
        # caller pages never shift what it sees.
        page = self.pages.page(METHOD, p.caller_key, request.page_size, request.page_token, filt)
        last_id = _last_id(page)

        def q() -> observe_pb2.ListEventsResponse:
            query = select(models.Event).where(models.Event.id > last_id)
            if not p.admin or tenant:
                query = query.where(models.Event.tenant_id == tenant)
            if resource:
                query = query.where(models.Event.resource == resource) if "/" in resource else \
                    query.where(models.Event.resource.like(f"%/{_like_escape(resource)}", escape="\\"))
            if request.kind:
                query = query.where(models.Event.kind == request.kind)
            if since:
                query = query.where(models.Event.time >= since)
            if until:
                query = query.where(models.Event.time < until)
            with self.app.sessions() as s:
                rows = s.scalars(query.order_by(models.Event.id).limit(page.size + 1)).all()
                events = [event_pb(r) for r in rows[:page.size]]
            more = len(rows) > page.size
            after = (str(events[-1].id),) if events else None
            return observe_pb2.ListEventsResponse(
                events=events, next_page_token=self.pages.next_token(METHOD, p.caller_key, page, more, filt, after))
        return await asyncio.to_thread(q)


def _last_id(page: Page) -> int:
    """The id after which this page starts: 0 for the first page. (A token made before the key had its own
    field carried the id as its offset; read as such, it still pages on.)"""
    if page.after is None:
        return page.offset
    try:
        (key,) = page.after
        return int(key)
    except ValueError as e:
        raise InvalidArgument("page_token is malformed; start again without it", field="page_token") from e


def _like_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

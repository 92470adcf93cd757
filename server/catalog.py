"""The Catalog service: flavors (named limit sets), datastores and their versions, and who the caller is."""
from __future__ import annotations

import asyncio
import datetime as dt
from typing import TYPE_CHECKING, TypeVar

from google.protobuf import timestamp_pb2
from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.errors import InvalidArgument, NotFound, grpc_edge
from reddwarf.v1 import common_pb2, database_pb2, database_pb2_grpc

from . import models
from .app import App, Context
from .auth import current_principal
from .pagination import Paginator
from .readcache import ReadCache

if TYPE_CHECKING:
    from .ratelimit import RateLimiter

T = TypeVar("T")

# The Debian release whose template each datastore version runs in (hostd builds that release's recipe on
# first use and caches it). "" is the host's default template (bookworm), which 10.11 has always used.
VERSION_RELEASES: dict[tuple[str, str], str] = {("mariadb", "10.11"): "", ("mariadb", "11.8"): "trixie"}
DEFAULT_RELEASE = "bookworm"


def template_for(datastore: str, version: str, revision: int = 0) -> str:
    """What CreateContainer's `template` says for a datastore version (and template revision): "" for the
    host's default template, else a release name (`trixie`, `trixie-r2`) hostd resolves to its recipe."""
    release = VERSION_RELEASES.get((datastore, version), "")
    if revision:
        return f"{release or DEFAULT_RELEASE}-r{revision}"
    return release


def ts(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    t = timestamp_pb2.Timestamp()
    t.FromDatetime(value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value)
    return t


def limits_of(f: models.Flavor) -> common_pb2.Limits:
    return common_pb2.Limits(memory_mb=f.memory_mb, swap_mb=f.swap_mb, cpu_shares=f.cpu_shares,
                             cpu_limit_millicores=f.cpu_limit_millicores, max_processes=f.max_processes,
                             max_open_files=f.max_open_files, io_weight=f.io_weight, io_iops=f.io_iops,
                             io_bytes_per_sec=f.io_bytes_per_sec)


def flavor_pb(f: models.Flavor) -> database_pb2.Flavor:
    return database_pb2.Flavor(name=f"flavors/{f.id}", id=f.id, display_name=f.display_name,
                               limits=limits_of(f), default_volume_gb=f.default_volume_gb)


def resource_id(name: str, collection: str, field: str) -> str:
    """Accepts `collection/id` or a bare id (Trove clients send bare ids)."""
    if not name:
        raise InvalidArgument(f"{field} is required", field=field)
    prefix = f"{collection}/"
    rid = name.removeprefix(prefix)
    if not rid or "/" in rid or len(rid) > 64:
        raise InvalidArgument(f"{field} must be `{collection}/<id>`, got {name[:80]!r}", field=field)
    return rid


def fetch(s: Session, model: type[T], name: str, collection: str, field: str = "name") -> T:
    """The row named `collection/<id>` (or a bare id), or NOT_FOUND naming the field."""
    rid = resource_id(name, collection, field)
    row = s.get(model, rid)
    if row is None:
        raise NotFound(f"{collection[:-1]} {rid!r} does not exist", field=field)
    return row


class CatalogServicer(database_pb2_grpc.CatalogServicer):
    def __init__(self, app: App, paginator: Paginator, rate_limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.pages = paginator
        self.rate_limiter = rate_limiter
        # GetFlavor is on every create's path and every Trove client's; flavors change rarely (admin only).
        self.flavors: ReadCache[str, database_pb2.Flavor] = ReadCache(
            app.settings.catalog_cache_seconds, app.sessions, (models.Flavor,))

    def _datastore_pb(self, s: Session, d: models.Datastore) -> database_pb2.Datastore:
        versions = s.scalars(select(models.DatastoreVersion).where(
            models.DatastoreVersion.datastore_id == d.id).order_by(models.DatastoreVersion.version)).all()
        return database_pb2.Datastore(
            name=f"datastores/{d.id}", id=d.id, default_version=d.default_version,
            versions=[database_pb2.DatastoreVersion(name=f"datastores/{d.id}/versions/{v.version}",
                                                    version=v.version, packages=list(v.packages or []),
                                                    active=v.active,
                                                    package_versions={str(k): str(x) for k, x in
                                                                      (v.package_versions or {}).items()})
                      for v in versions])

    @grpc_edge
    async def ListFlavors(self, request: database_pb2.ListFlavorsRequest,
                          context: Context) -> database_pb2.ListFlavorsResponse:
        p = current_principal(context)
        page = self.pages.page("ListFlavors", p.caller_key, request.page_size, request.page_token)

        def q() -> database_pb2.ListFlavorsResponse:
            with self.app.sessions() as s:
                rows = s.scalars(select(models.Flavor).order_by(models.Flavor.memory_mb, models.Flavor.id)
                                 .offset(page.offset).limit(page.size + 1)).all()
            return database_pb2.ListFlavorsResponse(
                flavors=[flavor_pb(f) for f in rows[:page.size]],
                next_page_token=self.pages.next_token("ListFlavors", p.caller_key, page, len(rows) > page.size))
        return await asyncio.to_thread(q)

    @grpc_edge
    async def GetFlavor(self, request: database_pb2.GetFlavorRequest,
                        context: Context) -> database_pb2.Flavor:
        rid = resource_id(request.name, "flavors", "name")

        def load() -> database_pb2.Flavor:
            with self.app.sessions() as s:
                return flavor_pb(fetch(s, models.Flavor, rid, "flavors"))
        return self.flavors.get(rid, load)

    @grpc_edge
    async def ListDatastores(self, request: database_pb2.ListDatastoresRequest,
                             context: Context) -> database_pb2.ListDatastoresResponse:
        p = current_principal(context)
        page = self.pages.page("ListDatastores", p.caller_key, request.page_size, request.page_token)
        with self.app.sessions() as s:
            rows = s.scalars(select(models.Datastore).order_by(models.Datastore.id)
                             .offset(page.offset).limit(page.size + 1)).all()
            return database_pb2.ListDatastoresResponse(
                datastores=[self._datastore_pb(s, d) for d in rows[:page.size]],
                next_page_token=self.pages.next_token("ListDatastores", p.caller_key, page,
                                                      len(rows) > page.size))

    @grpc_edge
    async def GetDatastore(self, request: database_pb2.GetDatastoreRequest,
                           context: Context) -> database_pb2.Datastore:
        with self.app.sessions() as s:
            d = fetch(s, models.Datastore, request.name, "datastores")
            return self._datastore_pb(s, d)

    @grpc_edge
    async def GetCaller(self, request: database_pb2.GetCallerRequest,
                        context: Context) -> database_pb2.Caller:
        p = current_principal(context)
        return database_pb2.Caller(tenant=f"tenants/{p.tenant_id}" if p.tenant_id else "", admin=p.admin,
                                   identity=p.identity.uri)

    @grpc_edge
    async def GetLimits(self, request: database_pb2.GetLimitsRequest, context: Context) -> database_pb2.TenantLimits:
        """The caller's tenant's quotas and use, and its API rate limit's bucket (Trove's GET /limits)."""
        from reddwarf.common.clock import now

        from .admin import quota_usage
        from .ratelimit import per_unit
        p = current_principal(context)

        def q() -> database_pb2.TenantLimits:
            with self.app.sessions() as s:
                t = s.get(models.Tenant, p.tenant_id) if p.tenant_id else None
                if t is None:
                    return database_pb2.TenantLimits()
                u = quota_usage(s, t)
            return database_pb2.TenantLimits(
                max_instances=u.limit.instances, max_memory_mb=u.limit.memory_mb, max_volume_gb=u.limit.volume_gb,
                max_backups=u.limit.backups, used_instances=u.in_use.instances, used_memory_mb=u.in_use.memory_mb,
                used_volume_gb=u.in_use.volume_gb, used_backups=u.in_use.backups)
        out = await asyncio.to_thread(q)
        limiter = self.rate_limiter
        state = limiter.state(p) if limiter is not None else None
        if state is not None:
            value, unit = per_unit(state.rate.limit, state.rate.period)
            out.rates.append(database_pb2.RateLimit(
                verb="*", uri="*", regex=".*", value=value, unit=unit, remaining=state.remaining,
                next_available=ts(now() + dt.timedelta(seconds=state.next_in))))
        return out

"""The Instances service: create, get, list, watch, update, delete, stop, start, restart and resize a tenant's
instances.

Each change is accepted here (validated, quota-checked, refused while another task runs on the instance)
and carried out by a durable task (server/instance_tasks.py); what a user sees is derived in
server/instance_views.py.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from reddwarf.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    grpc_edge,
)
from reddwarf.common.states import BackupStatus, InstanceStatus
from reddwarf.v1 import database_pb2, database_pb2_grpc

from . import maintenance, migration, models, tags, tasks, upgrade
from .agents import AgentRegistry
from .app import App, Context
from .auth import current_principal
from .catalog import resource_id
from .configurations import bind_on_create, check_flavor
from .events import EventBus
from .idempotency import create_once, parse_request_id
from .instance_validation import display_name_problem, validate_create, validate_update
from .instance_views import STOPPED, InstanceViews, derived_status, instance_pb, instance_pbs, owned_instance
from .mysql_ca import mysql_ca
from .pagination import Paginator
from .quotas import check_backup_quota, check_instance_quota
from .sealing import PasswordSealer

# (session, instance row, its derived status): raises when the instance cannot take the change.
Check = Callable[[Session, models.Instance, InstanceStatus], None]


def _list_key(after: tuple[str, ...]) -> tuple[dt.datetime, str]:
    """ListInstances' page key from a (signed) page token: the last row's created_at and id."""
    try:
        at, last_id = after
        return dt.datetime.fromisoformat(at), last_id
    except ValueError as e:
        raise InvalidArgument("page_token is malformed; start again without it", field="page_token") from e


@dataclass(eq=False)
class InstancesServicer(database_pb2_grpc.InstancesServicer):
    app: App
    engine: tasks.TaskEngine
    events: EventBus
    registry: AgentRegistry
    sealer: PasswordSealer
    pages: Paginator

    def __post_init__(self) -> None:
        # GetInstance is what every client polls while it waits, and WatchInstance's every poke re-reads.
        self.views = InstanceViews(self.app.sessions, self.app.settings.instance_cache_seconds,
                                   self.app.settings.heartbeat_expiry_seconds)

    def _pb(self, s: Session, row: models.Instance) -> database_pb2.Instance:
        return instance_pb(s, row, self.app.settings.heartbeat_expiry_seconds)

    @staticmethod
    def _refuse_busy(s: Session, iid: str) -> None:
        if tasks.active_task_for(s, f"instances/{iid}") is not None:
            raise FailedPrecondition(f"instance {iid} is busy with another operation; retry when it is ACTIVE",
                                     field="name")

    def _submit(self, s: Session, kind: str, iid: str, params: dict[str, Any] | None = None) -> None:
        self._refuse_busy(s, iid)
        tasks.submit(s, kind, f"instances/{iid}", params or {})

    def _after_submit(self, iid: str) -> None:
        self.engine.wake()
        self.events.publish(iid, "task")

    @grpc_edge
    async def CreateInstance(self, request: database_pb2.CreateInstanceRequest,
                             context: Context) -> database_pb2.Instance:
        p = current_principal(context)
        validate_create(request)
        inst = request.instance
        flavor_id = resource_id(inst.flavor, "flavors", "instance.flavor")
        restore_id = resource_id(request.restore_from_backup, "backups", "restore_from_backup") \
            if request.restore_from_backup else ""
        window = maintenance.parse_window(inst.maintenance_window, "instance.maintenance_window") \
            if inst.HasField("maintenance_window") else None

        rid = parse_request_id(request.request_id)

        def lookup(s: Session) -> database_pb2.Instance | None:
            prior = s.scalar(select(models.Instance).where(models.Instance.tenant_id == p.tenant_id,
                                                           models.Instance.request_id == rid))
            return None if prior is None else maintenance.decorate(s, self._pb(s, prior))

        def create(s: Session) -> database_pb2.Instance:
            f = s.get(models.Flavor, flavor_id)
            if f is None:
                raise NotFound(f"flavor {flavor_id!r} does not exist", field="instance.flavor")
            ds_name = inst.datastore or "mariadb"
            ds = s.get(models.Datastore, ds_name)
            if ds is None:
                raise NotFound(f"datastore {ds_name!r} does not exist", field="instance.datastore")
            version = inst.datastore_version or ds.default_version
            dv = s.scalar(select(models.DatastoreVersion).where(
                models.DatastoreVersion.datastore_id == ds.id, models.DatastoreVersion.version == version,
                models.DatastoreVersion.active.is_(True)))
            if dv is None:
                raise NotFound(f"datastore version {ds_name} {version!r} does not exist",
                               field="instance.datastore_version")
            if restore_id:
                b = s.get(models.Backup, restore_id)
                if b is None or (not p.admin and b.tenant_id != p.tenant_id):
                    raise NotFound(f"backup {restore_id!r} does not exist", field="restore_from_backup")
                if b.status != BackupStatus.COMPLETED:
                    raise FailedPrecondition(f"backup is {b.status}; only a COMPLETED backup restores",
                                             field="restore_from_backup")
                if b.datastore != ds.id:
                    raise InvalidArgument(f"backup is of {b.datastore}, not {ds.id}", field="restore_from_backup")
            size = inst.volume.size_gb or f.default_volume_gb
            if not 1 <= size <= self.app.settings.max_volume_gb:
                raise InvalidArgument(f"instance.volume.size_gb must be 1..{self.app.settings.max_volume_gb}",
                                      field="instance.volume.size_gb")
            tenant = s.get(models.Tenant, p.tenant_id)
            if tenant is None:
                raise PermissionDenied("the caller has no tenant", field="tenant")
            check_instance_quota(s, tenant, f.memory_mb, size)
            row = models.Instance(
                id=str(uuid.uuid4()), tenant_id=tenant.id, display_name=inst.display_name.strip(),
                status=InstanceStatus.BUILD, flavor_id=f.id, volume_size_gb=size, datastore=ds.id,
                datastore_version=version, template_revision=dv.template_revision, request_id=rid,
                restored_from=restore_id,
                tags=tags.validate_tags(inst.tags, "instance.tags"), deletion_protection=inst.deletion_protection,
                create_params={"databases": [json_format.MessageToDict(d) for d in request.databases],
                               "users": [{**json_format.MessageToDict(u), "password": self.sealer.seal(u.password)}
                                         for u in request.users],
                               **({"services": list(inst.services)} if inst.services else {}),
                               **({"access": json_format.MessageToDict(request.access,
                                                                       preserving_proto_field_name=True)}
                                  if request.HasField("access") else {})})
            s.add(row)
            s.flush()
            if request.configuration:
                bind_on_create(s, p, row, request.configuration)
            if window is not None:
                maintenance.set_window(s, row.id, window)
            tasks.submit(s, "create_instance", f"instances/{row.id}", {})
            s.flush()
            return maintenance.decorate(s, self._pb(s, row))
        pb = await asyncio.to_thread(create_once, self.app.sessions, rid, lookup, create)
        self._after_submit(pb.id)
        return pb

    @grpc_edge
    async def GetInstanceCa(self, request: database_pb2.GetInstanceCaRequest,
                            context: Context) -> database_pb2.InstanceCa:
        p = current_principal(context)
        with self.app.sessions() as s:
            row = owned_instance(s, p, request.name)
            address, port = row.address or "", row.port or 0
        ca = await asyncio.to_thread(mysql_ca, self.app)
        return database_pb2.InstanceCa(ca_pem=ca.cert_pem.decode(), server_name=address, port=port)

    @grpc_edge
    async def GetInstance(self, request: database_pb2.GetInstanceRequest, context: Context) -> database_pb2.Instance:
        # The cached view carries the maintenance window, pending actions and agent version too
        # (server/instance_views.py).
        return self.views.get(current_principal(context), request.name)

    @grpc_edge
    async def ListInstances(self, request: database_pb2.ListInstancesRequest,
                            context: Context) -> database_pb2.ListInstancesResponse:
        p = current_principal(context)
        if request.status and request.status not in database_pb2.InstanceStatus.values():
            raise InvalidArgument("status is not an instance status", field="status")
        tagged = tags.parse_filters(request.tags)
        filter_key = str(request.status) + (f"|{tags.filter_key(tagged)}" if tagged else "")
        page = self.pages.page("ListInstances", p.caller_key, request.page_size, request.page_token, filter_key)

        def q() -> database_pb2.ListInstancesResponse:
            expiry = self.app.settings.heartbeat_expiry_seconds
            with self.app.sessions() as s:
                query = select(models.Instance).where(models.Instance.deleted_at.is_(None)) \
                    .order_by(models.Instance.created_at, models.Instance.id)
                if not p.admin:
                    query = query.where(models.Instance.tenant_id == p.tenant_id)
                query = query.where(*tags.tag_conditions(models.Instance.tags, tagged))
                after: tuple[str, ...] | None = None
                if not request.status:
                    # The page in SQL, by key after the first (the rows after the last one served: a short range
                    # of ix_instances_live_order, where an OFFSET walked every row before it), and its views with
                    # two more queries: a page costs the same at any depth of a tenant's (or, for an admin, the
                    # whole fleet's) instances, and rows created or deleted meanwhile shift no page.
                    if page.after is not None:
                        at, last_id = _list_key(page.after)
                        created = models.Instance.created_at
                        query = query.where(created >= at, or_(created > at, models.Instance.id > last_id))
                        rows = list(s.scalars(query.limit(page.size + 1)))
                    else:
                        rows = list(s.scalars(query.offset(page.offset).limit(page.size + 1)))
                    chunk = instance_pbs(s, rows, expiry)
                    if len(rows) > page.size:
                        last = rows[page.size - 1]
                        after = (last.created_at.isoformat(), last.id)
                else:
                    # The status is derived (task, heartbeat), not stored: filter the views, a batch at a time.
                    chunk, skipped, offset = [], 0, 0
                    while len(chunk) <= page.size:
                        rows = list(s.scalars(query.offset(offset).limit(500)))
                        if not rows:
                            break
                        offset += len(rows)
                        for pb in instance_pbs(s, rows, expiry):
                            if pb.status != request.status:
                                continue
                            if skipped < page.offset:
                                skipped += 1
                            else:
                                chunk.append(pb)
            return database_pb2.ListInstancesResponse(
                instances=chunk[:page.size],
                next_page_token=self.pages.next_token("ListInstances", p.caller_key, page, len(chunk) > page.size,
                                                      filter_key, after))
        return await asyncio.to_thread(q)

    def _action(self, context: Context, name: str, kind: str, params: dict[str, Any] | None = None,
                check: Check | None = None,
                submit: Callable[[Session, models.Instance], object] | None = None) -> database_pb2.Instance:
        """Checks, then submits the `kind` task (or calls `submit`, which adds the task(s) itself)."""
        p = current_principal(context)
        with self.app.sessions() as s, s.begin():
            row = owned_instance(s, p, name)
            status, _ = derived_status(s, row, self.app.settings.heartbeat_expiry_seconds)
            if check is not None:
                check(s, row, status)
            if submit is None:
                self._submit(s, kind, row.id, params)
            else:
                self._refuse_busy(s, row.id)
                submit(s, row)
            s.flush()
            pb = self._pb(s, row)
        self._after_submit(row.id)
        return pb

    @grpc_edge
    async def UpdateInstance(self, request: database_pb2.UpdateInstanceRequest,
                             context: Context) -> database_pb2.Instance:
        """Rename, deletion protection, tags: validated whole before anything changes; no task."""
        p = current_principal(context)
        paths = validate_update(request)
        given = request.instance
        window = maintenance.parse_window(given.maintenance_window, "instance.maintenance_window") \
            if "maintenance_window" in paths else None

        def update() -> database_pb2.Instance:
            with self.app.sessions() as s, s.begin():
                row = owned_instance(s, p, given.name, "instance.name")
                new_tags = tags.apply_paths(row.tags, given.tags, [x for x in paths if x.startswith("tags")],
                                            "instance.tags")
                if "display_name" in paths:
                    row.display_name = given.display_name.strip()
                if "deletion_protection" in paths:
                    row.deletion_protection = given.deletion_protection
                if new_tags != (row.tags or {}):
                    row.tags = new_tags
                if window is not None:
                    maintenance.set_window(s, row.id, window)
                s.flush()
                return maintenance.decorate(s, self._pb(s, row))
        pb = await asyncio.to_thread(update)
        self.events.publish(pb.id)
        return pb

    @grpc_edge
    async def DeleteInstance(self, request: database_pb2.DeleteInstanceRequest,
                             context: Context) -> database_pb2.Instance:
        final = request.final_backup_name
        if final or request.final_backup_tags:
            problem = display_name_problem(final)
            if problem:
                raise InvalidArgument(f"final_backup_name {problem}", field="final_backup_name")
        final_tags = tags.validate_tags(request.final_backup_tags, "final_backup_tags")
        backup_id = str(uuid.uuid4()) if final else ""

        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            if row.deletion_protection:
                raise FailedPrecondition(f"instance {row.id} has deletion_protection on; turn it off with "
                                         "UpdateInstance first", field="deletion_protection")
            # Like Trove, a delete is accepted in ERROR; unlike a half-made container race, a BUILD is
            # refused until its create task ends (it ends ACTIVE or ERROR, then delete cleans up).
            if status in (InstanceStatus.BUILD, InstanceStatus.RESTORING):
                raise FailedPrecondition("instance is still being built; delete it when it is ACTIVE or ERROR",
                                         field="name")
            if final:
                # The final backup is taken by the delete task's first step; its row is made now, in the
                # task's transaction, under the backup quota like any backup.
                if status not in (InstanceStatus.ACTIVE, InstanceStatus.RESTART_REQUIRED) \
                        or not self.registry.is_connected(row.id):
                    raise FailedPrecondition(f"instance is {status}; a final backup needs a running (ACTIVE) "
                                             "instance: start it, or delete without final_backup_name",
                                             field="final_backup_name")
                tenant = s.get(models.Tenant, row.tenant_id)
                if tenant is not None:
                    check_backup_quota(s, tenant)
                s.add(models.Backup(id=backup_id, tenant_id=row.tenant_id, instance_id=row.id,
                                    display_name=final.strip(), description=f"final backup of {row.display_name}",
                                    status=BackupStatus.NEW, kind="full", datastore=row.datastore,
                                    datastore_version=row.datastore_version, tags=final_tags))
        return self._action(context, request.name, "delete_instance",
                            {"backup_id": backup_id} if final else None, check=check)

    @grpc_edge
    async def StopInstance(self, request: database_pb2.StopInstanceRequest,
                           context: Context) -> database_pb2.Instance:
        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            if row.status == STOPPED:
                raise FailedPrecondition("instance is already stopped (SHUTDOWN)", field="name")
            # SHUTDOWN here is a guest gone silent (or a mysqld down): stopping it is still meaningful.
            if status not in (InstanceStatus.ACTIVE, InstanceStatus.HEALTHY, InstanceStatus.SHUTDOWN,
                              InstanceStatus.RESTART_REQUIRED):
                raise FailedPrecondition(f"instance is {status}; only a running instance can stop", field="name")
        return self._action(context, request.name, "stop_instance", check=check)

    @grpc_edge
    async def StartInstance(self, request: database_pb2.StartInstanceRequest,
                            context: Context) -> database_pb2.Instance:
        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            if row.status != STOPPED:
                raise FailedPrecondition(f"instance is {status}; only a stopped instance (StopInstance) can start",
                                         field="name")
        return self._action(context, request.name, "start_instance", check=check)

    @grpc_edge
    async def RestartInstance(self, request: database_pb2.RestartInstanceRequest,
                              context: Context) -> database_pb2.Instance:
        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            if status not in (InstanceStatus.ACTIVE, InstanceStatus.SHUTDOWN, InstanceStatus.HEALTHY,
                              InstanceStatus.RESTART_REQUIRED) \
                    or not self.registry.is_connected(row.id):
                raise FailedPrecondition(f"instance is {status}; only a running instance can restart", field="name")
        return self._action(context, request.name, "restart_instance", check=check)

    @grpc_edge
    async def ResizeInstance(self, request: database_pb2.ResizeInstanceRequest,
                             context: Context) -> database_pb2.Instance:
        flavor_id = resource_id(request.flavor, "flavors", "flavor")

        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            f = s.get(models.Flavor, flavor_id)
            if f is None:
                raise NotFound(f"flavor {flavor_id!r} does not exist", field="flavor")
            if f.id == row.flavor_id:
                raise InvalidArgument("the instance already has this flavor", field="flavor")
            check_flavor(s, row, f.memory_mb)
            if status != InstanceStatus.ACTIVE:
                raise FailedPrecondition(f"instance is {status}; resize needs ACTIVE", field="name")

        def submit(s: Session, row: models.Instance) -> str:
            # In place, or, when its host has no room for the new flavor, a migration to one that has.
            flavor = s.get(models.Flavor, flavor_id)
            assert flavor is not None  # checked above, in the same transaction
            return migration.submit_resize(s, row, flavor)
        return self._action(context, request.name, "resize_instance", check=check, submit=submit)

    @grpc_edge
    async def UpgradeInstance(self, request: database_pb2.UpgradeInstanceRequest,
                              context: Context) -> database_pb2.Instance:
        p = current_principal(context)
        with self.app.sessions() as s, s.begin():
            row = owned_instance(s, p, request.name)
            if request.in_maintenance_window:
                upgrade.check_upgrade(s, row, request.datastore_version,
                                      heartbeat_expiry=self.app.settings.heartbeat_expiry_seconds)
                maintenance.queue(s, row.id, "upgrade", f"upgrade to {row.datastore} {request.datastore_version}",
                                  {"datastore_version": request.datastore_version})
            else:
                upgrade.submit_upgrade(s, row, request.datastore_version,
                                       heartbeat_expiry=self.app.settings.heartbeat_expiry_seconds)
            s.flush()
            pb = maintenance.decorate(s, self._pb(s, row))
        self._after_submit(row.id)
        return pb

    @grpc_edge
    async def ResizeVolume(self, request: database_pb2.ResizeVolumeRequest,
                           context: Context) -> database_pb2.Instance:
        def check(s: Session, row: models.Instance, status: InstanceStatus) -> None:
            if request.size_gb <= row.volume_size_gb:
                raise InvalidArgument(f"size_gb must be larger than the current {row.volume_size_gb} GB "
                                      "(volumes only grow)", field="size_gb")
            if request.size_gb > self.app.settings.max_volume_gb:
                raise InvalidArgument(f"size_gb must be at most {self.app.settings.max_volume_gb}", field="size_gb")
            if status != InstanceStatus.ACTIVE:
                raise FailedPrecondition(f"instance is {status}; resize needs ACTIVE", field="name")
        return self._action(context, request.name, "resize_volume", {"size_gb": request.size_gb}, check)

    @grpc_edge
    async def ApplyPendingMaintenance(self, request: database_pb2.ApplyPendingMaintenanceRequest,
                                      context: Context) -> database_pb2.Instance:
        """The instance's pending maintenance (of the kinds asked, or all) starts now, not in its window."""
        p = current_principal(context)

        def mark() -> str:
            with self.app.sessions() as s, s.begin():
                row = owned_instance(s, p, request.name)
                if maintenance.apply_now(s, row.id, list(request.kinds)) == 0:
                    raise FailedPrecondition("the instance has no pending maintenance"
                                             + (f" of kinds {', '.join(request.kinds)}" if request.kinds else ""),
                                             field="kinds" if request.kinds else "name")
                return row.id
        iid = await asyncio.to_thread(mark)
        if await asyncio.to_thread(maintenance.tick, self.app.sessions):
            self.engine.wake()
        self.events.publish(iid, "task")
        with self.app.sessions() as s:
            return maintenance.decorate(s, self._pb(s, owned_instance(s, p, request.name)))

    @grpc_edge
    async def ScheduleAgentUpgrade(self, request: database_pb2.ScheduleAgentUpgradeRequest,
                                   context: Context) -> database_pb2.Instance:
        """Queues an upgrade of the instance's guest agent (admins only): in its window, or now."""
        p = current_principal(context)
        if not p.admin:
            raise PermissionDenied("only an admin upgrades guest agents", field="name")

        def queue() -> str:
            with self.app.sessions() as s, s.begin():
                row = owned_instance(s, p, request.name)
                maintenance.queue(s, row.id, "agent_upgrade", "upgrade the guest agent (mysqld keeps running)",
                                  apply_now=request.apply_now)
                return row.id
        iid = await asyncio.to_thread(queue)
        started = await asyncio.to_thread(maintenance.tick, self.app.sessions) if request.apply_now else []
        if started:
            self.engine.wake()
        self.events.publish(iid, "task")
        with self.app.sessions() as s:
            return maintenance.decorate(s, self._pb(s, owned_instance(s, p, request.name)))

    @grpc_edge
    async def WatchInstance(self, request: database_pb2.WatchInstanceRequest,
                            context: Context) -> AsyncIterator[database_pb2.InstanceEvent]:
        p = current_principal(context)
        with self.app.sessions() as s:
            iid = owned_instance(s, p, request.name).id
        q = self.events.subscribe(iid)
        try:
            last: bytes | None = None
            change = "initial"
            while True:
                # Through the view cache: a poke reaches every watcher of the instance, one of them reads.
                try:
                    view = self.views.view(p, f"instances/{iid}")
                except NotFound:
                    return  # the row is gone
                pb, deleted = view.pb, view.deleted
                if view.key != last:
                    last = view.key
                    ev = database_pb2.InstanceEvent(instance=pb, change=change)
                    ev.time.GetCurrentTime()
                    yield ev
                if deleted:
                    return
                try:  # asyncio.timeout, not wait_for: no task of its own per wait (1,000 watchers, every poke)
                    async with asyncio.timeout(self.app.settings.heartbeat_expiry_seconds):
                        change = await q.get()
                except TimeoutError:
                    change = "tick"  # re-derive: a guest may have gone silent without any event
        finally:
            self.events.unsubscribe(iid, q)

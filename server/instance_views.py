"""What a user sees of an instance: its status, derived Trove-style (the running task first, then the stored
state, then the guest's heartbeat: a silent guest is SHUTDOWN, not ACTIVE; a stopped one is SHUTDOWN too),
the Instance message, and the ownership check every instance-scoped call starts with."""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from reddwarf.common import states
from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import NotFound
from reddwarf.common.states import InstanceStatus, ServiceState, TaskState
from reddwarf.v1 import common_pb2, database_pb2

from . import models, tasks
from .auth import Principal
from .catalog import resource_id, ts
from .readcache import ReadCache

# The status an instance shows while a task of that kind runs on it.
TASK_STATUS = {"create_instance": InstanceStatus.BUILD, "delete_instance": InstanceStatus.DELETING,
               "restart_instance": InstanceStatus.REBOOT, "resize_instance": InstanceStatus.RESIZE,
               "resize_volume": InstanceStatus.RESIZE, "create_backup": InstanceStatus.BACKUP,
               "restore_instance": InstanceStatus.RESTORING, "stop_instance": InstanceStatus.STOPPING,
               "start_instance": InstanceStatus.STARTING, "upgrade_instance": InstanceStatus.UPGRADE}
# Stored on a row StopInstance stopped (until StartInstance): shown as SHUTDOWN. Not the SHUTDOWN a silent
# guest is stored with, which its next health report turns back into ACTIVE: a stopped instance stays
# stopped whatever a late heartbeat says, and only it can be started.
STOPPED = "STOPPED"
# Stored statuses shown as they are, whatever the guest reports.
SETTLED = (InstanceStatus.ERROR, InstanceStatus.BUILD, InstanceStatus.FAILED)
GUEST_DOWN = (ServiceState.CRASHED, ServiceState.SHUTDOWN, ServiceState.FAILED)
FAULTED = (InstanceStatus.ERROR, InstanceStatus.FAILED)
# Where an instance's memcached listens (Instance.services), on the instance's own address.
MEMCACHED_PORT = 11211


def extra_services(row: models.Instance) -> list[str]:
    """The services asked for at create beside the datastore (kept in create_params)."""
    return [str(x) for x in (row.create_params or {}).get("services", [])]
# Tasks whose failure leaves the instance as it was (a delete whose final backup failed deleted nothing; a
# failed stop or start leaves it running or stopped): their fault is shown on the instance, not in ERROR,
# until its next task.
HARMLESS_FAILURES = ("delete_instance", "stop_instance", "start_instance")


def owned_instance(s: Session, principal: Principal, name: str, field: str = "name") -> models.Instance:
    """The caller's live instance of that name. Another tenant's instance is NOT_FOUND, not
    PERMISSION_DENIED: its existence is not disclosed."""
    iid = resource_id(name, "instances", field)
    row = s.get(models.Instance, iid)
    if row is None or row.deleted_at is not None or (not principal.admin and row.tenant_id != principal.tenant_id):
        raise NotFound(f"instance {iid!r} does not exist", field=field)
    return row


def reported_service_state(health: dict[str, Any] | None) -> ServiceState | None:
    """The service state in a stored health report (proto JSON, so the enum value's name), if it names one."""
    name = str((health or {}).get("serviceState", ""))
    try:
        return states.from_pb(ServiceState, common_pb2.ServiceState.Value(name))
    except (ValueError, KeyError):
        return None


@dataclass(frozen=True)
class Related:
    """What an instance's view needs besides its row, read for many instances at once: its running task (the
    oldest active one), its newest task of any state, and its configuration-group binding."""
    active: dict[str, models.Task] = field(default_factory=dict)
    newest: dict[str, models.Task] = field(default_factory=dict)
    configs: dict[str, models.InstanceConfiguration] = field(default_factory=dict)


_T = aliased(models.Task)
# Every active task of the instances asked for, and each one's newest task: one statement, built once.
_RELATED_TASKS = (
    select(models.Task)
    .where(models.Task.resource.in_(bindparam("resources", expanding=True)),
           or_(models.Task.state.in_(tasks.ACTIVE_STATES),
               models.Task.created_at == select(func.max(_T.created_at)).where(_T.resource == models.Task.resource)
               .correlate(models.Task).scalar_subquery()))
    .order_by(models.Task.created_at, models.Task.id))
_CONFIGS = select(models.InstanceConfiguration).where(
    models.InstanceConfiguration.instance_id.in_(bindparam("ids", expanding=True)))


def related(s: Session, ids: list[str]) -> Related:
    """Two queries for any number of instances (ListInstances pages, GetInstance)."""
    if not ids:
        return Related()
    out = Related()
    for t in s.scalars(_RELATED_TASKS, {"resources": [f"instances/{i}" for i in ids]}):
        iid = t.resource.removeprefix("instances/")
        if t.state in tasks.ACTIVE_STATES:
            out.active.setdefault(iid, t)  # ordered by created_at: the oldest active task wins
        out.newest[iid] = t  # ordered: the last one seen is the newest
    for c in s.scalars(_CONFIGS, {"ids": ids}):
        out.configs[c.instance_id] = c
    return out


def derived_status(s: Session, row: models.Instance, heartbeat_expiry: float,
                   rel: Related | None = None) -> tuple[InstanceStatus, models.Task | None]:
    """The status a user sees, and the task running on the instance if any."""
    rel = rel if rel is not None else related(s, [row.id])
    task = rel.active.get(row.id)
    if row.deleted_at is not None:
        return InstanceStatus.DELETING, task
    if task is not None:
        if task.kind == "create_instance" and row.restored_from:
            return InstanceStatus.RESTORING, task
        return TASK_STATUS.get(task.kind, InstanceStatus.BUILD), task
    if row.status in SETTLED:
        return InstanceStatus(row.status), None
    if row.status == STOPPED:
        return InstanceStatus.SHUTDOWN, None
    if row.status == InstanceStatus.SHUTDOWN or row.health_at is None \
            or (utcnow() - row.health_at).total_seconds() > heartbeat_expiry:
        return InstanceStatus.SHUTDOWN, None
    if reported_service_state(row.health) in GUEST_DOWN:
        return InstanceStatus.SHUTDOWN, None
    # A static parameter of its configuration group waits for a restart (server/configurations.py).
    ic = rel.configs.get(row.id)
    if ic is not None and ic.restart_required:
        return InstanceStatus.RESTART_REQUIRED, None
    return InstanceStatus.ACTIVE, None


def instance_pb(s: Session, row: models.Instance, heartbeat_expiry: float,
                rel: Related | None = None) -> database_pb2.Instance:
    rel = rel if rel is not None else related(s, [row.id])
    status, task = derived_status(s, row, heartbeat_expiry, rel)
    pb = database_pb2.Instance(
        name=f"instances/{row.id}", id=row.id, display_name=row.display_name,
        status=states.to_pb(status), flavor=f"flavors/{row.flavor_id}",
        volume=database_pb2.Volume(size_gb=row.volume_size_gb, driver=row.volume_driver or "loop"),
        datastore=row.datastore, datastore_version=row.datastore_version,
        create_time=ts(row.created_at), update_time=ts(row.updated_at), tenant=f"tenants/{row.tenant_id}",
        host=f"hosts/{row.host_id}" if row.host_id else "", restored_from=row.restored_from or "",
        tags=row.tags or {}, deletion_protection=bool(row.deletion_protection))
    pb.services.extend(extra_services(row))
    if row.last_upgrade:  # written by server/upgrade.py
        u = row.last_upgrade
        pb.last_upgrade.CopyFrom(database_pb2.UpgradeReport(
            from_version=str(u.get("from_version", "")), to_version=str(u.get("to_version", "")),
            outcome=str(u.get("outcome", "")), downtime_seconds=float(u.get("downtime_seconds", 0.0)),
            backup=f"backups/{u['backup']}" if u.get("backup") else "",
            time=ts(dt.datetime.fromisoformat(u["time"])) if u.get("time") else None))
    if row.port:
        pb.endpoints.append(database_pb2.Endpoint(host=row.address, port=row.port, service="mysql"))
        if "memcached" in pb.services:
            pb.endpoints.append(database_pb2.Endpoint(host=row.address, port=MEMCACHED_PORT, service="memcached"))
    ic = rel.configs.get(row.id)
    if ic is not None and ic.configuration_id:
        pb.configuration = f"configurations/{ic.configuration_id}"
    if row.health:
        json_format.ParseDict(row.health, pb.health, ignore_unknown_fields=True)
        pb.volume.used_bytes = pb.health.datadir_bytes_used
    if task is not None:
        pb.task, pb.task_step, pb.task_progress_percent = f"tasks/{task.id}", task.current_step, \
            task.progress_percent
    if row.fault_message and status in FAULTED:
        pb.fault.CopyFrom(common_pb2.Fault(message=row.fault_message, details=row.fault_details,
                                           created=ts(row.fault_at)))
    elif task is None and status not in FAULTED:
        last = rel.newest.get(row.id)
        if last is not None and last.kind in HARMLESS_FAILURES and last.state == TaskState.FAILED:
            pb.fault.CopyFrom(common_pb2.Fault(message=last.fault_message, details=last.fault_details,
                                               created=ts(last.updated_at)))
    return pb


def instance_pbs(s: Session, rows: list[models.Instance], heartbeat_expiry: float) -> list[database_pb2.Instance]:
    """The views of many instances with two queries in all (not two per instance)."""
    rel = related(s, [r.id for r in rows])
    return [instance_pb(s, r, heartbeat_expiry, rel) for r in rows]


# -- the cached view (GetInstance, WatchInstance) ---------------------------------------------------------

@dataclass(frozen=True)
class View:
    """One instance's view as its owner sees it, with what the ownership check needs."""
    tenant_id: str
    deleted: bool
    pb: database_pb2.Instance  # shared by every caller served from the cache: never modified
    keep_seconds: float        # until the clock alone would change it (a heartbeat falls due); inf: never
    key: bytes = b""           # pb serialized deterministically: WatchInstance's "did it change", made once


def view_keys(obj: Any) -> Iterable[str] | None:
    """The instances whose view a change to `obj` (an Instance, Task or InstanceConfiguration) may change:
    exactly what instance_pb reads of them (the row, the tasks on `instances/<id>`, the configuration binding)."""
    if isinstance(obj, models.Instance):
        return (obj.id,)
    if isinstance(obj, models.Task):
        return (obj.resource.removeprefix("instances/"),) if (obj.resource or "").startswith("instances/") else ()
    if isinstance(obj, (models.InstanceConfiguration, models.MaintenanceWindow, models.PendingMaintenance,
                        models.AgentVersion)):
        return (obj.instance_id,)
    return None


class InstanceViews:
    """Instance views read through a ReadCache keyed by instance id (server/readcache.py). How stale an entry
    may be:
    - on this server never: every commit through its sessions that touches an instance's row, its tasks or its
      configuration binding drops that instance's entry at commit (a task engine's UPDATE statement on the
      tasks table drops every entry), before any WatchInstance is poked;
    - a status derived from the clock (a guest whose heartbeat falls due turns SHUTDOWN) is kept only until
      that moment;
    - a change committed by another server sharing the state DB is seen within `ttl` seconds
      (`instance_cache_seconds`, 1 s by default; 0 turns the cache off).
    The ownership check runs on every call, cached or not: another tenant's instance is NOT_FOUND."""

    def __init__(self, sessions: sessionmaker[Session], ttl: float, heartbeat_expiry: float) -> None:
        self.sessions, self.heartbeat_expiry = sessions, heartbeat_expiry
        self.cache: ReadCache[str, View] = ReadCache(
            ttl, sessions, (models.Instance, models.Task, models.InstanceConfiguration, models.MaintenanceWindow,
                            models.PendingMaintenance, models.AgentVersion), keys_of=view_keys)

    def _load(self, iid: str, field: str) -> View:
        with self.sessions() as s:
            row = s.get(models.Instance, iid)
            if row is None:
                raise NotFound(f"instance {iid!r} does not exist", field=field)
            keep = math.inf
            if row.health_at is not None:
                due = (row.health_at - utcnow()).total_seconds() + self.heartbeat_expiry
                keep = due if due > 0 else math.inf  # already due: only a write (a new heartbeat) changes it
            pb = instance_pb(s, row, self.heartbeat_expiry)
            # The maintenance window, pending actions (whose "when" moves at the window's edges, so the entry
            # is kept no longer than the next edge) and the agent's version.
            from . import maintenance  # imports this module

            now, window = utcnow(), maintenance.window_of(s, iid)
            maintenance.decorate(s, pb, now, window)
            keep = min(keep, (window.next_change(now) - now).total_seconds())
            return View(row.tenant_id, row.deleted_at is not None, pb, keep, pb.SerializeToString(deterministic=True))

    def view(self, principal: Principal, name: str, field: str = "name") -> View:
        """The view of the caller's instance of that name, deleted or not (WatchInstance's last event)."""
        iid = resource_id(name, "instances", field)
        v = self.cache.get(iid, lambda: self._load(iid, field), lambda v: v.keep_seconds)
        if not principal.admin and v.tenant_id != principal.tenant_id:
            raise NotFound(f"instance {iid!r} does not exist", field=field)
        return v

    def get(self, principal: Principal, name: str, field: str = "name") -> database_pb2.Instance:
        """GetInstance: the caller's live instance's view (owned_instance's rules: deleted is NOT_FOUND)."""
        v = self.view(principal, name, field)
        if v.deleted:
            raise NotFound(f"instance {resource_id(name, 'instances', field)!r} does not exist", field=field)
        return v.pb

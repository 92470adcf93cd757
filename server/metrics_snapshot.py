"""What the metrics know of the state DB: one snapshot of every instance that is not DELETED (its tenant,
its status as a user would see it, its stored health), its newest backups, and the tasks not yet ended,
read in a handful of queries every metrics_refresh_seconds (server/metrics.py serves it)."""
from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

from google.protobuf import json_format
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import states
from reddwarf.common.clock import now as utcnow
from reddwarf.common.states import BackupStatus, InstanceStatus, ServiceState, TaskState
from reddwarf.v1 import common_pb2

from . import models
from .instance_views import GUEST_DOWN, SETTLED, STOPPED, TASK_STATUS

DELETED = "DELETED"


@dataclass(frozen=True)
class InstanceFacts:
    id: str
    tenant: str
    status: str                        # as a user would see it (running task first, then the stored status)
    host_id: str
    health: common_pb2.GuestHealth     # the stored report (the newest one written by any server)
    health_at: dt.datetime | None


@dataclass(frozen=True)
class BackupFacts:
    """An instance's newest COMPLETED backup, and whether its newest finished one FAILED."""
    last_size: int | None = None
    last_duration: float | None = None
    last_success: dt.datetime | None = None
    last_failed: bool = False


@dataclass(frozen=True)
class Snapshot:
    taken: dt.datetime
    instances: tuple[InstanceFacts, ...] = ()
    backups: dict[str, BackupFacts] = field(default_factory=dict)
    tenant_backups: dict[tuple[str, str], int] = field(default_factory=dict)   # (tenant, status) -> count
    tenant_backup_bytes: dict[str, int] = field(default_factory=dict)
    tasks: dict[tuple[str, str], int] = field(default_factory=dict)            # (kind, state) -> count


def _status(stored: str, deleted: bool, restored: bool, task_kind: str | None, health: common_pb2.GuestHealth,
             health_at: dt.datetime | None, now: dt.datetime, expiry: float) -> str:
    """instance_views.derived_status, for many rows at once (the running task given, not queried), with one
    difference: an instance StopInstance stopped is STOPPED here (GetInstance shows SHUTDOWN), so an alert
    can tell a stop that was asked for from a guest gone silent."""
    if deleted:
        return InstanceStatus.DELETING
    if task_kind is not None:
        if task_kind == "create_instance" and restored:
            return InstanceStatus.RESTORING
        return TASK_STATUS.get(task_kind, InstanceStatus.BUILD)
    if stored in SETTLED or stored == STOPPED:
        return stored
    if stored == InstanceStatus.SHUTDOWN or health_at is None or (now - health_at).total_seconds() > expiry:
        return InstanceStatus.SHUTDOWN
    if health.service_state and states.from_pb(ServiceState, health.service_state) in GUEST_DOWN:
        return InstanceStatus.SHUTDOWN
    return InstanceStatus.ACTIVE


def read_snapshot(sessions: sessionmaker[Session], heartbeat_expiry: float) -> Snapshot:
    """One pass over the state DB: a handful of queries whatever the number of instances."""
    now = utcnow()
    Inst, B, T = models.Instance, models.Backup, models.Task
    with sessions() as s:
        running: dict[str, str] = {}
        for resource, kind in s.execute(select(T.resource, T.kind).where(T.state.in_(
                (TaskState.PENDING, TaskState.RUNNING))).order_by(T.created_at.desc())):
            running[resource] = kind  # the oldest active task wins, as active_task_for's
        tasks = {(k, st): n for k, st, n in s.execute(
            select(T.kind, T.state, func.count()).where(T.state.in_((TaskState.PENDING, TaskState.RUNNING)))
            .group_by(T.kind, T.state))}
        instances = []
        for iid, tenant, stored, deleted_at, restored_from, host_id, health, health_at in s.execute(
                select(Inst.id, Inst.tenant_id, Inst.status, Inst.deleted_at, Inst.restored_from, Inst.host_id,
                       Inst.health, Inst.health_at).where(Inst.status != DELETED)):
            pb = common_pb2.GuestHealth()
            if health:
                json_format.ParseDict(health, pb, ignore_unknown_fields=True)
            instances.append(InstanceFacts(
                iid, tenant, _status(stored, deleted_at is not None, bool(restored_from),
                                     running.get(f"instances/{iid}"), pb, health_at, now, heartbeat_expiry),
                host_id or "", pb, health_at))
        live = {i.id for i in instances}
        live_tenants = set(s.scalars(select(models.Tenant.id).where(models.Tenant.deleted_at.is_(None))))
        tenant_backups: dict[tuple[str, str], int] = {}
        tenant_bytes: dict[str, int] = defaultdict(int)
        for tenant, status, n, size in s.execute(
                select(B.tenant_id, B.status, func.count(), func.coalesce(func.sum(B.size_bytes), 0))
                .group_by(B.tenant_id, B.status)):
            if tenant in live_tenants:
                tenant_backups[(tenant, status)] = int(n)
                if status != BackupStatus.FAILED:
                    tenant_bytes[tenant] += int(size)
        # Newest first, so the first COMPLETED and the first finished backup seen per instance are the ones.
        newest_ok: dict[str, tuple[str, int, dt.datetime]] = {}
        newest_failed: dict[str, bool] = {}
        for bid, iid, status, size, created in s.execute(
                select(B.id, B.instance_id, B.status, B.size_bytes, B.created_at)
                .where(B.status.in_((BackupStatus.COMPLETED, BackupStatus.FAILED)))
                .order_by(B.created_at.desc())):
            if iid not in live:
                continue
            newest_failed.setdefault(iid, status == BackupStatus.FAILED)
            if status == BackupStatus.COMPLETED and iid not in newest_ok:
                newest_ok[iid] = (bid, int(size), created)
        # Durations from the create_backup tasks (their rows' updated_at is the moment they ended).
        took: dict[str, tuple[float, dt.datetime]] = {}
        resources = [f"backups/{bid}" for bid, _, _ in newest_ok.values()]
        for start in range(0, len(resources), 500):
            for resource, created, ended in s.execute(
                    select(T.resource, T.created_at, T.updated_at).where(
                        T.kind == "create_backup", T.state == TaskState.SUCCEEDED,
                        T.resource.in_(resources[start:start + 500]))):
                took[resource.split("/", 1)[1]] = ((ended - created).total_seconds(), ended)
    backups = {}
    for iid in live:
        ok = newest_ok.get(iid)
        done = took.get(ok[0]) if ok else None
        if ok is None and iid not in newest_failed:
            continue
        backups[iid] = BackupFacts(
            last_size=ok[1] if ok else None, last_duration=done[0] if done else None,
            last_success=(done[1] if done else ok[2]) if ok else None, last_failed=newest_failed.get(iid, False))
    return Snapshot(now, tuple(instances), backups, tenant_backups, dict(tenant_bytes), tasks)

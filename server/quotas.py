"""What a tenant (or a host) has allocated, and the quota checks against it: live instances, their
flavors' memory and their volumes; backups and the bytes they hold.

Checks are atomic: each first locks the tenant's row (`lock_tenant`) in the caller's transaction, which
then inserts what it checked for before it commits, so concurrent creates queue on the lock and each
counts what the ones before it added. MariaDB/PostgreSQL: SELECT ... FOR UPDATE (MariaDB's counts are then
locking reads, which see the newest rows rather than the transaction's older snapshot); SQLite: a no-op
UPDATE, which takes the database's single write lock at once (pysqlite only opens a transaction at the
first write, so reads before it are not part of one).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, func, select, update
from sqlalchemy.orm import Session

from reddwarf.common.errors import PermissionDenied, ResourceExhausted
from reddwarf.common.states import BackupStatus

from . import models


@dataclass(frozen=True)
class Allocation:
    instances: int
    memory_mb: int
    volume_gb: int


def _dialect(s: Session) -> str:
    return s.get_bind().dialect.name


def _count(s: Session, query: Select[Any], locking: bool = False) -> int:
    if locking and _dialect(s) in ("mysql", "mariadb"):
        # A locking read sees the newest committed rows (REPEATABLE READ's snapshot may be older).
        query = query.with_for_update(read=True)
    return int(s.scalar(query) or 0)


def allocated(s: Session, where: ColumnElement[bool], locking: bool = False) -> Allocation:
    """What the live (not deleted) instances matching `where` hold."""
    live = where & models.Instance.deleted_at.is_(None)
    count = _count(s, select(func.count()).select_from(models.Instance).where(live), locking)
    memory = _count(s, select(func.coalesce(func.sum(models.Flavor.memory_mb), 0)).select_from(models.Instance)
                    .join(models.Flavor, models.Flavor.id == models.Instance.flavor_id).where(live), locking)
    volume = _count(s, select(func.coalesce(func.sum(models.Instance.volume_size_gb), 0)).where(live), locking)
    return Allocation(count, memory, volume)


def tenant_allocation(s: Session, tenant_id: str, locking: bool = False) -> Allocation:
    return allocated(s, models.Instance.tenant_id == tenant_id, locking)


def backup_count(s: Session, tenant_id: str, locking: bool = False) -> int:
    return _count(s, select(func.count()).select_from(models.Backup).where(models.Backup.tenant_id == tenant_id),
                  locking)


def backup_bytes(s: Session, tenant_id: str, locking: bool = False) -> int:
    """Bytes the tenant's backups hold in the store (a FAILED backup's object is deleted)."""
    return _count(s, select(func.coalesce(func.sum(models.Backup.size_bytes), 0))
                  .where(models.Backup.tenant_id == tenant_id, models.Backup.status != BackupStatus.FAILED), locking)


def lock_tenant(s: Session, tenant_id: str) -> models.Tenant:
    """Locks the tenant's row until the caller's transaction ends and returns it freshly read: the quota
    checks of one tenant run one at a time. PERMISSION_DENIED if the tenant is gone."""
    if _dialect(s) == "sqlite":
        s.execute(update(models.Tenant).where(models.Tenant.id == tenant_id)
                  .values(quota_instances=models.Tenant.quota_instances))
        tenant = s.scalars(select(models.Tenant).where(models.Tenant.id == tenant_id)
                           .execution_options(populate_existing=True)).first()
    else:
        tenant = s.scalars(select(models.Tenant).where(models.Tenant.id == tenant_id).with_for_update()
                           .execution_options(populate_existing=True)).first()
    if tenant is None or tenant.deleted_at is not None:
        raise PermissionDenied(f"tenant {tenant_id!r} does not exist", field="tenant")
    return tenant


def _check(what: str, used: int, add: int, limit: int, field: str) -> None:
    if used + add > limit:
        raise ResourceExhausted(f"quota exceeded: {what} would be {used + add}, limit {limit}", field=field)


def check_instance_quota(s: Session, tenant: models.Tenant, memory_mb: int, volume_gb: int) -> None:
    """RESOURCE_EXHAUSTED naming the first quota one more instance of that size would exceed. Locks the
    tenant: the caller inserts the instance in the same transaction."""
    tenant = lock_tenant(s, tenant.id)
    used = tenant_allocation(s, tenant.id, locking=True)
    _check("instances", used.instances, 1, tenant.quota_instances, "instance")
    _check("memory_mb", used.memory_mb, memory_mb, tenant.quota_memory_mb, "instance.flavor")
    _check("volume_gb", used.volume_gb, volume_gb, tenant.quota_volume_gb, "instance.volume.size_gb")


def check_backup_quota(s: Session, tenant: models.Tenant) -> None:
    """RESOURCE_EXHAUSTED when one more backup would exceed the tenant's backup count, or its backups
    already hold all the bytes it may store. Locks the tenant: the caller inserts the backup in the same
    transaction."""
    tenant = lock_tenant(s, tenant.id)
    _check("backups", backup_count(s, tenant.id, locking=True), 1, tenant.quota_backups, "backup")
    stored = backup_bytes(s, tenant.id, locking=True)
    if stored >= tenant.quota_backup_bytes:
        raise ResourceExhausted(f"quota exceeded: backups hold {stored} bytes, limit {tenant.quota_backup_bytes}",
                                field="backup")


def remaining_backup_bytes(s: Session, tenant_id: str) -> int:
    """What the tenant's stored-bytes quota still allows (an upload's cap); 0 when the tenant is gone."""
    tenant = s.get(models.Tenant, tenant_id)
    if tenant is None:
        return 0
    return max(0, tenant.quota_backup_bytes - backup_bytes(s, tenant_id))

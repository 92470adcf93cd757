"""What a tenant (or a host) has allocated, and the quota checks against it: live instances, their
flavors' memory and their volumes; backups."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session

from reddwarf.common.errors import ResourceExhausted

from . import models


@dataclass(frozen=True)
class Allocation:
    instances: int
    memory_mb: int
    volume_gb: int


def allocated(s: Session, where: ColumnElement[bool]) -> Allocation:
    """What the live (not deleted) instances matching `where` hold."""
    live = where & models.Instance.deleted_at.is_(None)
    count = s.scalar(select(func.count()).select_from(models.Instance).where(live)) or 0
    memory = s.scalar(select(func.coalesce(func.sum(models.Flavor.memory_mb), 0)).select_from(models.Instance)
                      .join(models.Flavor, models.Flavor.id == models.Instance.flavor_id).where(live)) or 0
    volume = s.scalar(select(func.coalesce(func.sum(models.Instance.volume_size_gb), 0)).where(live)) or 0
    return Allocation(int(count), int(memory), int(volume))


def tenant_allocation(s: Session, tenant_id: str) -> Allocation:
    return allocated(s, models.Instance.tenant_id == tenant_id)


def backup_count(s: Session, tenant_id: str) -> int:
    return int(s.scalar(select(func.count()).select_from(models.Backup)
                        .where(models.Backup.tenant_id == tenant_id)) or 0)


def _check(what: str, used: int, add: int, limit: int, field: str) -> None:
    if used + add > limit:
        raise ResourceExhausted(f"quota exceeded: {what} would be {used + add}, limit {limit}", field=field)


def check_instance_quota(s: Session, tenant: models.Tenant, memory_mb: int, volume_gb: int) -> None:
    """RESOURCE_EXHAUSTED naming the first quota one more instance of that size would exceed."""
    used = tenant_allocation(s, tenant.id)
    _check("instances", used.instances, 1, tenant.quota_instances, "instance")
    _check("memory_mb", used.memory_mb, memory_mb, tenant.quota_memory_mb, "instance.flavor")
    _check("volume_gb", used.volume_gb, volume_gb, tenant.quota_volume_gb, "instance.volume.size_gb")


def check_backup_quota(s: Session, tenant: models.Tenant) -> None:
    _check("backups", backup_count(s, tenant.id), 1, tenant.quota_backups, "backup")

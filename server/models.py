"""The control server's state: SQLAlchemy 2 models for every table (SQLite, MariaDB or PostgreSQL).

This module is the state contract the server's modules share, as the protos are between processes.
Schema changes go through an Alembic migration in server/migrations. Secrets are never stored in
clear: tokens and enrollment tokens are kept as SHA-256 hashes; root passwords are not kept at all.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reddwarf.common.clock import now as utcnow
from reddwarf.common.states import BackupStatus, HostState, InstanceStatus, TaskState, VerifyStatus


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}  # noqa: RUF012 - SQLAlchemy reads it


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(255), default="")
    quota_instances: Mapped[int] = mapped_column(Integer, default=10)
    quota_memory_mb: Mapped[int] = mapped_column(BigInteger, default=32768)
    quota_volume_gb: Mapped[int] = mapped_column(BigInteger, default=200)
    quota_backups: Mapped[int] = mapped_column(Integer, default=50)
    # Bytes the tenant's stored (not FAILED) backups may hold in total.
    quota_backup_bytes: Mapped[int] = mapped_column(BigInteger, default=1 << 40, server_default=str(1 << 40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # A deleted tenant's row stays as a tombstone: its id is never given out again, so a new tenant
    # cannot inherit anything recorded under the old one.
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class TenantKey(Base):
    """A tenant's backup data key, wrapped by the server's key-encryption key (server/keys.py). Deleting
    the row is crypto-shredding: every backup object encrypted under it becomes unreadable."""
    __tablename__ = "tenant_keys"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    # nonce || AES-256-GCM(KEK, data key), the tenant id as associated data.
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    # Which KEK wrapped it (a hash-derived name, not the key).
    kek_id: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Token(Base):
    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    # hex SHA-256 of the secret; the secret itself is shown once and never stored.
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(String(255), default="")
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Flavor(Base):
    __tablename__ = "flavors"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(255))
    memory_mb: Mapped[int] = mapped_column(BigInteger)
    swap_mb: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_shares: Mapped[int] = mapped_column(Integer, default=1024)
    cpu_limit_millicores: Mapped[int] = mapped_column(Integer, default=0)
    max_processes: Mapped[int] = mapped_column(Integer, default=512)
    max_open_files: Mapped[int] = mapped_column(Integer, default=0)
    io_weight: Mapped[int] = mapped_column(Integer, default=500)
    io_iops: Mapped[int] = mapped_column(Integer, default=0)
    io_bytes_per_sec: Mapped[int] = mapped_column(BigInteger, default=0)
    default_volume_gb: Mapped[int] = mapped_column(Integer, default=1)


class Datastore(Base):
    __tablename__ = "datastores"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    default_version: Mapped[str] = mapped_column(String(64))


class DatastoreVersion(Base):
    __tablename__ = "datastore_versions"
    __table_args__ = (UniqueConstraint("datastore_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    datastore_id: Mapped[str] = mapped_column(ForeignKey("datastores.id", ondelete="CASCADE"))
    version: Mapped[str] = mapped_column(String(64))
    packages: Mapped[list[Any]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # The exact versions of its template's packages, as a host last reported them (server/instance_tasks.py).
    package_versions: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The template revision new containers of this version come from (PatchDatastoreVersion raises it;
    # server/patching.py); 0 is the version's first template.
    template_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    address: Mapped[str] = mapped_column(String(255))
    state: Mapped[str] = mapped_column(String(16), default=HostState.UP)
    container_driver: Mapped[str] = mapped_column(String(32), default="")
    volume_driver: Mapped[str] = mapped_column(String(32), default="")
    memory_mb_total: Mapped[int] = mapped_column(BigInteger, default=0)
    cpus: Mapped[int] = mapped_column(Integer, default=0)
    storage_gb_total: Mapped[int] = mapped_column(BigInteger, default=0)
    storage_gb_free: Mapped[int] = mapped_column(BigInteger, default=0)
    containers: Mapped[int] = mapped_column(Integer, default=0)
    memory_overcommit: Mapped[float] = mapped_column(Float, default=0.0)
    storage_overcommit: Mapped[float] = mapped_column(Float, default=0.0)
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # From hostd's capacity report: "compute" or "storage" (a SAN node, never given a container), the
    # initiator name a SAN LUN must admit (compute hosts with iscsi volumes), the portal (SAN nodes).
    mode: Mapped[str] = mapped_column(String(16), default="compute", server_default="compute")
    initiator_iqn: Mapped[str] = mapped_column(String(255), default="", server_default="")
    iscsi_portal: Mapped[str] = mapped_column(String(255), default="", server_default="")


class Instance(Base):
    __tablename__ = "instances"
    # ix_instances_live_order: ListInstances' order, so a page after a page token is a short index range
    # (keyset paging, server/pagination.py) at any depth.
    __table_args__ = (UniqueConstraint("tenant_id", "request_id"), Index("ix_instances_tenant", "tenant_id"),
                      Index("ix_instances_live_order", "deleted_at", "created_at", "id"))
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    display_name: Mapped[str] = mapped_column(String(255))
    # The stored status: an InstanceStatus value (or "DELETED" on a deleted row). The status users see is
    # derived from it, the running task and the guest's heartbeat (see server/instance_views.py).
    status: Mapped[str] = mapped_column(String(32), default=InstanceStatus.BUILD)
    flavor_id: Mapped[str] = mapped_column(ForeignKey("flavors.id"))
    volume_size_gb: Mapped[int] = mapped_column(Integer)
    datastore: Mapped[str] = mapped_column(String(64))
    datastore_version: Mapped[str] = mapped_column(String(64))
    host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    # The data volume: its driver ("loop", "iscsi"; "" on rows older than this column: loop), and for iscsi
    # the SAN node holding its LUN, the LUN's locator and its CHAP account (the secret sealed, see sealing.py).
    volume_driver: Mapped[str] = mapped_column(String(16), default="", server_default="")
    storage_host_id: Mapped[str | None] = mapped_column(ForeignKey("hosts.id"), nullable=True)
    volume_locator: Mapped[str] = mapped_column(String(512), default="", server_default="")
    volume_chap: Mapped[str] = mapped_column(Text, default="", server_default="")
    address: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[int] = mapped_column(Integer, default=0)
    task_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    fault_message: Mapped[str] = mapped_column(Text, default="")
    fault_details: Mapped[str] = mapped_column(Text, default="")
    fault_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Last GuestHealth as protobuf JSON (MessageToDict), and when it arrived.
    health: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    health_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    root_enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    restored_from: Mapped[str] = mapped_column(String(36), default="")
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # The create request's initial databases/users, kept until prepare ran (passwords are dropped then).
    create_params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # {key: value}, validated by server/tags.py; ListInstances filters on them in SQL.
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    # While set, DeleteInstance is refused (RDS's DeletionProtection).
    deletion_protection: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The last UpgradeInstance's report (server/upgrade.py): from/to version, outcome, downtime, backup.
    last_upgrade: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # The template revision its container comes from: set on create and when an upgrade or patch finishes;
    # a migration or evacuation recreates the container from it (server/instance_tasks.py).
    template_revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_state_lease", "state", "lease_expires"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    # "instances/{id}" / "backups/{id}"
    resource: Mapped[str] = mapped_column(String(128), index=True)
    # Whose resource it is: the engine caps how many of one tenant's tasks run at once. None: no tenant.
    tenant_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    state: Mapped[str] = mapped_column(String(16), default=TaskState.PENDING)
    current_step: Mapped[str] = mapped_column(String(64), default="")
    # [{"step": str, "state": str, "started": iso, "finished": iso|None, "detail": str}]
    steps: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # What the steps need and what they produced (host chosen, container id, ...); never secrets.
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    progress_percent: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_expires: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    fault_message: Mapped[str] = mapped_column(Text, default="")
    fault_details: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class Backup(Base):
    __tablename__ = "backups"
    # A create's request id (server/idempotency.py): a retry with the same one returns this backup.
    __table_args__ = (UniqueConstraint("tenant_id", "request_id", name="uq_backups_tenant_request"),)
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    display_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(16), default=BackupStatus.NEW)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("backups.id"), nullable=True)
    kind: Mapped[str] = mapped_column(String(16), default="full")
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    sha256: Mapped[str] = mapped_column(String(64), default="")
    datastore: Mapped[str] = mapped_column(String(64), default="")
    datastore_version: Mapped[str] = mapped_column(String(64), default="")
    # [{"table": "db.t", "checksum": int}]
    checksums: Mapped[list[Any]] = mapped_column(JSON, default=list)
    to_lsn: Mapped[str] = mapped_column(String(32), default="")
    location: Mapped[str] = mapped_column(String(1024), default="")
    verify_status: Mapped[str] = mapped_column(String(16), default=VerifyStatus.NOT_VERIFIED)
    verify_detail: Mapped[str] = mapped_column(Text, default="")
    fault_message: Mapped[str] = mapped_column(Text, default="")
    fault_details: Mapped[str] = mapped_column(Text, default="")
    # {key: value}, as Instance.tags.
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict, server_default="{}")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class BackupSchedule(Base):
    __tablename__ = "backup_schedules"
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    interval_seconds: Mapped[int] = mapped_column(BigInteger)
    keep: Mapped[int] = mapped_column(Integer)
    full_every: Mapped[int] = mapped_column(Integer, default=1)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    next_run: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # Why the last scheduled run took no backup (a quota), cleared when one is taken again.
    fault_message: Mapped[str] = mapped_column(Text, default="")
    fault_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Certificate(Base):
    __tablename__ = "certificates"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    identity: Mapped[str] = mapped_column(String(255), index=True)  # spiffe://reddwarf/{role}/{id}
    role: Mapped[str] = mapped_column(String(32))
    subject_id: Mapped[str] = mapped_column(String(128))
    not_after: Mapped[dt.datetime] = mapped_column(DateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoke_reason: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class EnrollmentToken(Base):
    __tablename__ = "enrollment_tokens"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime)
    used_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class AgentCommand(Base):
    """Commands sent to guest agents: so a replay after a reconnect or a server restart reuses the id."""
    __tablename__ = "agent_commands"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    # "sent", "succeeded", "failed"
    state: Mapped[str] = mapped_column(String(16), default="sent")
    # Serialized CommandResult (never carries passwords: root credentials are not persisted).
    result: Mapped[bytes | None] = mapped_column(nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)


class Configuration(Base):
    """A tenant's configuration group: named parameter values (canonical text) for one datastore version."""
    __tablename__ = "configurations"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    display_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str] = mapped_column(Text, default="")
    datastore: Mapped[str] = mapped_column(String(64))
    datastore_version: Mapped[str] = mapped_column(String(64))
    values: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class InstanceConfiguration(Base):
    """An instance's configuration group (none once detached), the values its guest last applied, and
    whether a static one waits for a restart (the instance shows RESTART_REQUIRED until then)."""
    __tablename__ = "instance_configurations"
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    configuration_id: Mapped[str | None] = mapped_column(ForeignKey("configurations.id"), nullable=True, index=True)
    applied: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    restart_required: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
class Event(Base):
    """The event history (server/audit.py): every change asked through the API and every status change of
    an instance, backup or host. Never holds a secret: requests are recorded redacted."""
    __tablename__ = "events"
    __table_args__ = (Index("ix_events_tenant_id", "tenant_id", "id"), Index("ix_events_resource", "resource", "id"),
                      Index("ix_events_time", "time"))
    # SQLite only autoincrements an INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
                                    autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # "api" or "status"
    kind: Mapped[str] = mapped_column(String(16))
    tenant_id: Mapped[str] = mapped_column(String(64), default="")
    resource: Mapped[str] = mapped_column(String(128), default="")
    actor: Mapped[str] = mapped_column(String(255), default="")
    request_id: Mapped[str] = mapped_column(String(64), default="")
    method: Mapped[str] = mapped_column(String(128), default="")
    summary: Mapped[str] = mapped_column(Text, default="")
    code: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(64), default="")
    previous_status: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class AgentStream(Base):
    """Which server holds each guest agent's stream now (server/cluster.py): a server that needs the guest
    and does not hold its stream relays the command through agent_relay to the one that does."""
    __tablename__ = "agent_streams"
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    server_name: Mapped[str] = mapped_column(String(128), index=True)
    # A fresh token per stream: a server letting go of a stream deletes only its own claim, never a newer one.
    claim: Mapped[str] = mapped_column(String(64), default="")
    # The agent's Hello (serialized), so a server waiting for it on another server gets the same answer.
    hello: Mapped[bytes] = mapped_column(LargeBinary, default=b"")
    connected_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class AgentRelay(Base):
    """A command one server asked of a guest whose stream another server holds; the holder sends it and
    writes the progress and result back here (server/cluster.py)."""
    __tablename__ = "agent_relay"
    command_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    origin: Mapped[str] = mapped_column(String(128))
    command: Mapped[bytes] = mapped_column(LargeBinary)
    progress: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ServerMember(Base):
    """The servers of a deployment and when each last said it was alive (server/cluster.py)."""
    __tablename__ = "servers"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_address: Mapped[str] = mapped_column(String(255), default="")
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class MaintenanceWindow(Base):
    """An instance's weekly maintenance window in UTC (server/maintenance.py); none stored = the default."""
    __tablename__ = "maintenance_windows"
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    weekday: Mapped[int] = mapped_column(Integer)  # 1 = Monday .. 7 = Sunday
    start_minute: Mapped[int] = mapped_column(Integer)  # minutes after 00:00 UTC
    duration_minutes: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class PendingMaintenance(Base):
    """One maintenance action of an instance (restart, agent_upgrade, upgrade, patch) waiting for its
    window, running as a task, or ended. `open_key` ("<instance>:<kind>") is set while pending or running
    and unique, so two servers cannot queue the same action twice; it is cleared when the action ends."""
    __tablename__ = "pending_maintenance"
    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(String(255), default="")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending, running, done, failed, cancelled
    apply_now: Mapped[bool] = mapped_column(Boolean, default=False)
    open_key: Mapped[str | None] = mapped_column(String(80), nullable=True, unique=True)
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class AgentVersion(Base):
    """What each instance's guest agent said on its last hello: the admin view of an agent roll-out."""
    __tablename__ = "agent_versions"
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    version: Mapped[str] = mapped_column(String(64), default="")
    boot_id: Mapped[str] = mapped_column(String(64), default="")
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)

"""Instances: the Instances service and the durable tasks behind it (create, delete, restart, resize).

Create is a task of idempotent steps (see DESIGN.md): schedule → create_volume → create_container →
start_container → wait_agent → prepare → activate. Every hostd call is idempotent by the instance id and
every agent command carries a task-derived id, so a server killed after any step resumes it without
duplicating a container or a volume. The status a user sees is derived Trove-style: the running task
first, then the stored state, then the guest's heartbeat (a silent guest is SHUTDOWN, not ACTIVE).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import uuid
from typing import Any

from google.protobuf import json_format
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from reddwarf.common import names
from reddwarf.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    grpc_edge,
)
from reddwarf.common import states
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2, database_pb2_grpc, host_pb2

from . import models, tasks
from .admin import revoke_identity
from .app import App
from .auth import Principal, certificate_revoked, current_principal, hash_secret
from .catalog import limits_of, resource_id, ts
from .hosts import place
from .pagination import Paginator

log = logging.getLogger("reddwarf.server.instances")

DATADIR = "/var/lib/mysql"
TASK_STATUS = {"create_instance": "BUILD", "delete_instance": "DELETING", "restart_instance": "REBOOT",
               "resize_instance": "RESIZE", "resize_volume": "RESIZE", "create_backup": "BACKUP",
               "restore_instance": "RESTORING"}
MAX_NAME = 255
AGENT_CONNECT_TIMEOUT = 180
PREPARE_TIMEOUT = 900


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def owned_instance(s: Session, principal: Principal, name: str, field: str = "name") -> models.Instance:
    """The caller's live instance of that name. Another tenant's instance is NOT_FOUND, not
    PERMISSION_DENIED: its existence is not disclosed."""
    iid = resource_id(name, "instances", field)
    row = s.get(models.Instance, iid)
    if row is None or row.deleted_at is not None or (not principal.admin and row.tenant_id != principal.tenant_id):
        raise NotFound(f"instance {iid!r} does not exist", field=field)
    return row


class Instances:
    """Shared by the servicers and the task steps."""

    def __init__(self, app: App, secret: bytes) -> None:
        self.app = app
        self._secret = secret

    # -- the initial users' passwords: sealed while they wait for prepare --------------------------
    def _fernet(self):  # type: ignore[no-untyped-def]
        import base64

        from cryptography.fernet import Fernet
        key = hmac.new(self._secret, b"create-params", hashlib.sha256).digest()
        return Fernet(base64.urlsafe_b64encode(key))

    def seal(self, password: str) -> str:
        # The state DB never holds a tenant's password in clear, not even until prepare has run.
        return "sealed:" + self._fernet().encrypt(password.encode()).decode()

    def unseal(self, value: str) -> str:
        return self._fernet().decrypt(value.removeprefix("sealed:").encode()).decode()

    # -- enrollment tokens: derived, never stored in clear ---------------------------------------
    def enrollment_token(self, instance_id: str, generation: int = 0) -> str:
        # Recomputable from the server secret, so a replayed create_container step hands hostd the very
        # same bootstrap (hostd's create is idempotent on it), yet the DB only holds the hash.
        return hmac.new(self._secret, f"enroll:{instance_id}:{generation}".encode(), hashlib.sha256).hexdigest()

    async def verify_and_consume_token(self, instance_id: str, token: str) -> bool:
        def check() -> bool:
            with self.app.sessions() as s, s.begin():
                row = s.get(models.EnrollmentToken, hash_secret(token))
                if row is None or row.instance_id != instance_id or row.used_at is not None \
                        or row.expires_at < now():
                    return False
                row.used_at = now()
                return True
        return await asyncio.to_thread(check)

    def sign_csr(self, csr_pem: bytes, instance_id: str) -> tuple[bytes, bytes]:
        from .admin import record_certificate
        issued = self.app.ca.sign_csr(csr_pem, "instance", instance_id)
        with self.app.sessions() as s, s.begin():
            record_certificate(s, issued.cert_pem, issued.not_after)
        return issued.cert_pem, self.app.ca.cert_pem

    # -- views -----------------------------------------------------------------------------------
    def derived_status(self, s: Session, row: models.Instance) -> tuple[str, models.Task | None]:
        task = tasks.active_task_for(s, f"instances/{row.id}")
        if row.deleted_at is not None:
            return "DELETING", task
        if task is not None:
            if task.kind == "create_instance" and row.restored_from:
                return "RESTORING", task
            return TASK_STATUS.get(task.kind, "BUILD"), task
        if row.status in ("ERROR", "BUILD", "FAILED"):
            return row.status, None
        expiry = self.app.settings.heartbeat_expiry_seconds
        if row.status == "SHUTDOWN" or row.health_at is None or (now() - row.health_at).total_seconds() > expiry:
            return "SHUTDOWN", None
        state = (row.health or {}).get("serviceState", "")
        if state in ("SERVICE_STATE_CRASHED", "SERVICE_STATE_SHUTDOWN", "SERVICE_STATE_FAILED"):
            return "SHUTDOWN", None
        return "ACTIVE", None

    def to_pb(self, s: Session, row: models.Instance) -> database_pb2.Instance:
        status, task = self.derived_status(s, row)
        pb = database_pb2.Instance(
            name=f"instances/{row.id}", id=row.id, display_name=row.display_name,
            status=states.to_pb(states.InstanceStatus(status)), flavor=f"flavors/{row.flavor_id}",
            volume=database_pb2.Volume(size_gb=row.volume_size_gb, driver="loop"),
            datastore=row.datastore, datastore_version=row.datastore_version,
            create_time=ts(row.created_at), update_time=ts(row.updated_at), tenant=f"tenants/{row.tenant_id}",
            host=f"hosts/{row.host_id}" if row.host_id else "", restored_from=row.restored_from or "")
        if row.port:
            pb.endpoints.append(database_pb2.Endpoint(host=row.address, port=row.port))
        if row.health:
            json_format.ParseDict(row.health, pb.health, ignore_unknown_fields=True)
            pb.volume.used_bytes = pb.health.datadir_bytes_used
        if task is not None:
            pb.task, pb.task_step, pb.task_progress_percent = f"tasks/{task.id}", task.current_step, \
                task.progress_percent
        if row.fault_message and status in ("ERROR", "FAILED"):
            pb.fault.CopyFrom(common_pb2.Fault(message=row.fault_message, details=row.fault_details,
                                               created=ts(row.fault_at)))
        return pb

    def owned(self, s: Session, principal: Principal, name: str, field: str = "name") -> models.Instance:
        return owned_instance(s, principal, name, field)

    # -- state callbacks from the agent registry -------------------------------------------------
    async def on_health(self, instance_id: str, health: common_pb2.GuestHealth) -> None:
        data = json_format.MessageToDict(health)

        def save() -> None:
            with self.app.sessions() as s, s.begin():
                row = s.get(models.Instance, instance_id)
                if row is None:
                    return
                row.health = data
                row.health_at = now()
                if row.status == "SHUTDOWN" and health.service_state == common_pb2.SERVICE_STATE_RUNNING:
                    row.status = "ACTIVE"
        await asyncio.to_thread(save)
        if self.app.events is not None:
            self.app.events.publish(instance_id, "health")

    async def on_silent(self, instance_id: str) -> None:
        def save() -> None:
            with self.app.sessions() as s, s.begin():
                row = s.get(models.Instance, instance_id)
                if row is not None and row.status == "ACTIVE":
                    row.status = "SHUTDOWN"
        await asyncio.to_thread(save)
        if self.app.events is not None:
            self.app.events.publish(instance_id, "silent")

    def is_revoked(self, serial: int) -> bool:
        return certificate_revoked(self.app.sessions, serial)

    # -- task steps ------------------------------------------------------------------------------
    def _row(self, iid: str) -> models.Instance:
        with self.app.sessions() as s:
            row = s.get(models.Instance, iid)
            if row is None:
                raise NotFound(f"instance {iid} vanished", field="instance")
            s.expunge(row)
            return row

    def _update(self, iid: str, **values: Any) -> None:
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Instance, iid)
            if row is not None:
                for k, v in values.items():
                    setattr(row, k, v)
        if self.app.events is not None:
            self.app.events.publish(iid)

    def _flavor(self, flavor_id: str) -> models.Flavor:
        with self.app.sessions() as s:
            f = s.get(models.Flavor, flavor_id)
            if f is None:
                raise NotFound(f"flavor {flavor_id} does not exist", field="flavor")
            s.expunge(f)
            return f

    async def step_schedule(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.host_id:
            return

        def pick() -> str:
            with self.app.sessions() as s, s.begin():
                f = s.get(models.Flavor, row.flavor_id)
                assert f is not None
                host = place(s, f.memory_mb, row.volume_size_gb)
                s.get(models.Instance, row.id).host_id = host  # type: ignore[union-attr]
                return host
        host = await asyncio.to_thread(pick)
        await ctx.save(host_id=host)

    async def step_create_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        await self.app.hosts.client(row.host_id).CreateVolume(host_pb2.CreateVolumeRequest(
            volume=host_pb2.HostVolume(id=row.id, size_gb=row.volume_size_gb)))

    async def step_create_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        token = self.enrollment_token(row.id)

        def remember_token() -> None:
            with self.app.sessions() as s, s.begin():
                if s.get(models.EnrollmentToken, hash_secret(token)) is None:
                    s.add(models.EnrollmentToken(token_hash=hash_secret(token), instance_id=row.id,
                                                 expires_at=now() + dt.timedelta(hours=2)))
        await asyncio.to_thread(remember_token)
        st = self.app.settings
        c = await self.app.hosts.client(row.host_id).CreateContainer(host_pb2.CreateContainerRequest(
            container=host_pb2.Container(
                id=row.id, limits=limits_of(self._flavor(row.flavor_id)), network_mode=host_pb2.NETWORK_MODE_UNSPECIFIED,
                volume_id=row.id, datadir=DATADIR,
                bootstrap=host_pb2.AgentBootstrap(
                    server_address=st.agent_public_address, enroll_address=st.enroll_public_address,
                    ca_pem=self.app.ca.cert_pem.decode(), enrollment_token=token, instance_id=row.id,
                    heartbeat_seconds=st.heartbeat_seconds))))
        self._update(row.id, address=c.address, port=c.port)

    async def step_start_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        await self.app.hosts.client(row.host_id).StartContainer(host_pb2.ContainerRef(id=row.id))

    async def step_wait_agent(self, ctx: tasks.StepContext) -> None:
        await self.app.registry.wait_for_hello(ctx.resource_id, AGENT_CONNECT_TIMEOUT)

    async def step_prepare(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        params = row.create_params or {}
        with self.app.sessions() as s:
            version = s.scalar(select(models.DatastoreVersion).where(
                models.DatastoreVersion.datastore_id == row.datastore,
                models.DatastoreVersion.version == row.datastore_version))
            packages = list(version.packages) if version else []
        spec = agent_pb2.Prepare(
            services=[agent_pb2.ServiceSpec(service=row.datastore, version=row.datastore_version,
                                            packages=packages, port=row.port)],
            limits=limits_of(self._flavor(row.flavor_id)), datadir=DATADIR, bind_address=row.address or "127.0.0.1",
            databases=[json_format.ParseDict(d, common_pb2.Database()) for d in params.get("databases", [])],
            users=[json_format.ParseDict({**u, "password": self.unseal(u["password"])} if u.get("password") else u,
                                         common_pb2.User()) for u in params.get("users", [])])

        async def progress(p: agent_pb2.Progress) -> None:
            await ctx.progress(min(95, 60 + p.percent // 3))
        await self.app.registry.call(row.id, agent_pb2.Command(command_id=f"{ctx.task_id}:prepare", prepare=spec),
                                     timeout=PREPARE_TIMEOUT, on_progress=progress)
        # The users' passwords were needed exactly once; they are not kept.
        kept = {"databases": params.get("databases", []),
                "users": [{k: v for k, v in u.items() if k != "password"} for u in params.get("users", [])]}
        self._update(row.id, create_params=kept)

    async def step_restore(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.restored_from:
            await self.app.extras["backups"].restore_into(ctx, row.id, row.restored_from)

    async def step_activate(self, ctx: tasks.StepContext) -> None:
        # ACTIVE means "accepting connections now", proven by a fresh health report, not assumed.
        res = await self.app.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:health", get_health=agent_pb2.GetHealth()), timeout=60)
        if not res.health.accepting_connections:
            raise tasks.TransientError(f"mysqld is not accepting connections yet: {res.health.last_error}")
        await self.on_health(ctx.resource_id, res.health)
        self._update(ctx.resource_id, status="ACTIVE")

    async def compensate_create(self, ctx: tasks.StepContext) -> None:
        """A create that cannot succeed gives back what it took: container and volume."""
        row = self._row(ctx.resource_id)
        if not row.host_id:
            return
        client = self.app.hosts.client(row.host_id)
        for call, req in ((client.DeleteContainer, host_pb2.ContainerRef(id=row.id)),
                          (client.DeleteVolume, host_pb2.DeleteVolumeRequest(id=row.id))):
            try:
                await call(req)
            except NotFound:
                pass

    async def failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        self._update(ctx.resource_id, status="ERROR", fault_message=fault, fault_details=details, fault_at=now())

    async def step_delete_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.host_id:
            try:
                await self.app.hosts.client(row.host_id).DeleteContainer(host_pb2.ContainerRef(id=row.id))
            except NotFound:
                pass

    async def step_delete_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.host_id:
            try:
                await self.app.hosts.client(row.host_id).DeleteVolume(host_pb2.DeleteVolumeRequest(id=row.id))
            except NotFound:
                pass

    async def step_revoke(self, ctx: tasks.StepContext) -> None:
        iid = ctx.resource_id

        def revoke() -> None:
            with self.app.sessions() as s, s.begin():
                revoke_identity(self.app, s, f"spiffe://reddwarf/instance/{iid}", "instance deleted")
        await asyncio.to_thread(revoke)
        self.app.registry.disconnect(iid)

    async def step_mark_deleted(self, ctx: tasks.StepContext) -> None:
        self._update(ctx.resource_id, status="DELETED", deleted_at=now())

    async def step_restart(self, ctx: tasks.StepContext) -> None:
        await self.app.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:restart", restart=agent_pb2.RestartDatastore()), timeout=300)

    async def step_set_limits(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        f = self._flavor(ctx.params["flavor"])
        await self.app.hosts.client(row.host_id).SetLimits(host_pb2.SetLimitsRequest(id=row.id, limits=limits_of(f)))

    async def step_apply_limits(self, ctx: tasks.StepContext) -> None:
        f = self._flavor(ctx.params["flavor"])
        await self.app.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:limits", apply_limits=agent_pb2.ApplyLimits(limits=limits_of(f))), timeout=300)
        self._update(ctx.resource_id, flavor_id=f.id)

    async def step_resize_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        size = int(ctx.params["size_gb"])
        await self.app.hosts.client(row.host_id).ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=row.id, size_gb=size),
                                                             timeout=900)
        self._update(row.id, volume_size_gb=size)

    async def step_wait_running(self, ctx: tasks.StepContext) -> None:
        """After an offline volume grow the container restarted: wait for its agent again."""
        await self.app.registry.wait_for_hello(ctx.resource_id, AGENT_CONNECT_TIMEOUT)

    def kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        return [
            tasks.TaskKind("create_instance", (
                S("schedule", self.step_schedule), S("create_volume", self.step_create_volume),
                S("create_container", self.step_create_container), S("start_container", self.step_start_container),
                S("wait_agent", self.step_wait_agent), S("prepare", self.step_prepare),
                S("restore", self.step_restore), S("activate", self.step_activate)), compensate=self.compensate_create, on_failed=self.failed),
            tasks.TaskKind("delete_instance", (
                S("delete_container", self.step_delete_container), S("delete_volume", self.step_delete_volume),
                S("revoke_certificate", self.step_revoke), S("mark_deleted", self.step_mark_deleted)),
                max_attempts=20),
            tasks.TaskKind("restart_instance", (S("restart", self.step_restart),)),
            tasks.TaskKind("resize_instance", (S("set_limits", self.step_set_limits),
                                               S("apply_limits", self.step_apply_limits))),
            tasks.TaskKind("resize_volume", (S("resize_volume", self.step_resize_volume),
                                             S("wait_agent", self.step_wait_running))),
        ]


def _validate_create(req: database_pb2.CreateInstanceRequest) -> None:
    inst = req.instance
    v: list[tuple[str, str]] = []
    if not inst.display_name.strip():
        v.append(("instance.display_name", "is required"))
    elif len(inst.display_name) > MAX_NAME or any(ord(c) < 32 for c in inst.display_name):
        v.append(("instance.display_name", f"must be at most {MAX_NAME} printable characters"))
    if not inst.flavor:
        v.append(("instance.flavor", "is required"))
    if len(req.request_id) > 64:
        v.append(("request_id", "must be at most 64 characters"))
    if v:
        raise InvalidArgument(f"{v[0][0]} {v[0][1]}", violations=v)
    seen: set[str] = set()
    for i, d in enumerate(req.databases):
        names.validate_database(d.database, f"databases[{i}].database")
        if d.database in seen:
            raise InvalidArgument(f"database {d.database!r} is listed twice", field=f"databases[{i}].database")
        seen.add(d.database)
    users: set[tuple[str, str]] = set()
    for i, u in enumerate(req.users):
        names.validate_user(u.user, f"users[{i}].user")
        if u.host:
            names.validate_host(u.host, f"users[{i}].host")
        names.validate_password(u.password, f"users[{i}].password")
        key = (u.user, u.host or "%")
        if key in users:
            raise InvalidArgument(f"user {u.user!r} is listed twice", field=f"users[{i}].user")
        users.add(key)
        for j, d in enumerate(u.databases):
            names.validate_database(d, f"users[{i}].databases[{j}]")
            if d not in seen:
                raise InvalidArgument(f"user {u.user!r} is granted {d!r}, which this request does not create",
                                      field=f"users[{i}].databases[{j}]")


class InstancesServicer(database_pb2_grpc.InstancesServicer):
    def __init__(self, app: App, instances: Instances, paginator: Paginator) -> None:
        self.app = app
        self.inst = instances
        self.pages = paginator

    def _submit(self, s: Session, kind: str, iid: str, params: dict[str, Any] | None = None) -> None:
        if tasks.active_task_for(s, f"instances/{iid}") is not None:
            raise FailedPrecondition(f"instance {iid} is busy with another operation; retry when it is ACTIVE",
                                     field="name")
        tasks.submit(s, kind, f"instances/{iid}", params or {})

    def _after_submit(self, iid: str) -> None:
        self.app.tasks.wake()
        if self.app.events is not None:
            self.app.events.publish(iid, "task")

    @grpc_edge
    async def CreateInstance(self, request, context):  # type: ignore[no-untyped-def]
        p = current_principal(context)
        _validate_create(request)
        inst = request.instance
        flavor_id = resource_id(inst.flavor, "flavors", "instance.flavor")
        restore_id = resource_id(request.restore_from_backup, "backups", "restore_from_backup") \
            if request.restore_from_backup else ""

        def create() -> database_pb2.Instance:
            with self.app.sessions() as s, s.begin():
                if request.request_id:
                    prior = s.scalar(select(models.Instance).where(models.Instance.tenant_id == p.tenant_id,
                                                                   models.Instance.request_id == request.request_id))
                    if prior is not None:
                        return self.inst.to_pb(s, prior)  # a retried create returns what it made
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
                    if b.status != "COMPLETED":
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
                live = (models.Instance.tenant_id == tenant.id) & models.Instance.deleted_at.is_(None)
                count = s.scalar(select(func.count()).select_from(models.Instance).where(live)) or 0
                mem = s.scalar(select(func.coalesce(func.sum(models.Flavor.memory_mb), 0)).select_from(models.Instance)
                               .join(models.Flavor, models.Flavor.id == models.Instance.flavor_id).where(live)) or 0
                vol = s.scalar(select(func.coalesce(func.sum(models.Instance.volume_size_gb), 0)).where(live)) or 0
                for what, used, add, limit, field in (
                        ("instances", count, 1, tenant.quota_instances, "instance"),
                        ("memory_mb", mem, f.memory_mb, tenant.quota_memory_mb, "instance.flavor"),
                        ("volume_gb", vol, size, tenant.quota_volume_gb, "instance.volume.size_gb")):
                    if used + add > limit:
                        raise ResourceExhausted(f"quota exceeded: {what} would be {used + add}, limit {limit}",
                                                field=field)
                row = models.Instance(
                    id=str(uuid.uuid4()), tenant_id=tenant.id, display_name=inst.display_name.strip(),
                    status="BUILD", flavor_id=f.id, volume_size_gb=size, datastore=ds.id, datastore_version=version,
                    request_id=request.request_id or None, restored_from=restore_id,
                    create_params={"databases": [json_format.MessageToDict(d) for d in request.databases],
                                   "users": [{**json_format.MessageToDict(u), "password": self.inst.seal(u.password)}
                                             for u in request.users]})
                s.add(row)
                s.flush()
                tasks.submit(s, "create_instance", f"instances/{row.id}", {})
                s.flush()
                return self.inst.to_pb(s, row)
        pb = await asyncio.to_thread(create)
        self._after_submit(pb.id)
        return pb

    @grpc_edge
    async def GetInstance(self, request, context):  # type: ignore[no-untyped-def]
        p = current_principal(context)
        with self.app.sessions() as s:
            return self.inst.to_pb(s, self.inst.owned(s, p, request.name))

    @grpc_edge
    async def ListInstances(self, request, context):  # type: ignore[no-untyped-def]
        p = current_principal(context)
        if request.status and request.status not in database_pb2.InstanceStatus.values():
            raise InvalidArgument("status is not an instance status", field="status")
        page = self.pages.page("ListInstances", p.caller_key, request.page_size, request.page_token,
                               str(request.status))

        def q() -> database_pb2.ListInstancesResponse:
            with self.app.sessions() as s:
                query = select(models.Instance).where(models.Instance.deleted_at.is_(None)) \
                    .order_by(models.Instance.created_at, models.Instance.id)
                if not p.admin:
                    query = query.where(models.Instance.tenant_id == p.tenant_id)
                rows = s.scalars(query).all()
                items = [self.inst.to_pb(s, r) for r in rows]
            if request.status:
                items = [i for i in items if i.status == request.status]
            chunk = items[page.offset:page.offset + page.size + 1]
            return database_pb2.ListInstancesResponse(
                instances=chunk[:page.size],
                next_page_token=self.pages.next_token("ListInstances", p.caller_key, page, len(chunk) > page.size,
                                                      str(request.status)))
        return await asyncio.to_thread(q)

    def _action(self, context: Any, name: str, kind: str, params: dict[str, Any] | None = None,
                check: Any = None) -> database_pb2.Instance:
        p = current_principal(context)
        with self.app.sessions() as s, s.begin():
            row = self.inst.owned(s, p, name)
            status, _ = self.inst.derived_status(s, row)
            if check is not None:
                check(s, row, status)
            self._submit(s, kind, row.id, params)
            s.flush()
            pb = self.inst.to_pb(s, row)
        self._after_submit(row.id)
        return pb

    @grpc_edge
    async def DeleteInstance(self, request, context):  # type: ignore[no-untyped-def]
        def check(s: Session, row: models.Instance, status: str) -> None:
            # Like Trove, a delete is accepted in ERROR; unlike a half-made container race, a BUILD is
            # refused until its create task ends (it ends ACTIVE or ERROR, then delete cleans up).
            if status in ("BUILD", "RESTORING"):
                raise FailedPrecondition("instance is still being built; delete it when it is ACTIVE or ERROR",
                                         field="name")
        return self._action(context, request.name, "delete_instance", check=check)

    @grpc_edge
    async def RestartInstance(self, request, context):  # type: ignore[no-untyped-def]
        def check(s: Session, row: models.Instance, status: str) -> None:
            if status not in ("ACTIVE", "SHUTDOWN", "HEALTHY") or not self.app.registry.is_connected(row.id):
                raise FailedPrecondition(f"instance is {status}; only a running instance can restart", field="name")
        return self._action(context, request.name, "restart_instance", check=check)

    @grpc_edge
    async def ResizeInstance(self, request, context):  # type: ignore[no-untyped-def]
        flavor_id = resource_id(request.flavor, "flavors", "flavor")

        def check(s: Session, row: models.Instance, status: str) -> None:
            f = s.get(models.Flavor, flavor_id)
            if f is None:
                raise NotFound(f"flavor {flavor_id!r} does not exist", field="flavor")
            if f.id == row.flavor_id:
                raise InvalidArgument("the instance already has this flavor", field="flavor")
            if status != "ACTIVE":
                raise FailedPrecondition(f"instance is {status}; resize needs ACTIVE", field="name")
        return self._action(context, request.name, "resize_instance", {"flavor": flavor_id}, check)

    @grpc_edge
    async def ResizeVolume(self, request, context):  # type: ignore[no-untyped-def]
        def check(s: Session, row: models.Instance, status: str) -> None:
            if request.size_gb <= row.volume_size_gb:
                raise InvalidArgument(f"size_gb must be larger than the current {row.volume_size_gb} GB "
                                      "(volumes only grow)", field="size_gb")
            if request.size_gb > self.app.settings.max_volume_gb:
                raise InvalidArgument(f"size_gb must be at most {self.app.settings.max_volume_gb}", field="size_gb")
            if status != "ACTIVE":
                raise FailedPrecondition(f"instance is {status}; resize needs ACTIVE", field="name")
        return self._action(context, request.name, "resize_volume", {"size_gb": request.size_gb}, check)

    @grpc_edge
    async def WatchInstance(self, request, context):  # type: ignore[no-untyped-def]
        p = current_principal(context)
        with self.app.sessions() as s:
            row = self.inst.owned(s, p, request.name)
            iid = row.id
        q = self.app.events.subscribe(iid)
        try:
            last: bytes | None = None
            change = "initial"
            while True:
                with self.app.sessions() as s:
                    row = s.get(models.Instance, iid)
                    pb = self.inst.to_pb(s, row) if row is not None else None
                if pb is None:
                    return
                key = pb.SerializeToString(deterministic=True)
                if key != last:
                    last = key
                    ev = database_pb2.InstanceEvent(instance=pb, change=change)
                    ev.time.GetCurrentTime()
                    yield ev
                if row.deleted_at is not None:
                    return
                try:
                    change = await asyncio.wait_for(q.get(), timeout=self.app.settings.heartbeat_expiry_seconds)
                except TimeoutError:
                    change = "tick"  # re-derive: a guest may have gone silent without any event
        finally:
            self.app.events.unsubscribe(iid, q)


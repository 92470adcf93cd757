"""The Admin service: tenants and their tokens and quotas, hosts, tasks, certificates. Admin principals only
(enforced by server/auth.py before any of this runs)."""
from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from reddwarf.common import states
from reddwarf.common.clock import now
from reddwarf.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, grpc_edge
from reddwarf.common.pki import identity_from_cert, validate_role_id
from reddwarf.common.states import HostState, StepState, TaskState
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, common_pb2

from . import models, quotas, tasks
from .app import App, Context
from .auth import ADMIN_TENANT, current_principal, hash_secret, new_secret, serial_hex, token_expiry
from .catalog import fetch, resource_id, ts
from .host_enrollment import HostEnroller
from .keys import destroy_tenant_key
from .pagination import Paginator

if TYPE_CHECKING:
    from .backup_store import BackupStore
    from .hosts import HostPool

log = logging.getLogger("reddwarf.server.admin")
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}\Z")
HOST_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}\Z")
ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}\Z")
Row = TypeVar("Row")
Pb = TypeVar("Pb", bound=Message)


class ListRequest(Protocol):
    @property
    def page_size(self) -> int: ...
    @property
    def page_token(self) -> str: ...


def quota_usage(s: Session, t: models.Tenant) -> admin_pb2.QuotaUsage:
    used = quotas.tenant_allocation(s, t.id)
    return admin_pb2.QuotaUsage(
        limit=admin_pb2.Quota(instances=t.quota_instances, memory_mb=t.quota_memory_mb,
                              volume_gb=t.quota_volume_gb, backups=t.quota_backups,
                              backup_bytes=t.quota_backup_bytes),
        in_use=admin_pb2.Quota(instances=used.instances, memory_mb=used.memory_mb, volume_gb=used.volume_gb,
                               backups=quotas.backup_count(s, t.id), backup_bytes=quotas.backup_bytes(s, t.id)))


def tenant_pb(t: models.Tenant) -> admin_pb2.Tenant:
    return admin_pb2.Tenant(name=f"tenants/{t.id}", id=t.id, display_name=t.display_name,
                            quota=admin_pb2.Quota(instances=t.quota_instances, memory_mb=t.quota_memory_mb,
                                                  volume_gb=t.quota_volume_gb, backups=t.quota_backups,
                                                  backup_bytes=t.quota_backup_bytes),
                            create_time=ts(t.created_at))


def host_pb(h: models.Host, s: Session | None = None) -> admin_pb2.Host:
    """With a session, also what is placed on the host: its live instances and what they hold."""
    cap = admin_pb2.HostCapacity(memory_mb_total=h.memory_mb_total, cpus=h.cpus,
                                 storage_gb_total=h.storage_gb_total, storage_gb_free=h.storage_gb_free,
                                 containers=h.containers)
    instances: list[str] = []
    if s is not None:
        used = quotas.allocated(s, models.Instance.host_id == h.id)
        cap.memory_mb_allocated, cap.storage_gb_allocated = used.memory_mb, used.volume_gb
        instances = [f"instances/{i}" for i in s.scalars(
            select(models.Instance.id).where(models.Instance.host_id == h.id, models.Instance.deleted_at.is_(None))
            .order_by(models.Instance.created_at, models.Instance.id))]
    return admin_pb2.Host(
        name=f"hosts/{h.id}", id=h.id, address=h.address,
        state=states.to_pb(HostState(h.state)),
        container_driver=h.container_driver, volume_driver=h.volume_driver, last_seen=ts(h.last_seen),
        memory_overcommit=h.memory_overcommit, storage_overcommit=h.storage_overcommit,
        capacity=cap, instances=instances, mode=h.mode or "compute", iscsi_portal=h.iscsi_portal,
        initiator_iqn=h.initiator_iqn)


def task_pb(t: models.Task) -> admin_pb2.Task:
    steps = []
    for st in t.steps or []:
        steps.append(admin_pb2.TaskStep(
            step=st.get("step", ""), detail=st.get("detail", ""),
            state=(states.to_pb(states.step_task_state(StepState(st["state"]))) if st.get("state")
                   else admin_pb2.TASK_STATE_UNSPECIFIED),
            started=ts(dt.datetime.fromisoformat(st["started"])) if st.get("started") else None,
            finished=ts(dt.datetime.fromisoformat(st["finished"])) if st.get("finished") else None))
    fault = (common_pb2.Fault(message=t.fault_message, details=t.fault_details, created=ts(t.updated_at))
             if t.fault_message else None)
    return admin_pb2.Task(name=f"tasks/{t.id}", id=t.id, kind=t.kind, resource=t.resource,
                          state=states.to_pb(TaskState(t.state)),
                          current_step=t.current_step, steps=steps,
                          attempts=t.attempts, lease_owner=t.lease_owner or "", lease_expires=ts(t.lease_expires),
                          create_time=ts(t.created_at), update_time=ts(t.updated_at), fault=fault)


def cert_pb(c: models.Certificate, pem: str = "", ca_pem: str = "") -> admin_pb2.Certificate:
    return admin_pb2.Certificate(identity=c.identity, serial=c.serial, certificate_pem=pem, ca_pem=ca_pem,
                                 not_after=ts(c.not_after), revoked=c.revoked_at is not None)


def record_certificate(s: Session, cert_pem: bytes, not_after: dt.datetime) -> models.Certificate:
    ident = identity_from_cert(cert_pem)
    row = models.Certificate(serial=serial_hex(ident.serial), identity=ident.uri, role=ident.role,
                             subject_id=ident.id, not_after=not_after.replace(tzinfo=None))
    s.add(row)
    return row


def revoke_identity(app: App, s: Session, identity_uri: str, reason: str) -> int:
    """Revokes every live certificate of an identity (e.g. a deleted instance's). Returns how many."""
    rows = s.scalars(select(models.Certificate).where(models.Certificate.identity == identity_uri,
                                                      models.Certificate.revoked_at.is_(None))).all()
    for row in rows:
        row.revoked_at = now()
        row.revoke_reason = reason
        app.ca.revoke(int(row.serial, 16))
    return len(rows)


def live_tenant(s: Session, name: str, field: str = "name") -> models.Tenant:
    """The tenant named `tenants/<id>` (or a bare id) unless it was deleted; NOT_FOUND naming the field."""
    row = fetch(s, models.Tenant, name, "tenants", field)
    if row.deleted_at is not None:
        raise NotFound(f"tenant {row.id!r} does not exist (it was deleted)", field=field)
    return row


def _quota_values(q: admin_pb2.Quota, field: str) -> None:
    for name in ("instances", "memory_mb", "volume_gb", "backups"):
        v = getattr(q, name)
        if v < 0 or v > 10**9:
            raise InvalidArgument(f"{field}.{name} must be between 0 and 1e9", field=f"{field}.{name}")
    if q.HasField("backup_bytes") and not 0 <= q.backup_bytes <= 1 << 60:
        raise InvalidArgument(f"{field}.backup_bytes must be between 0 and 2^60", field=f"{field}.backup_bytes")


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(self, app: App, paginator: Paginator, hosts: HostPool, store: BackupStore) -> None:
        self.store = store
        self.app = app
        self.pages = paginator
        self.hosts = hosts
        self.enroller = HostEnroller(app)

    def _list(self, method: str, context: Context, request: ListRequest, query: Select[Row],
              convert: Callable[[Row], Pb], filter: str = "") -> tuple[list[Pb], str]:
        p = current_principal(context)
        page = self.pages.page(method, p.caller_key, request.page_size, request.page_token, filter)
        with self.app.sessions() as s:
            rows = s.scalars(query.offset(page.offset).limit(page.size + 1)).all()
            items = [convert(r) for r in rows[:page.size]]
        return items, self.pages.next_token(method, p.caller_key, page, len(rows) > page.size, filter)

    # -- tenants, tokens, quotas -----------------------------------------------------------------
    @grpc_edge
    async def CreateTenant(self, request: admin_pb2.CreateTenantRequest,
                           context: Context) -> admin_pb2.Tenant:
        t = request.tenant
        if not TENANT_ID.fullmatch(t.id):
            raise InvalidArgument("tenant.id must be 1-63 lowercase letters, digits or '-'", field="tenant.id")
        if len(t.display_name) > 255:
            raise InvalidArgument("tenant.display_name is longer than 255 characters", field="tenant.display_name")
        q = self.app.settings.default_quota
        if t.HasField("quota"):
            _quota_values(t.quota, "tenant.quota")
        with self.app.sessions() as s, s.begin():
            old = s.get(models.Tenant, t.id)
            if old is not None and old.deleted_at is not None:
                # Never reused: nothing recorded under the old tenant may ever reach a new one.
                raise AlreadyExists(f"tenant id {t.id!r} belonged to a tenant deleted at {old.deleted_at:%Y-%m-%d %H:%M} "
                                    "UTC; tenant ids are never reused, choose another", field="tenant.id")
            if old is not None:
                raise AlreadyExists(f"tenant {t.id!r} already exists", field="tenant.id")
            row = models.Tenant(
                id=t.id, display_name=t.display_name or t.id,
                quota_instances=t.quota.instances if t.HasField("quota") else q.instances,
                quota_memory_mb=t.quota.memory_mb if t.HasField("quota") else q.memory_mb,
                quota_volume_gb=t.quota.volume_gb if t.HasField("quota") else q.volume_gb,
                quota_backups=t.quota.backups if t.HasField("quota") else q.backups,
                quota_backup_bytes=t.quota.backup_bytes if t.quota.HasField("backup_bytes") else q.backup_bytes)
            s.add(row)
            s.flush()
            return tenant_pb(row)

    @grpc_edge
    async def GetTenant(self, request: admin_pb2.GetTenantRequest, context: Context) -> admin_pb2.Tenant:
        with self.app.sessions() as s:
            row = live_tenant(s, request.name)
            return tenant_pb(row)

    @grpc_edge
    async def ListTenants(self, request: admin_pb2.ListTenantsRequest,
                          context: Context) -> admin_pb2.ListTenantsResponse:
        items, token = self._list("ListTenants", context, request,
                                  select(models.Tenant).where(models.Tenant.deleted_at.is_(None))
                                  .order_by(models.Tenant.id), tenant_pb)
        return admin_pb2.ListTenantsResponse(tenants=items, next_page_token=token)

    @grpc_edge
    async def DeleteTenant(self, request: admin_pb2.DeleteTenantRequest, context: Context) -> empty_pb2.Empty:
        """Deletes a tenant for good: its tokens, its backups (rows and stored objects) and its backup data key
        (crypto-shredding: any copy of its objects anywhere is unreadable from this commit on). The row stays
        as a tombstone, so the id is never given out again."""
        with self.app.sessions() as s, s.begin():
            row = live_tenant(s, request.name)
            if row.id == ADMIN_TENANT:
                raise FailedPrecondition("the admin tenant cannot be deleted", field="name")
            live = s.scalar(select(func.count()).select_from(models.Instance).where(
                models.Instance.tenant_id == row.id, models.Instance.deleted_at.is_(None)))
            if live:
                raise FailedPrecondition(f"tenant {row.id!r} still has {live} instance(s); delete them first",
                                         field="name")
            backups = s.scalars(select(models.Backup).where(models.Backup.tenant_id == row.id)).all()
            busy = [b.id for b in backups if tasks.active_task_for(s, f"backups/{b.id}") is not None]
            if busy:
                raise FailedPrecondition(f"backup {busy[0]} of tenant {row.id!r} is being verified; try again when "
                                         "it is done", field="name")
            doomed = [b.id for b in backups]
            for b in backups:  # unlink the chains first: a parent link must never dangle
                b.parent_id = None
            s.flush()
            for b in backups:
                s.delete(b)
            for tok in s.scalars(select(models.Token).where(models.Token.tenant_id == row.id)):
                s.delete(tok)
            shredded = destroy_tenant_key(s, row.id)
            row.deleted_at = now()
            tid = row.id
        # The key is gone with the commit above; the objects are ciphertext nobody can read any more, and
        # are deleted now (a crash here leaves only such unreadable files behind).
        for bid in doomed:
            await self.store.delete(bid)
        log.info("tenant deleted", extra={"tenant": tid, "backups": len(doomed), "key_destroyed": bool(shredded)})
        return empty_pb2.Empty()

    @grpc_edge
    async def CreateToken(self, request: admin_pb2.CreateTokenRequest, context: Context) -> admin_pb2.Token:
        tid = resource_id(request.tenant, "tenants", "tenant")
        if request.ttl_seconds < 0:
            raise InvalidArgument("ttl_seconds must not be negative", field="ttl_seconds")
        if len(request.description) > 255:
            raise InvalidArgument("description is longer than 255 characters", field="description")
        secret = new_secret()
        with self.app.sessions() as s, s.begin():
            live_tenant(s, tid, "tenant")
            row = models.Token(id=str(uuid.uuid4()), tenant_id=tid, secret_hash=hash_secret(secret),
                               description=request.description, admin=request.admin,
                               expires_at=token_expiry(request.ttl_seconds,
                                                       self.app.settings.token_ttl_seconds))
            s.add(row)
        return admin_pb2.Token(name=f"tenants/{tid}/tokens/{row.id}", id=row.id, secret=secret,
                               description=row.description, admin=row.admin, expire_time=ts(row.expires_at))

    @grpc_edge
    async def RevokeToken(self, request: admin_pb2.RevokeTokenRequest, context: Context) -> empty_pb2.Empty:
        tid = request.name.rsplit("/", 1)[-1]
        if not tid:
            raise InvalidArgument("name must be tenants/<tenant>/tokens/<id>", field="name")
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Token, tid)
            if row is None:
                raise NotFound(f"token {tid!r} does not exist", field="name")
            row.revoked_at = row.revoked_at or now()
        return empty_pb2.Empty()

    @grpc_edge
    async def GetQuota(self, request: admin_pb2.GetQuotaRequest, context: Context) -> admin_pb2.QuotaUsage:
        with self.app.sessions() as s:
            row = live_tenant(s, request.tenant, "tenant")
            return quota_usage(s, row)

    @grpc_edge
    async def UpdateQuota(self, request: admin_pb2.UpdateQuotaRequest,
                          context: Context) -> admin_pb2.QuotaUsage:
        tid = resource_id(request.tenant, "tenants", "tenant")
        _quota_values(request.quota, "quota")
        with self.app.sessions() as s, s.begin():
            row = live_tenant(s, tid, "tenant")
            row.quota_instances = request.quota.instances
            row.quota_memory_mb = request.quota.memory_mb
            row.quota_volume_gb = request.quota.volume_gb
            row.quota_backups = request.quota.backups
            if request.quota.HasField("backup_bytes"):
                row.quota_backup_bytes = request.quota.backup_bytes
            s.flush()
            return quota_usage(s, row)

    # -- hosts -----------------------------------------------------------------------------------
    @grpc_edge
    async def RegisterHost(self, request: admin_pb2.RegisterHostRequest, context: Context) -> admin_pb2.Host:
        h = request.host
        if not HOST_ID.match(h.id):
            raise InvalidArgument("host.id must be 1-64 lowercase letters, digits or '-'", field="host.id")
        if not ADDRESS.match(h.address) or not 0 < int(h.address.rsplit(":", 1)[1]) < 65536:
            raise InvalidArgument("host.address must be host:port", field="host.address")
        for name in ("memory_overcommit", "storage_overcommit"):
            if not 0 <= getattr(h, name) <= 10:
                raise InvalidArgument(f"host.{name} must be between 0 and 10", field=f"host.{name}")
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, h.id)
            if row is not None and row.address != h.address:
                raise AlreadyExists(f"host {h.id!r} is registered at {row.address}", field="host.id")
            if row is None:
                row = models.Host(id=h.id, address=h.address, state=HostState.UP,
                                  memory_overcommit=h.memory_overcommit or self.app.settings.memory_overcommit,
                                  storage_overcommit=h.storage_overcommit or self.app.settings.storage_overcommit)
                s.add(row)
                s.flush()
            result = host_pb(row, s)
        try:  # fill capacity at once
            await self.hosts.refresh(h.id)
            with self.app.sessions() as s:
                result = host_pb(fetch(s, models.Host, h.id, "hosts", "host.id"), s)
        except Exception as exc:  # noqa: BLE001 - registered anyway; the refresh loop retries
            log.warning("host capacity refresh failed", extra={"host": h.id, "error": str(exc)})
        return result

    @grpc_edge
    async def EnrollHost(self, request: admin_pb2.EnrollHostRequest, context: Context) -> admin_pb2.Host:
        """Installs, starts and registers hostd over SSH (server/host_enrollment.py)."""
        host_id = await self.enroller.enroll(request)
        with self.app.sessions() as s:
            return host_pb(fetch(s, models.Host, host_id, "hosts", "id"), s)

    @grpc_edge
    async def GetHost(self, request: admin_pb2.GetHostRequest, context: Context) -> admin_pb2.Host:
        with self.app.sessions() as s:
            return host_pb(fetch(s, models.Host, request.name, "hosts"), s)

    @grpc_edge
    async def ListHosts(self, request: admin_pb2.ListHostsRequest,
                        context: Context) -> admin_pb2.ListHostsResponse:
        p = current_principal(context)
        page = self.pages.page("ListHosts", p.caller_key, request.page_size, request.page_token, "")
        with self.app.sessions() as s:
            rows = s.scalars(select(models.Host).order_by(models.Host.id).offset(page.offset)
                             .limit(page.size + 1)).all()
            items = [host_pb(r, s) for r in rows[:page.size]]
        token = self.pages.next_token("ListHosts", p.caller_key, page, len(rows) > page.size, "")
        return admin_pb2.ListHostsResponse(hosts=items, next_page_token=token)

    @grpc_edge
    async def DrainHost(self, request: admin_pb2.DrainHostRequest, context: Context) -> admin_pb2.Host:
        from .migration import drain
        with self.app.sessions() as s, s.begin():
            row = fetch(s, models.Host, request.name, "hosts")
            if row.state == HostState.FENCED or (request.drain and row.state == HostState.DOWN):
                raise FailedPrecondition(f"host {row.id} is {row.state.upper()}; a lost host is evacuated "
                                         "(host evacuate), not drained, and rejoins by itself", field="name")
            if request.drain:
                drain(s, row.id)
            else:
                row.state = HostState.UP
            s.flush()
            return host_pb(row, s)

    @grpc_edge
    async def DeleteHost(self, request: admin_pb2.DeleteHostRequest, context: Context) -> empty_pb2.Empty:
        with self.app.sessions() as s, s.begin():
            row = fetch(s, models.Host, request.name, "hosts")
            live = s.scalar(select(func.count()).select_from(models.Instance).where(
                models.Instance.host_id == row.id, models.Instance.deleted_at.is_(None)))
            if live:
                raise FailedPrecondition(f"host {row.id!r} still runs {live} instance(s)", field="name")
            s.delete(row)
        return empty_pb2.Empty()

    @grpc_edge
    async def MigrateInstance(self, request: admin_pb2.MigrateInstanceRequest, context: Context) -> admin_pb2.Task:
        """Submits a migrate_instance task (server/migration.py) once the instance and the target are checked;
        a refusal changes nothing."""
        from .migration import submit_migration  # it builds on the instance tasks, which import this module
        iid = resource_id(request.instance, "instances", "instance")
        host = resource_id(request.host, "hosts", "host") if request.host else ""
        with self.app.sessions() as s, s.begin():
            task = submit_migration(s, iid, host)
            s.flush()
            return task_pb(task)

    @grpc_edge
    async def EvacuateHost(self, request: admin_pb2.EvacuateHostRequest, context: Context) -> admin_pb2.Task:
        """An operator declares a host lost: the evacuate_host task fences it, then moves its instances."""
        from .migration import submit_evacuation
        with self.app.sessions() as s, s.begin():
            row = fetch(s, models.Host, request.name, "hosts")
            if row.mode == "storage":
                raise FailedPrecondition(f"host {row.id} is a SAN node; it runs no instances to evacuate",
                                         field="name")
            task = submit_evacuation(s, row.id, "evacuated by an operator")
            s.flush()
            return task_pb(task)

    @grpc_edge
    async def PatchDatastoreVersion(self, request: admin_pb2.PatchDatastoreVersionRequest,
                                    context: Context) -> admin_pb2.PatchDatastoreVersionResponse:
        """A new template revision of a version; its instances' patches are queued (server/patching.py)."""
        from .patching import patch_version
        with self.app.sessions() as s, s.begin():
            p = patch_version(s, request.datastore, request.version, request.revision, request.apply_now)
        log.info("datastore version patched", extra={"datastore": p.datastore, "version": p.version,
                                                     "revision": p.revision, "instances": len(p.instances)})
        return admin_pb2.PatchDatastoreVersionResponse(datastore=p.datastore, version=p.version,
                                                       revision=p.revision, instances=p.instances)

    # -- tasks -----------------------------------------------------------------------------------
    @grpc_edge
    async def GetTask(self, request: admin_pb2.GetTaskRequest, context: Context) -> admin_pb2.Task:
        with self.app.sessions() as s:
            return task_pb(fetch(s, models.Task, request.name, "tasks"))

    @grpc_edge
    async def ListTasks(self, request: admin_pb2.ListTasksRequest,
                        context: Context) -> admin_pb2.ListTasksResponse:
        q = select(models.Task).order_by(models.Task.created_at.desc(), models.Task.id)
        if request.resource:
            q = q.where(models.Task.resource == request.resource)
        if request.state:
            try:
                state = states.from_pb(TaskState, request.state)
            except (ValueError, KeyError):
                raise InvalidArgument("state is not a task state", field="state") from None
            q = q.where(models.Task.state == state)
        items, token = self._list("ListTasks", context, request, q, task_pb,
                                  filter=f"{request.resource}|{request.state}")
        return admin_pb2.ListTasksResponse(tasks=items, next_page_token=token)

    # -- certificates ----------------------------------------------------------------------------
    @grpc_edge
    async def IssueCertificate(self, request: admin_pb2.IssueCertificateRequest,
                               context: Context) -> admin_pb2.Certificate:
        validate_role_id(request.role, request.id)
        days = request.days or 365
        if request.csr_pem:
            issued = self.app.ca.sign_csr(request.csr_pem.encode(), request.role, request.id, days)
        else:
            # No CSR: the key is made here and returned once in certificate_pem after the certificate.
            issued = self.app.ca.issue(request.role, request.id, days)
        with self.app.sessions() as s, s.begin():
            row = record_certificate(s, issued.cert_pem, issued.not_after)
        pem = issued.cert_pem.decode() + issued.key_pem.decode()
        return cert_pb(row, pem, self.app.ca.cert_pem.decode())

    @grpc_edge
    async def RevokeCertificate(self, request: admin_pb2.RevokeCertificateRequest,
                                context: Context) -> admin_pb2.Certificate:
        serial = request.serial.lower().removeprefix("0x")
        if not re.fullmatch(r"[0-9a-f]{1,64}", serial):
            raise InvalidArgument("serial must be the certificate's serial in hex", field="serial")
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Certificate, serial)
            if row is None:
                raise NotFound(f"no certificate with serial {serial} was issued here", field="serial")
            if row.revoked_at is None:
                row.revoked_at = now()
                row.revoke_reason = request.reason[:255]
                self.app.ca.revoke(int(serial, 16))
            return cert_pb(row)

    @grpc_edge
    async def ListCertificates(self, request: admin_pb2.ListCertificatesRequest,
                               context: Context) -> admin_pb2.ListCertificatesResponse:
        items, token = self._list("ListCertificates", context, request,
                                  select(models.Certificate).order_by(models.Certificate.created_at,
                                                                      models.Certificate.serial), cert_pb)
        return admin_pb2.ListCertificatesResponse(certificates=items, next_page_token=token)

"""Backups that are never silently bad.

- Bytes reach the store only through the agent gateway's UploadBackup, for a backup row that exists, is
  being taken, and belongs to the uploading instance (its certificate). The store publishes an object only
  when its SHA-256 equals the digest the guest computed (server/backup_store.py).
- A backup is COMPLETED only after the stored object matches the size and digest the agent reported AND
  the chain restored into a scratch mariadbd in a throw-away sandbox on a host, never on this server:
  the chain is streamed to hostd's ProveBackup, which runs reddwarf.agent.sandbox (an unprivileged uid of its own
  user namespace, memory/cpu/pids cgroups, no network, the host's keys and other tenants' volumes hidden) and reddwarf.agent.verify
  there. The per-table checksums of that restored copy are recorded: they are the backup's point in time
  exactly, even when the database was being written to during the backup (a checksum pass on the live
  guest could only approximate it).
- VerifyBackup re-hashes the stored chain and restores it again, comparing the table checksums with those
  recorded: VERIFIED only when the same data came back.
- Restores (CreateInstance with restore_from_backup) check every digest before the datadir is touched.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import random
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import empty_pb2
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from reddwarf.agent import sandbox
from reddwarf.common import states
from reddwarf.common.clock import now
from reddwarf.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RedDwarfError,
    ResourceExhausted,
    Unavailable,
    from_rpc_error,
    grpc_edge,
)
from reddwarf.common.states import BackupStatus, HostState, InstanceStatus, VerifyStatus
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2, database_pb2_grpc, host_pb2

from . import db, models, tags, tasks
from .agents import AgentRegistry
from .app import App, Context
from .auth import current_principal
from .backup_store import BackupStore, upload_cap
from .catalog import resource_id, ts
from .db import update_row
from .hosts import HostPool
from .idempotency import create_once, parse_request_id
from .instance_validation import display_name_problem, mask_paths
from .instance_views import derived_status, owned_instance
from .pagination import Paginator
from .quotas import check_backup_quota, remaining_backup_bytes

log = logging.getLogger("reddwarf.server.backups")
BACKUP_TIMEOUT = 6 * 3600
# A guest gone this long mid-backup fails the backup rather than holding it open for hours.
GONE_GRACE = 20.0
# A backup's bytes are uploaded only while it is being taken; until it ends it cannot be deleted.
UPLOADING = (BackupStatus.BUILDING, BackupStatus.SAVING)
TAKING = (BackupStatus.NEW, *UPLOADING)


def backup_pb(b: models.Backup) -> database_pb2.Backup:
    pb = database_pb2.Backup(
        name=f"backups/{b.id}", id=b.id, display_name=b.display_name, description=b.description,
        instance=f"instances/{b.instance_id}",
        status=database_pb2.BackupStatus.ValueType(states.to_pb(BackupStatus(b.status))),
        parent=f"backups/{b.parent_id}" if b.parent_id else "", size_bytes=b.size_bytes, sha256=b.sha256,
        datastore=b.datastore, datastore_version=b.datastore_version,
        checksums=[database_pb2.TableChecksum(table=c["table"], checksum=int(c["checksum"])) for c in b.checksums or []],
        create_time=ts(b.created_at), update_time=ts(b.updated_at),
        verify_status=database_pb2.VerifyStatus.ValueType(states.to_pb(VerifyStatus(b.verify_status))),
        verify_detail=b.verify_detail, kind=b.kind, location=b.location, tenant=f"tenants/{b.tenant_id}",
        tags=b.tags or {})
    if b.fault_message:
        pb.fault.CopyFrom(common_pb2.Fault(message=b.fault_message, details=b.fault_details, created=ts(b.updated_at)))
    return pb


def schedule_pb(row: models.BackupSchedule) -> database_pb2.BackupSchedule:
    pb = database_pb2.BackupSchedule(name=f"instances/{row.instance_id}/backupSchedule",
                                     interval_seconds=row.interval_seconds, keep=row.keep,
                                     full_every=row.full_every, next_run=ts(row.next_run))
    if row.fault_message:
        pb.fault.CopyFrom(common_pb2.Fault(message=row.fault_message, created=ts(row.fault_at)))
    return pb


def chain(s: Session, backup: models.Backup) -> list[models.Backup]:
    """The full backup first, then each incremental up to `backup`."""
    out = [backup]
    while out[-1].parent_id:
        parent = s.get(models.Backup, out[-1].parent_id)
        if parent is None:
            raise FailedPrecondition(f"backup {backup.id} depends on {out[-1].parent_id}, which is gone",
                                     field="restore_from_backup")
        out.append(parent)
    return list(reversed(out))


class BackupSink:
    """UploadBackup/DownloadBackup for the agent gateway: the instance (from its certificate) may only write
    the backup it was asked to take, and read only its own tenant's backups (for a restore)."""

    def __init__(self, app: App, store: BackupStore) -> None:
        self.app = app
        self.store = store

    async def upload(self, instance_id: str, chunks: AsyncIterator[agent_pb2.BackupChunk]
                     ) -> agent_pb2.UploadBackupResponse:
        writer = None
        final = ""
        try:
            async for chunk in chunks:
                if writer is None:
                    bid = chunk.backup_id
                    with self.app.sessions() as s:
                        b = s.get(models.Backup, bid) if bid else None
                        if b is None:
                            raise NotFound(f"no backup {bid!r} is expected", field="backup_id")
                        if b.instance_id != instance_id:
                            raise PermissionDenied("this backup belongs to another instance", field="backup_id")
                        if b.status not in UPLOADING:
                            raise FailedPrecondition(f"backup {bid} is {b.status}, not being taken", field="backup_id")
                        inst = s.get(models.Instance, instance_id)
                        st = self.app.settings
                        cap = upload_cap(inst.volume_size_gb if inst is not None else 0, st.backup_upload_factor,
                                         st.backup_upload_margin_mb)
                        tenant_id = b.tenant_id
                        room = remaining_backup_bytes(s, tenant_id)  # the tenant's stored-bytes quota
                        if room <= 0:
                            raise ResourceExhausted("quota exceeded: the tenant's backups hold all the bytes "
                                                    "it may store", field="backup_id")
                        cap = min(cap, room)
                    writer = self.store.open_writer(bid, tenant_id, max_bytes=cap)
                if chunk.data:
                    await writer.write(chunk.data)
                if chunk.sha256:
                    final = chunk.sha256
            if writer is None:
                raise InvalidArgument("empty upload", field="backup_id")
            if not final:
                raise FailedPrecondition("the upload ended without its digest: nothing was stored", field="sha256")
            obj = await writer.commit(final)
            writer = None
            return agent_pb2.UploadBackupResponse(size_bytes=obj.size_bytes, sha256=obj.sha256)
        finally:
            if writer is not None:
                await writer.abort()  # cut off or refused: the partial object never becomes visible

    async def download(self, instance_id: str, backup_id: str) -> AsyncIterator[agent_pb2.BackupChunk]:
        with self.app.sessions() as s:
            b = s.get(models.Backup, backup_id)
            inst = s.get(models.Instance, instance_id)
            if b is None or inst is None or b.tenant_id != inst.tenant_id or b.status != BackupStatus.COMPLETED:
                raise NotFound(f"backup {backup_id!r} is not available to this instance", field="backup_id")
        first = True
        async for data in self.store.open_reader(backup_id):
            yield agent_pb2.BackupChunk(backup_id=backup_id if first else "", data=data)
            first = False


class Backups:
    """The create_backup and verify_backup tasks, and the restore step of create_instance."""

    def __init__(self, app: App, store: BackupStore, registry: AgentRegistry, hosts: HostPool | None = None) -> None:
        self.app = app
        self.store = store
        self.registry = registry
        self.hosts = hosts

    def _update(self, bid: str, **values: Any) -> None:
        update_row(self.app.sessions, models.Backup, bid, **values)

    async def step_take(self, ctx: tasks.StepContext) -> None:
        bid = ctx.params["backup_id"]
        with self.app.sessions() as s:
            b = s.get(models.Backup, bid)
            assert b is not None
            parent = s.get(models.Backup, b.parent_id) if b.parent_id else None
            iid, lsn = b.instance_id, (parent.to_lsn if parent else "")
        self._update(bid, status=BackupStatus.BUILDING)

        async def progress(p: agent_pb2.Progress) -> None:
            await ctx.progress(p.percent)
        res = await self.registry.call(iid, agent_pb2.Command(
            command_id=f"{ctx.task_id}:backup", backup=agent_pb2.RunBackup(backup_id=bid, incremental_from_lsn=lsn)),
            timeout=BACKUP_TIMEOUT, on_progress=progress, gone_grace=GONE_GRACE)
        r = res.backup
        # COMPLETED only if what the store holds is what the guest says it sent...
        outcome = await self.store.verify(bid, r.sha256)
        if not outcome.ok or outcome.size_bytes != r.size_bytes:
            raise FailedPrecondition(f"stored backup does not match the guest's report (sha256 {outcome.sha256} "
                                     f"vs {r.sha256})", field="backup")
        self._update(bid, sha256=r.sha256, size_bytes=r.size_bytes)
        # ...and it restores: the restored copy's checksums are the backup's own.
        with self.app.sessions() as s:
            b = s.get(models.Backup, bid)
            assert b is not None
            links = [(x.id, x.sha256) for x in chain(s, b)]
        proof = await self._restore_in_scratch(links, None)
        if not proof["ok"]:
            raise FailedPrecondition(f"the backup did not restore: {proof['detail']}", field="backup")
        self._update(bid, status=BackupStatus.COMPLETED, to_lsn=r.to_lsn, datastore_version=r.datastore_version,
                     location=self.store.location(bid), verify_status=VerifyStatus.VERIFIED,
                     verify_detail=str(proof["detail"])[:2000],
                     checksums=[{"table": t, "checksum": v} for t, v in sorted(proof["checksums"].items())])

    async def _restore_in_scratch(self, links: list[tuple[str, str]], expected: dict[str, int] | None
                                  ) -> dict[str, Any]:
        """Restores the chain in a throw-away sandbox and returns {ok, detail, checksums}; with `expected`,
        ok also needs the restored tables' checksums to equal it. On a host (hostd's ProveBackup), never
        here: only a Backups wired without hosts (tests of the sandbox itself) runs it on this machine."""
        cap = self._extract_cap(links)
        if self.hosts is not None:
            return await self._prove_on_a_host(links, expected, cap)
        stage = await asyncio.to_thread(sandbox.new_stage, self.scratch_dir())
        try:
            for i, (lid, _) in enumerate(links):
                with open(sandbox.input_path(stage, i), "wb") as f:
                    async for data in self.store.open_reader(lid):
                        await asyncio.to_thread(f.write, data)
            return await sandbox.prove(stage, [x[0] for x in links], [x[1] for x in links], expected, cap,
                                       self.secret_paths(), timeout=BACKUP_TIMEOUT)
        finally:
            await asyncio.to_thread(shutil.rmtree, stage, True)

    async def _prove_on_a_host(self, links: list[tuple[str, str]], expected: dict[str, int] | None,
                               cap: int) -> dict[str, Any]:
        """Streams the chain to an UP host, in random order of hosts until one answers."""
        assert self.hosts is not None
        with self.app.sessions() as s:
            host_ids = list(s.scalars(select(models.Host.id).where(models.Host.state == HostState.UP)))
        if not host_ids:
            raise Unavailable("no host is up to prove the backup on", field="backup")
        random.shuffle(host_ids)
        spec = host_pb2.ProveBackupSpec(backup_ids=[x[0] for x in links], sha256s=[x[1] for x in links],
                                        compare=expected is not None, expected=expected or {},
                                        max_extract_bytes=cap)

        async def chunks() -> AsyncIterator[host_pb2.ProveBackupChunk]:
            yield host_pb2.ProveBackupChunk(spec=spec)
            for i, (lid, _) in enumerate(links):
                async for data in self.store.open_reader(lid):
                    yield host_pb2.ProveBackupChunk(link=i, data=data)

        last: RedDwarfError = Unavailable("no host is up to prove the backup on", field="backup")
        for hid in host_ids:
            try:
                await self.hosts.ensure_crl(hid)
                res = await self.hosts.stub(hid).ProveBackup(chunks(), timeout=BACKUP_TIMEOUT)
            except grpc.aio.AioRpcError as exc:
                last = from_rpc_error(exc)
            except Unavailable as exc:
                last = exc
            else:
                log.info("backup proven on a host", extra={"host": hid, "backup": links[-1][0], "ok": res.ok})
                return {"ok": res.ok, "detail": res.detail, "checksums": dict(res.checksums)}
            if not isinstance(last, Unavailable):
                raise last
            log.warning("proof restore: host unavailable, trying another", extra={"host": hid})
        raise last

    def _extract_cap(self, links: list[tuple[str, str]]) -> int:
        """Bytes one stream of the chain may unpack to: twice its instance's volume and 1 GiB (0: unknown)."""
        with self.app.sessions() as s:
            b = s.get(models.Backup, links[-1][0])
            inst = s.get(models.Instance, b.instance_id) if b is not None else None
            gb = inst.volume_size_gb if inst is not None else 0
        return (2 * gb + 1) << 30 if gb else 0

    def secret_paths(self) -> list[str]:
        """What the sandbox must not see: the state dir (CA key, KEK, state DB, tokens) and each of the
        server's key, database and config paths wherever they were configured."""
        st = self.app.settings
        paths = [st.state_dir, st.pki_dir, st.backup_dir, st.backup_kek_file, str(st.server_tls_dir),
                 st.s3_credentials_file]
        if st.db_url.startswith("sqlite:///"):
            paths.append(st.db_url.removeprefix("sqlite:///"))
        if os.environ.get("REDDWARF_CONFIG"):
            paths.append(os.environ["REDDWARF_CONFIG"])
        return [os.path.abspath(p) for p in paths if p]

    def scratch_dir(self, create: bool = True) -> str:
        """Scratch restores are staged under the server's state dir, emptied at every start (a killed server
        must not leave a restored copy of a tenant's data behind)."""
        path = os.path.join(self.app.settings.state_dir, "scratch")
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def clear_scratch(self) -> None:
        sandbox.clear(self.scratch_dir(create=False))  # a sandbox that outlived us: killed, its cgroups removed
        shutil.rmtree(self.scratch_dir(create=False), ignore_errors=True)

    async def backup_failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        bid = ctx.params["backup_id"]
        self._update(bid, status=BackupStatus.FAILED, fault_message=fault, fault_details=details)
        await self.store.delete(bid)

    async def step_verify(self, ctx: tasks.StepContext) -> None:
        bid = ctx.resource.split("/", 1)[1]
        with self.app.sessions() as s:
            b = s.get(models.Backup, bid)
            if b is None:
                return
            links = [(x.id, x.sha256) for x in chain(s, b)]
            expected = {c["table"]: int(c["checksum"]) for c in b.checksums or []}
        self._update(bid, verify_status=VerifyStatus.VERIFYING, verify_detail="")
        for lid, sha in links:
            outcome = await self.store.verify(lid, sha)
            if not outcome.ok:
                self._update(bid, verify_status=VerifyStatus.MISMATCH, verify_detail=outcome.detail[:2000])
                return
        out = await self._restore_in_scratch(links, expected)
        self._update(bid, verify_status=VerifyStatus.VERIFIED if out["ok"] else VerifyStatus.MISMATCH,
                     verify_detail=out["detail"][:2000])

    async def verify_failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        self._update(ctx.resource.split("/", 1)[1], verify_status=VerifyStatus.FAILED, verify_detail=fault[:2000])

    def kinds(self) -> list[tasks.TaskKind]:
        return [tasks.TaskKind("create_backup", (tasks.Step("take_backup", self.step_take),),
                               on_failed=self.backup_failed, max_attempts=1),
                tasks.TaskKind("verify_backup", (tasks.Step("verify", self.step_verify),),
                               on_failed=self.verify_failed, max_attempts=2)]

    # -- restore into a new instance: a step of create_instance ----------------------------------
    async def restore_into(self, ctx: tasks.StepContext, instance_id: str, backup_id: str) -> None:
        with self.app.sessions() as s:
            b = s.get(models.Backup, backup_id)
            if b is None:
                raise NotFound(f"backup {backup_id} is gone", field="restore_from_backup")
            links = chain(s, b)
            ids, shas = [x.id for x in links], [x.sha256 for x in links]
            expected = {c["table"]: int(c["checksum"]) for c in b.checksums or []}
        for lid, sha in zip(ids, shas, strict=True):  # every link decrypts, authenticates and hashes right
            outcome = await self.store.verify(lid, sha)
            if not outcome.ok:
                raise FailedPrecondition(f"backup {lid} is corrupt: {outcome.detail}; nothing was restored",
                                         field="restore_from_backup")
        await self.registry.call(instance_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:restore", restore=agent_pb2.RunRestore(backup_ids=ids, sha256=shas)),
            timeout=BACKUP_TIMEOUT)
        res = await self.registry.call(instance_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:checksums", table_checksums=agent_pb2.TableChecksums()), timeout=3600)
        got = {c.table: c.checksum for c in res.checksums.checksums}
        if got != expected:
            differ = sorted(t for t in set(got) | set(expected) if got.get(t) != expected.get(t))
            raise FailedPrecondition("restored tables do not match the checksums recorded at backup time: "
                                     + ", ".join(differ[:5]) + (" ..." if len(differ) > 5 else ""),
                                     field="restore_from_backup")


class BackupsServicer(database_pb2_grpc.BackupsServicer):
    def __init__(self, app: App, backups: Backups, engine: tasks.TaskEngine, paginator: Paginator) -> None:
        self.app = app
        self.b = backups
        self.engine = engine
        self.pages = paginator

    def _owned(self, s: Session, context: Context, name: str, field: str = "name") -> models.Backup:
        p = current_principal(context)
        bid = resource_id(name, "backups", field)
        b = s.get(models.Backup, bid)
        if b is None or (not p.admin and b.tenant_id != p.tenant_id):
            raise NotFound(f"backup {bid!r} does not exist", field=field)
        return b

    @grpc_edge
    async def CreateBackup(self, request: database_pb2.CreateBackupRequest,
                           context: Context) -> database_pb2.Backup:
        p = current_principal(context)
        req = request.backup
        if not req.display_name.strip() or len(req.display_name) > 255:
            raise InvalidArgument("backup.display_name is required (at most 255 characters)", field="backup.display_name")
        if len(req.description) > 1024:
            raise InvalidArgument("backup.description is longer than 1024 characters", field="backup.description")
        backup_tags = tags.validate_tags(req.tags, "backup.tags")
        rid = parse_request_id(request.request_id)

        def lookup(s: Session) -> database_pb2.Backup | None:
            # Before the instance's checks: a retry finds the instance busy with the backup it asked for.
            prior = s.scalar(select(models.Backup).where(models.Backup.tenant_id == p.tenant_id,
                                                         models.Backup.request_id == rid))
            return None if prior is None else backup_pb(prior)

        def create(s: Session) -> database_pb2.Backup:
            inst = owned_instance(s, p, req.instance, "backup.instance")
            iid = inst.id
            status, _ = derived_status(s, inst, self.app.settings.heartbeat_expiry_seconds)
            # RESTART_REQUIRED is a running instance waiting for a static configuration value.
            if status not in (InstanceStatus.ACTIVE, InstanceStatus.RESTART_REQUIRED):
                raise FailedPrecondition(f"instance is {status}; a backup needs ACTIVE", field="backup.instance")
            parent_id = None
            if req.parent:
                parent = self._owned(s, context, req.parent, "backup.parent")
                if parent.instance_id != iid or parent.status != BackupStatus.COMPLETED:
                    raise FailedPrecondition("an incremental's parent must be a COMPLETED backup of the same instance",
                                             field="backup.parent")
                parent_id = parent.id
            tenant = s.get(models.Tenant, inst.tenant_id)
            if tenant is not None:
                check_backup_quota(s, tenant)
            if tasks.active_task_for(s, f"instances/{iid}") is not None:
                raise FailedPrecondition("instance is busy with another operation", field="backup.instance")
            row = models.Backup(id=str(uuid.uuid4()), tenant_id=inst.tenant_id, instance_id=iid,
                                display_name=req.display_name.strip(), description=req.description,
                                status=BackupStatus.NEW,
                                parent_id=parent_id, kind="incremental" if parent_id else "full",
                                datastore=inst.datastore, datastore_version=inst.datastore_version,
                                tags=backup_tags, request_id=rid)
            s.add(row)
            s.flush()
            tasks.submit(s, "create_backup", f"instances/{iid}", {"backup_id": row.id})
            return backup_pb(row)

        pb = await asyncio.to_thread(create_once, self.app.sessions, rid, lookup, create)
        self.engine.wake()
        return pb

    @grpc_edge
    async def GetBackup(self, request: database_pb2.GetBackupRequest,
                        context: Context) -> database_pb2.Backup:
        with self.app.sessions() as s:
            return backup_pb(self._owned(s, context, request.name))

    @grpc_edge
    async def ListBackups(self, request: database_pb2.ListBackupsRequest,
                          context: Context) -> database_pb2.ListBackupsResponse:
        p = current_principal(context)
        tagged = tags.parse_filters(request.tags)
        filter_key = request.instance + (f"|{tags.filter_key(tagged)}" if tagged else "")
        page = self.pages.page("ListBackups", p.caller_key, request.page_size, request.page_token, filter_key)
        with self.app.sessions() as s:
            q = select(models.Backup).order_by(models.Backup.created_at, models.Backup.id)
            q = q.where(*tags.tag_conditions(models.Backup.tags, tagged))
            if not p.admin:
                q = q.where(models.Backup.tenant_id == p.tenant_id)
            if request.instance:
                q = q.where(models.Backup.instance_id == resource_id(request.instance, "instances", "instance"))
            rows = s.scalars(q.offset(page.offset).limit(page.size + 1)).all()
            return database_pb2.ListBackupsResponse(
                backups=[backup_pb(b) for b in rows[:page.size]],
                next_page_token=self.pages.next_token("ListBackups", p.caller_key, page, len(rows) > page.size,
                                                      filter_key))

    @grpc_edge
    async def DeleteBackup(self, request: database_pb2.DeleteBackupRequest,
                           context: Context) -> empty_pb2.Empty:
        with self.app.sessions() as s, s.begin():
            b = self._owned(s, context, request.name)
            doomed = [b]
            frontier = [b.id]
            while frontier:
                kids = s.scalars(select(models.Backup).where(models.Backup.parent_id.in_(frontier))).all()
                if kids and not request.cascade:
                    raise FailedPrecondition(f"{len(kids)} incremental backup(s) depend on this one; delete them "
                                             "first or pass cascade", field="cascade")
                doomed += kids
                frontier = [k.id for k in kids]
            if b.status in TAKING:
                raise FailedPrecondition("the backup is still being taken", field="name")
            ids = [d.id for d in doomed]
            for d in reversed(doomed):  # children first: the parent link must never dangle
                s.delete(d)
                s.flush()
        for bid in ids:
            await self.b.store.delete(bid)
        return empty_pb2.Empty()

    @grpc_edge
    async def UpdateBackup(self, request: database_pb2.UpdateBackupRequest,
                           context: Context) -> database_pb2.Backup:
        """Rename, describe, tag: validated whole before anything changes."""
        paths = mask_paths(request.update_mask.paths, ("display_name", "description", "tags"))
        given = request.backup
        if "display_name" in paths and (problem := display_name_problem(given.display_name)):
            raise InvalidArgument(f"backup.display_name {problem}", field="backup.display_name")
        if "description" in paths and len(given.description) > 1024:
            raise InvalidArgument("backup.description is longer than 1024 characters", field="backup.description")
        tags.validate_tags(given.tags, "backup.tags")
        with self.app.sessions() as s, s.begin():
            b = self._owned(s, context, given.name, "backup.name")
            new_tags = tags.apply_paths(b.tags, given.tags, [x for x in paths if x.startswith("tags")],
                                        "backup.tags")
            if "display_name" in paths:
                b.display_name = given.display_name.strip()
            if "description" in paths:
                b.description = given.description
            if new_tags != (b.tags or {}):
                b.tags = new_tags
            s.flush()
            return backup_pb(b)

    @grpc_edge
    async def VerifyBackup(self, request: database_pb2.VerifyBackupRequest,
                           context: Context) -> database_pb2.Backup:
        with self.app.sessions() as s, s.begin():
            b = self._owned(s, context, request.name)
            if b.status != BackupStatus.COMPLETED:
                raise FailedPrecondition(f"backup is {b.status}; only a COMPLETED backup can be verified", field="name")
            if tasks.active_task_for(s, f"backups/{b.id}") is not None:
                raise FailedPrecondition("a verification is already running", field="name")
            b.verify_status = VerifyStatus.VERIFYING
            tasks.submit(s, "verify_backup", f"backups/{b.id}", {})
            pb = backup_pb(b)
        self.engine.wake()
        return pb

    @grpc_edge
    async def SetBackupSchedule(self, request: database_pb2.SetBackupScheduleRequest,
                                context: Context) -> database_pb2.BackupSchedule:
        sch = request.schedule
        if not 3600 <= sch.interval_seconds <= 31 * 86400 and sch.interval_seconds != 0:
            raise InvalidArgument("schedule.interval_seconds must be 0 (off) or between 3600 and 31 days",
                                  field="schedule.interval_seconds")
        if not 1 <= sch.keep <= 100:
            raise InvalidArgument("schedule.keep must be 1..100", field="schedule.keep")
        if sch.full_every < 0 or sch.full_every > 100:
            raise InvalidArgument("schedule.full_every must be 0..100", field="schedule.full_every")
        p = current_principal(context)
        with self.app.sessions() as s, s.begin():
            iid = owned_instance(s, p, request.instance, "instance").id
            row = s.get(models.BackupSchedule, iid) or models.BackupSchedule(instance_id=iid)
            row.interval_seconds, row.keep, row.full_every = sch.interval_seconds, sch.keep, sch.full_every or 1
            row.next_run = now() + dt.timedelta(seconds=sch.interval_seconds) if sch.interval_seconds else None
            s.add(row)
            s.flush()
            return schedule_pb(row)

    @grpc_edge
    async def GetBackupSchedule(self, request: database_pb2.GetBackupScheduleRequest,
                                context: Context) -> database_pb2.BackupSchedule:
        p = current_principal(context)
        iid = resource_id(request.instance, "instances", "instance")
        with self.app.sessions() as s:
            inst = s.get(models.Instance, iid)
            if inst is None or (not p.admin and inst.tenant_id != p.tenant_id):
                raise NotFound(f"instance {iid!r} does not exist", field="instance")
            row = s.get(models.BackupSchedule, iid)
            if row is None:
                raise NotFound("this instance has no backup schedule", field="instance")
            return schedule_pb(row)


async def apply_retention(app: App, store: BackupStore) -> None:
    """Per schedule: keep the newest `keep` COMPLETED fulls; older fulls go with their incrementals."""
    doomed: list[str] = []
    with app.sessions() as s, s.begin():
        for sch in s.scalars(select(models.BackupSchedule)).all():
            fulls = s.scalars(select(models.Backup).where(
                models.Backup.instance_id == sch.instance_id, models.Backup.kind == "full",
                models.Backup.status == BackupStatus.COMPLETED).order_by(models.Backup.created_at.desc())).all()
            for old in fulls[sch.keep:]:
                group, frontier = [old], [old.id]
                while frontier:
                    kids = s.scalars(select(models.Backup).where(models.Backup.parent_id.in_(frontier))).all()
                    group += kids
                    frontier = [k.id for k in kids]
                for b in reversed(group):
                    doomed.append(b.id)
                    s.delete(b)
                    s.flush()
    for bid in doomed:
        await store.delete(bid)


async def schedule_loop(app: App, store: BackupStore, engine: tasks.TaskEngine, every: float = 30.0) -> None:
    """Takes scheduled backups (a full every `full_every` runs, incrementals between) and keeps the newest
    `keep` fulls with their incrementals."""
    while True:
        await asyncio.sleep(every)
        await asyncio.to_thread(take_scheduled_backups, app)
        engine.wake()
        await apply_retention(app, store)


def take_scheduled_backups(app: App) -> int:
    """Submits the due schedules' backups, under the same quotas as CreateBackup: a run over quota takes
    no backup and leaves its fault on the schedule (GetBackupSchedule shows it). Returns how many."""
    return db.run_transaction(app.sessions, _take_due)


def _take_due(s: Session) -> int:
    taken = 0
    due = s.scalars(select(models.BackupSchedule).where(models.BackupSchedule.next_run.is_not(None),
                                                        models.BackupSchedule.next_run <= now())).all()
    for sch in due:
        # Once across every server: the run is claimed by moving next_run on from the value read, in
        # one conditional UPDATE. A server that read the same value concurrently updates nothing (it
        # waits for our row lock, then finds next_run moved; on Galera the loser's commit conflicts
        # and its retry reads the new value).
        claimed = s.execute(update(models.BackupSchedule)
                            .where(models.BackupSchedule.instance_id == sch.instance_id,
                                   models.BackupSchedule.next_run == sch.next_run)
                            .values(next_run=now() + dt.timedelta(seconds=sch.interval_seconds))
                            .execution_options(synchronize_session=False))
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            continue
        s.refresh(sch)
        inst = s.get(models.Instance, sch.instance_id)
        if inst is None or inst.deleted_at is not None or inst.status != InstanceStatus.ACTIVE \
                or tasks.active_task_for(s, f"instances/{inst.id}") is not None:
            continue
        tenant = s.get(models.Tenant, inst.tenant_id)
        try:
            if tenant is None:
                raise PermissionDenied(f"tenant {inst.tenant_id!r} does not exist", field="tenant")
            check_backup_quota(s, tenant)
        except (ResourceExhausted, PermissionDenied) as err:
            sch.fault_message, sch.fault_at = f"scheduled backup not taken: {err.message}"[:2000], now()
            log.warning("scheduled backup refused", extra={"instance": inst.id, "reason": err.message})
            continue
        last = s.scalars(select(models.Backup).where(models.Backup.instance_id == inst.id,
                                                     models.Backup.status == BackupStatus.COMPLETED)
                         .order_by(models.Backup.created_at.desc())).first()
        full = last is None or sch.runs % max(1, sch.full_every) == 0
        row = models.Backup(id=str(uuid.uuid4()), tenant_id=inst.tenant_id, instance_id=inst.id,
                            display_name=f"scheduled {now():%Y-%m-%d %H:%M}", status=BackupStatus.NEW,
                            parent_id=None if full or last is None else last.id, kind="full" if full else "incremental",
                            datastore=inst.datastore, datastore_version=inst.datastore_version)
        s.add(row)
        s.flush()
        tasks.submit(s, "create_backup", f"instances/{inst.id}", {"backup_id": row.id})
        sch.runs += 1
        sch.fault_message, sch.fault_at = "", None
        taken += 1
    return taken

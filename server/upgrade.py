"""Moving an instance to a newer datastore version or template revision: the upgrade_instance task.

  upgrade_instance  backup → checksums → stop_old → replace_container → create_container → start_container
                    → wait_agent → upgrade_datadir → verify → finish

A verified backup is taken first and the tables' checksums recorded; mysqld is shut down cleanly and the old
container stopped (the downtime starts), then deleted with the volume kept; a container from the new
version's template (catalog.template_for) gets the same volume and a fresh one-time enrollment token; the
agent's prepare without accounts starts the new mysqld on the datadir and runs mariadb-upgrade (the datadir's
version marker differs: agent/mysqld.py); health and the checksums are checked against those recorded.

Any failure rolls back (`compensate`): the old version's container on the same volume, and, when the new
mysqld had touched the datadir already, the pre-upgrade backup restored into it. The downtime (clean stop to
first healthy report, of whichever mysqld ends up serving) is in the instance's `last_upgrade`.

`start_upgrade` is the entry point for other modules (maintenance windows schedule upgrades and template
revisions through it); the UpgradeInstance servicer calls it too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound
from reddwarf.common.states import BackupStatus, InstanceStatus
from reddwarf.v1 import agent_pb2, host_pb2

from . import maintenance, models, tasks
from .admin import revoke_identity
from .app import App
from .db import update_row
from .instance_tasks import InstanceTasks
from .instance_views import derived_status
from .migration import _generation

log = logging.getLogger("reddwarf.server.upgrade")
KIND = "upgrade_instance"
CHECKSUM_TIMEOUT = 3600


def version_key(version: str) -> tuple[int, ...]:
    """"10.11" → (10, 11): versions compare as numbers, not text ("9.9" < "10.11")."""
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return ()


def submit_upgrade(s: Session, row: models.Instance, target_version: str, revision: int | None = None,
                   field: str = "datastore_version", heartbeat_expiry: float = 60.0,
                   task_id: str | None = None) -> models.Task:
    """Checks the upgrade (target a newer active version of the instance's datastore, or a template revision of
    its current one; the instance ACTIVE and idle), then adds its backup row and task in the caller's
    transaction. Raises, with nothing changed, when it cannot."""
    check_upgrade(s, row, target_version, revision, field, heartbeat_expiry)
    return _submit(s, row, target_version, revision, task_id or str(uuid.uuid4()))


def check_upgrade(s: Session, row: models.Instance, target_version: str, revision: int | None = None,
                  field: str = "datastore_version", heartbeat_expiry: float = 60.0) -> None:
    """What submit_upgrade refuses, without adding anything (a maintenance-window upgrade is checked when it
    is asked for, and again when its window comes)."""
    if not target_version:
        raise InvalidArgument("datastore_version is required", field=field)
    if len(target_version) > 64:
        raise InvalidArgument("datastore_version is at most 64 characters", field=field)
    if revision is not None and not 0 <= revision <= 10_000:
        raise InvalidArgument("revision must be 0..10000", field="revision")
    dv = s.scalar(select(models.DatastoreVersion).where(
        models.DatastoreVersion.datastore_id == row.datastore, models.DatastoreVersion.version == target_version,
        models.DatastoreVersion.active.is_(True)))
    if dv is None:
        raise InvalidArgument(f"{row.datastore} has no active version {target_version[:64]!r}", field=field)
    current = row.datastore_version
    if target_version == current and revision is None:
        raise InvalidArgument(f"the instance runs {row.datastore} {current} already", field=field)
    if target_version == current and revision is not None and revision <= row.template_revision:
        raise InvalidArgument(f"the instance runs template revision {row.template_revision} already; a patch "
                              "moves onto a newer one", field="revision")
    if target_version != current and version_key(target_version) <= version_key(current):
        raise InvalidArgument(f"{target_version} is older than the instance's {current}; only upgrades are "
                              "possible (restore a backup into a new instance to go back)", field=field)
    ic = s.get(models.InstanceConfiguration, row.id)
    if ic is not None and ic.configuration_id and target_version != current:
        # A group is made for one datastore version (its rules); the new version would start with values
        # checked against the old one's.
        raise FailedPrecondition(f"configuration group {ic.configuration_id} is for {row.datastore} {current}; "
                                 "detach it before the upgrade", field="configuration")
    status, _ = derived_status(s, row, heartbeat_expiry)
    if status != InstanceStatus.ACTIVE:
        raise FailedPrecondition(f"instance is {status}; an upgrade needs ACTIVE", field="name")
    running = tasks.active_task_for(s, f"instances/{row.id}")
    if running is not None:
        raise FailedPrecondition(f"instance {row.id} has a {running.kind} task running; try again when it has "
                                 "ended", field="name")


def _submit(s: Session, row: models.Instance, target_version: str, revision: int | None,
            task_id: str) -> models.Task:
    current = row.datastore_version
    backup_id = str(uuid.uuid4())
    s.add(models.Backup(id=backup_id, tenant_id=row.tenant_id, instance_id=row.id,
                        display_name=f"before upgrade to {target_version}", description="taken by UpgradeInstance",
                        status=BackupStatus.NEW, kind="full", datastore=row.datastore,
                        datastore_version=current, tags={}))
    params: dict[str, Any] = {"from": current, "to": target_version, "backup_id": backup_id,
                              "token_generation": _generation(task_id)}
    if revision is None:
        # A move to another version takes that version's current template revision (0 until it is patched).
        revision = s.scalar(select(models.DatastoreVersion.template_revision).where(
            models.DatastoreVersion.datastore_id == row.datastore,
            models.DatastoreVersion.version == target_version)) or 0
    params["template_revision"] = revision
    task = tasks.submit(s, KIND, f"instances/{row.id}", params, task_id=task_id)
    row.last_upgrade = {"from_version": current, "to_version": target_version, "outcome": "RUNNING",
                        "backup": backup_id, "time": utcnow().isoformat()}
    s.flush()
    log.info("upgrade submitted", extra={"instance": row.id, "from": current, "to": target_version})
    return task


def start_upgrade(app: App, instance_id: str, target_version: str, revision: int | None = None) -> str:
    """Submits an upgrade of `instance_id` (or its move onto template `revision` of `target_version`); returns
    the task id. For other modules (maintenance windows); the caller wakes its task engine."""
    with app.sessions() as s, s.begin():
        row = s.get(models.Instance, instance_id)
        if row is None or row.deleted_at is not None:
            raise NotFound(f"instance {instance_id} does not exist", field="name")
        return submit_upgrade(s, row, target_version, revision,
                              heartbeat_expiry=app.settings.heartbeat_expiry_seconds).id


def _in_window(s: Session, row: models.Instance, action: models.PendingMaintenance, task_id: str) -> None:
    """A queued upgrade (UpgradeInstance with in_maintenance_window) starting in its window."""
    revision = action.params.get("revision")
    submit_upgrade(s, row, str(action.params.get("datastore_version", "")),
                   int(revision) if revision is not None else None, task_id=task_id)


def patches_running(s: Session, datastore: str, version: str) -> int:
    """How many template-revision moves (upgrade_instance tasks that stay on their version) of `version` are
    active, cluster-wide, as the caller's transaction sees the tasks table. Locking reads: on a server
    database they see the latest committed tasks, not the transaction's snapshot."""
    n = 0
    for t in s.scalars(select(models.Task).where(models.Task.kind == KIND, models.Task.state.in_(
            tasks.ACTIVE_STATES)).with_for_update()):
        p = t.params or {}
        if p.get("from") != version or p.get("to") != version:
            continue
        inst = s.get(models.Instance, t.resource.removeprefix("instances/"))
        if inst is not None and inst.datastore == datastore:
            n += 1
    return n


def _patch(s: Session, row: models.Instance, action: models.PendingMaintenance, task_id: str) -> None:
    """A queued patch (PatchDatastoreVersion): instances move onto a new template revision one at a time, so
    a bad template breaks one instance, not all of a version's at once. While another patch of the version
    runs, this one waits: FailedPrecondition leaves it pending for the scheduler's next pass.

    The count runs in the transaction that claims the action and submits the task. Two servers starting
    patches of one version at once are serialized by a lock on the version's row (SQLite has one writer
    anyway: the claim's UPDATE already made this transaction it)."""
    version = str(action.params.get("datastore_version", ""))
    s.execute(select(models.DatastoreVersion.id).where(
        models.DatastoreVersion.datastore_id == row.datastore, models.DatastoreVersion.version == version)
        .with_for_update())
    if patches_running(s, row.datastore, version):
        raise FailedPrecondition(f"another instance of {row.datastore} {version} is being patched; this one "
                                 "waits for it", field="name")
    _in_window(s, row, action, task_id)


maintenance.register_action("upgrade", _in_window)
maintenance.register_action("patch", _patch)


@dataclass(eq=False)
class Upgrades:
    it: InstanceTasks

    def kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        it = self.it
        return [tasks.TaskKind(KIND, (
            S("backup", self.step_backup), S("checksums", self.step_checksums), S("stop_old", self.step_stop_old),
            S("replace_container", self.step_replace_container), S("create_container", it.step_create_container),
            S("start_container", it.step_start_container), S("wait_agent", it.step_wait_agent),
            S("upgrade_datadir", self.step_upgrade_datadir), S("verify", self.step_verify),
            S("finish", self.step_finish)),
            compensate=self.compensate, on_failed=self.failed, max_attempts=3)]

    def _set_version(self, iid: str, version: str) -> None:
        update_row(self.it.app.sessions, models.Instance, iid, datastore_version=version)

    def _report(self, iid: str, **values: Any) -> None:
        row = self.it._row(iid)
        update_row(self.it.app.sessions, models.Instance, iid, last_upgrade={**(row.last_upgrade or {}), **values})
        self.it.events.publish(iid)

    async def _checksums(self, ctx: tasks.StepContext, tag: str) -> dict[str, int]:
        res = await self.it.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:{tag}", table_checksums=agent_pb2.TableChecksums()), timeout=CHECKSUM_TIMEOUT)
        return {c.table: int(c.checksum) for c in res.checksums.checksums}

    async def step_backup(self, ctx: tasks.StepContext) -> None:
        """The pre-upgrade backup, verified by a restore in a sandbox (Backups.step_take). Taken once."""
        b = self.it._detached(models.Backup, ctx.params["backup_id"], "the pre-upgrade backup vanished", "name")
        if b.status == BackupStatus.COMPLETED:
            return
        if b.status != BackupStatus.NEW:
            raise FailedPrecondition(f"the pre-upgrade backup was cut off ({b.status}); nothing was changed",
                                     field="name")
        try:
            await self.it.backups.step_take(ctx)
        except (asyncio.CancelledError, tasks.LeaseLost):
            raise
        except Exception as exc:
            await self.it.backups.backup_failed(ctx, f"pre-upgrade backup failed: {exc}", str(exc))
            raise

    async def step_checksums(self, ctx: tasks.StepContext) -> None:
        # Taken on the live instance just before its stop: a write in between fails the check (and rolls back).
        if "checksums" not in ctx.params:
            await ctx.save(checksums=await self._checksums(ctx, "checksums-before"))

    async def step_stop_old(self, ctx: tasks.StepContext) -> None:
        if "down_at" not in ctx.params:
            await ctx.save(down_at=time.time())
        await self.it.step_stop_datastore(ctx)
        await self.it.step_stop_container(ctx)

    async def _drop_container(self, ctx: tasks.StepContext, reason: str) -> None:
        iid = ctx.resource_id
        row = self.it._row(iid)
        with contextlib.suppress(NotFound):  # gone already: a replayed step
            await self.it._host(row).DeleteContainer(host_pb2.ContainerRef(id=iid))

        def revoke() -> None:
            with self.it.app.sessions() as s, s.begin():
                revoke_identity(self.it.app, s, f"spiffe://reddwarf/instance/{iid}", reason)
        await asyncio.to_thread(revoke)
        self.it.registry.disconnect(iid)

    async def step_replace_container(self, ctx: tasks.StepContext) -> None:
        """The old container goes (the volume stays, unmounted); the row names the new version, whose template
        the next step's container comes from."""
        await self._drop_container(ctx, "instance upgraded")
        await ctx.save(replaced=True)
        self._set_version(ctx.resource_id, ctx.params["to"])

    async def step_upgrade_datadir(self, ctx: tasks.StepContext) -> None:
        # From here the datadir may hold what the new mysqld wrote: a roll-back restores the backup.
        await ctx.save(touched=True)
        await self.it.prepare(ctx, accounts=False)

    async def step_verify(self, ctx: tasks.StepContext) -> None:
        res = await self.it.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:health", get_health=agent_pb2.GetHealth()), timeout=60)
        if not res.health.accepting_connections:
            raise tasks.TransientError(f"mysqld is not accepting connections yet: {res.health.last_error}")
        await ctx.save(up_at=time.time())
        before = {t: int(v) for t, v in ctx.params["checksums"].items()}
        after = await self._checksums(ctx, "checksums-after")
        # mariadb-upgrade may add or change mysql.* system tables; the tenant's tables must be as they were.
        before = {t: v for t, v in before.items() if not t.startswith("mysql.")}
        after = {t: v for t, v in after.items() if not t.startswith("mysql.")}
        if before != after:
            differ = sorted(t for t in set(before) | set(after) if before.get(t) != after.get(t))
            raise FailedPrecondition("tables differ after the upgrade: " + ", ".join(differ[:5]), field="name")
        await self.it.guests.on_health(ctx.resource_id, res.health)

    async def step_finish(self, ctx: tasks.StepContext) -> None:
        downtime = float(ctx.params.get("up_at", time.time())) - float(ctx.params["down_at"])
        update_row(self.it.app.sessions, models.Instance, ctx.resource_id, status=InstanceStatus.ACTIVE,
                   template_revision=int(ctx.params.get("template_revision") or 0))
        self._report(ctx.resource_id, outcome="SUCCEEDED", downtime_seconds=round(downtime, 3))
        log.info("instance upgraded", extra={"instance": ctx.resource_id, "to": ctx.params["to"],
                                             "downtime_seconds": round(downtime, 3)})

    async def compensate(self, ctx: tasks.StepContext) -> None:
        """Back to the old version: its container again (started, or made anew on the same volume), and the
        pre-upgrade backup restored when the new mysqld had touched the datadir."""
        if "down_at" not in ctx.params:
            return  # failed before the stop (the backup or the checksums): nothing changed
        iid, it = ctx.resource_id, self.it
        if ctx.params.get("replaced"):
            await self._drop_container(ctx, "instance upgrade rolled back")
            self._set_version(iid, ctx.params["from"])
            ctx.params["token_generation"] = int(ctx.params.get("token_generation", 0)) + 1
            ctx.params.pop("template_revision", None)
            await it.step_create_container(ctx)
            await it.step_start_container(ctx)
            await it.step_wait_agent(ctx)
            await it.prepare(ctx, accounts=False)
            if ctx.params.get("touched"):
                # The old mysqld came up on what the new one left; the data goes back to the backup's.
                await it.backups.restore_into(ctx, iid, ctx.params["backup_id"])
        else:
            row = it._row(iid)
            await it._host(row).StartContainer(host_pb2.ContainerRef(id=iid))
            await it.step_wait_agent(ctx)
        await it.step_activate(ctx)
        downtime = time.time() - float(ctx.params["down_at"])
        await ctx.save(rolled_back=True)
        self._report(iid, outcome="ROLLED_BACK", downtime_seconds=round(downtime, 3))

    async def failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        """Rolled back: ACTIVE on the old version, the task's fault says why. Otherwise ERROR with the fault."""
        if ctx.params.get("rolled_back") or "down_at" not in ctx.params:
            if "down_at" not in ctx.params:
                self._report(ctx.resource_id, outcome="ROLLED_BACK", downtime_seconds=0.0)
            return
        update_row(self.it.app.sessions, models.Instance, ctx.resource_id, status=InstanceStatus.ERROR,
                   fault_message=fault, fault_details=details, fault_at=utcnow())
        self._report(ctx.resource_id, outcome="FAILED")

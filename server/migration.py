"""Moving an instance whose data is a SAN LUN to another compute host: the migrate_instance task.

  migrate_instance  stop_datastore → stop_source → detach_source → move_volume → create_container
                    → start_container → wait_agent → prepare → activate

mysqld is shut down cleanly by its agent, the container stopped and deleted on the source and the volume let
go there (the LUN and its data stay on the SAN node). move_volume is the commit point: the SAN node's ACL is
switched to the target's initiator alone (tgtd drops any session of the source at once, so the source can
never write again: one writer, always), the target logs in and mounts it, and the row names the target. From
there the task only goes forward (its steps retried until they succeed); before it, a task that cannot
succeed puts the instance back on the source (`compensate`).

The container on the target is a new one from the template, enrolled with a fresh one-time token (a later
generation of the instance's); the old agent's certificates are revoked. The agent there finds the datadir
made already: `prepare` without accounts configures and starts mysqld on it, and makes its internal admin
again, while the databases and users are the ones in the datadir.

Every step is idempotent by the instance id, so a server killed after any step resumes it (server/tasks.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RedDwarfError,
    ResourceExhausted,
)
from reddwarf.common.states import HostState, InstanceStatus
from reddwarf.v1 import host_pb2

from . import models, tasks
from .admin import revoke_identity
from .db import update_row
from .instance_tasks import DELETED, InstanceTasks
from .instance_views import STOPPED
from .quotas import allocated
from .san import ISCSI

log = logging.getLogger("reddwarf.server.migration")
KIND = "migrate_instance"
EVACUATE_HOST = "evacuate_host"
EVACUATE_INSTANCE = "evacuate_instance"
# Stored statuses an instance cannot be moved from: not built yet, broken, stopped or gone.
UNMOVABLE = {InstanceStatus.BUILD: "is still being built (BUILD)", InstanceStatus.ERROR: "is in ERROR",
             InstanceStatus.FAILED: "has FAILED", STOPPED: "is stopped; start it first",
             InstanceStatus.SHUTDOWN: "is shut down", DELETED: "is deleted"}


def _free_memory(s: Session, h: models.Host) -> float:
    return h.memory_mb_total * (h.memory_overcommit or 1.0) - allocated(s, models.Instance.host_id == h.id).memory_mb


def _target_ok(s: Session, h: models.Host, source: str, memory_mb: int, field: str,
               reserved: dict[str, float] | None = None) -> None:
    """Refuses a target host that cannot take the instance, naming why. `reserved`: memory already promised
    to it by moves submitted in this transaction (a drain's earlier instances)."""
    if h.id == source:
        raise InvalidArgument(f"the instance is on host {h.id} already; name another host", field=field)
    if h.mode == "storage":
        raise InvalidArgument(f"host {h.id} is a SAN node; it runs no containers", field=field)
    if h.state != HostState.UP:
        raise FailedPrecondition(f"host {h.id} is {h.state.upper()}; it takes no instances", field=field)
    if h.volume_driver != ISCSI or not h.initiator_iqn:
        raise FailedPrecondition(f"host {h.id} has no iSCSI initiator (volume driver {h.volume_driver or 'unknown'!r})"
                                 "; a SAN volume cannot be attached there", field=field)
    free = _free_memory(s, h) - (reserved or {}).get(h.id, 0.0)
    if free < memory_mb:
        raise ResourceExhausted(f"host {h.id} has no room: {int(free)} MB memory free, the instance needs "
                                f"{memory_mb} MB", field=field)


def pick_target(s: Session, source: str, memory_mb: int, field: str = "host",
                reserved: dict[str, float] | None = None) -> str:
    """The up iscsi compute host (not the source) with the most free memory that fits the instance."""
    best: tuple[float, str] | None = None
    for h in s.scalars(select(models.Host).where(models.Host.id != source)).all():
        try:
            _target_ok(s, h, source, memory_mb, field, reserved)
        except RedDwarfError:
            continue
        free = _free_memory(s, h) - (reserved or {}).get(h.id, 0.0)
        if best is None or free > best[0]:
            best = (free, h.id)
    if best is None:
        raise ResourceExhausted(f"no other up compute host with an iSCSI initiator has room for this instance "
                                f"({memory_mb} MB memory)", field=field)
    return best[1]


def _generation(task_id: str) -> int:
    """One enrollment token per container made for an instance: a move's is derived from its task."""
    return int(hashlib.sha256(task_id.encode()).hexdigest()[:12], 16)


def submit_migration(s: Session, iid: str, host: str, field: str = "host",
                     reserved: dict[str, float] | None = None, flavor: models.Flavor | None = None) -> models.Task:
    """Checks that the instance can move (to `host`, or to one the scheduler picks when it is ""), then adds
    its migrate_instance task in the caller's transaction. Raises, with nothing changed, when it cannot.
    `flavor`: a resize that does not fit the instance's host; the target must have room for that flavor,
    which the instance takes at the commit point (its new container is made with the flavor's limits)."""
    row = s.get(models.Instance, iid)
    if row is None or row.deleted_at is not None:
        raise NotFound(f"instance {iid} does not exist", field="instance")
    running = tasks.active_task_for(s, f"instances/{iid}")
    if running is not None:
        raise FailedPrecondition(f"instance {iid} has a {running.kind} task running ({running.id}); "
                                 "try again when it has ended", field="instance")
    if row.status in UNMOVABLE:
        raise FailedPrecondition(f"instance {iid} {UNMOVABLE[row.status]}; it cannot be migrated", field="instance")
    if not row.storage_host_id or row.volume_driver != ISCSI:
        raise FailedPrecondition(
            f"instance {iid} is on a {row.volume_driver or 'loop'} volume, a file on host {row.host_id}'s own "
            "disk; loop volumes cannot move to another host (only SAN volumes, driver iscsi, can)",
            field="instance")
    if not row.host_id:
        raise FailedPrecondition(f"instance {iid} is on no host", field="instance")
    san = s.get(models.Host, row.storage_host_id)
    if san is None or san.state != HostState.UP:
        # Checked before anything stops: with the SAN node away the volume could be let go on the source
        # but attached nowhere, the instance down until it returns.
        raise FailedPrecondition(f"SAN node {row.storage_host_id} holding instance {iid}'s volume is "
                                 f"{san.state.upper() if san is not None else 'not registered'}; the volume "
                                 "cannot be attached anywhere until it is UP", field="instance")
    current = flavor or s.get(models.Flavor, row.flavor_id)
    memory_mb = current.memory_mb if current is not None else 0
    if host:
        target = s.get(models.Host, host)
        if target is None:
            raise NotFound(f"host {host!r} is not registered", field=field)
        _target_ok(s, target, row.host_id, memory_mb, field, reserved)
        target_id = target.id
    else:
        target_id = pick_target(s, row.host_id, memory_mb, field, reserved)
    task_id = str(uuid.uuid4())
    params: dict[str, object] = {"source": row.host_id, "target": target_id, "token_generation": _generation(task_id)}
    if flavor is not None:
        params["flavor"] = flavor.id
    task = tasks.submit(s, KIND, f"instances/{iid}", params, task_id=task_id)
    if reserved is not None:
        reserved[target_id] = reserved.get(target_id, 0.0) + memory_mb
    s.flush()
    log.info("migration submitted", extra={"instance": iid, "source": row.host_id, "target": target_id})
    return task


def fits_on_its_host(s: Session, row: models.Instance, memory_mb: int) -> bool:
    """Whether the instance's host has room for it at `memory_mb` (its own current memory counts as free)."""
    h = s.get(models.Host, row.host_id) if row.host_id else None
    if h is None:
        return True
    current = s.get(models.Flavor, row.flavor_id)
    return _free_memory(s, h) + (current.memory_mb if current is not None else 0) >= memory_mb


def submit_resize(s: Session, row: models.Instance, flavor: models.Flavor) -> str:
    """A resize: in place when the instance's host has room for the new flavor, else a migration to a host
    that has (the instance takes the flavor there). An instance whose loop volume cannot leave its host is
    refused, naming the flavor, with nothing changed. Returns the task kind submitted."""
    if fits_on_its_host(s, row, flavor.memory_mb):
        tasks.submit(s, "resize_instance", f"instances/{row.id}", {"flavor": flavor.id})
        return "resize_instance"
    h = s.get(models.Host, row.host_id)
    free = int(_free_memory(s, h)) if h is not None else 0
    if not row.storage_host_id or row.volume_driver != ISCSI:
        raise ResourceExhausted(
            f"host {row.host_id} has no room for flavor {flavor.id} ({flavor.memory_mb} MB memory; {free} MB free "
            f"besides the instance's own), and the instance's {row.volume_driver or 'loop'} volume is a file on "
            "that host's disk, so it cannot move to a host that has room", field="flavor")
    submit_migration(s, row.id, "", field="flavor", flavor=flavor)
    log.info("resize does not fit its host; migrating", extra={"instance": row.id, "flavor": flavor.id,
                                                                "host": row.host_id})
    return KIND


def drain(s: Session, host_id: str) -> tuple[list[str], list[str]]:
    """DrainHost: the host takes nothing new, and every instance on a SAN volume there gets a migrate task to
    a host the scheduler picks (all in the caller's transaction). Returns (migrated instance ids, the others,
    each with why it stays: a loop volume, a task running, no room)."""
    row = s.get(models.Host, host_id)
    assert row is not None
    if row.state == HostState.UP:
        row.state = HostState.DRAINING
    moved: list[str] = []
    stays: list[str] = []
    reserved: dict[str, float] = {}
    for iid in s.scalars(select(models.Instance.id).where(models.Instance.host_id == host_id,
                                                          models.Instance.deleted_at.is_(None))
                         .order_by(models.Instance.created_at, models.Instance.id)).all():
        try:
            submit_migration(s, iid, "", reserved=reserved)  # checks all before it adds anything
            moved.append(iid)
        except RedDwarfError as exc:
            stays.append(f"{iid}: {exc.message}")
    log.info("host drained", extra={"host": host_id, "migrating": len(moved), "staying": len(stays)})
    return moved, stays


def submit_evacuation(s: Session, host_id: str, reason: str) -> models.Task:
    """Adds the evacuate_host task of a lost host (or returns the one already under way)."""
    running = tasks.active_task_for(s, f"hosts/{host_id}")
    if running is not None and running.kind == EVACUATE_HOST:
        return running
    if running is not None:
        raise FailedPrecondition(f"host {host_id} has a {running.kind} task running", field="name")
    return tasks.submit(s, EVACUATE_HOST, f"hosts/{host_id}", {"reason": reason})


@dataclass(eq=False)
class Migrations:
    it: InstanceTasks

    def kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        it = self.it
        return [tasks.TaskKind(KIND, (
            S("stop_datastore", it.step_stop_datastore), S("stop_source", self.step_stop_source),
            S("detach_source", self.step_detach_source), S("move_volume", self.step_move_volume),
            S("create_container", it.step_create_container), S("start_container", it.step_start_container),
            S("wait_agent", it.step_wait_agent), S("prepare", self.step_prepare), S("activate", it.step_activate)),
            compensate=self.compensate, on_failed=self.failed, max_attempts=10)]

    def evacuation_kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        it = self.it
        return [
            tasks.TaskKind(EVACUATE_HOST, (
                S("fence_host", self.step_fence_host), S("fence_volumes", self.step_fence_volumes),
                S("evacuate", self.step_evacuate)), max_attempts=30),
            tasks.TaskKind(EVACUATE_INSTANCE, (
                S("choose_target", self.step_choose_target), S("revoke_old", self.step_revoke_old),
                S("move_volume", self.step_move_volume), S("create_container", it.step_create_container),
                S("start_container", it.step_start_container), S("wait_agent", it.step_wait_agent),
                S("prepare", self.step_prepare), S("activate", it.step_activate)),
                on_failed=self.failed, max_attempts=20)]

    # -- evacuate_host: fence first, then move --------------------------------------------------------
    def _on_host(self, host_id: str) -> list[models.Instance]:
        with self.it.app.sessions() as s:
            rows = list(s.scalars(select(models.Instance).where(models.Instance.host_id == host_id,
                                                                models.Instance.deleted_at.is_(None))
                                  .order_by(models.Instance.created_at, models.Instance.id)))
            for r in rows:
                s.expunge(r)
            return rows

    async def step_fence_host(self, ctx: tasks.StepContext) -> None:
        """The host is FENCED (it takes nothing, the watch does not revive it) and its certificate revoked:
        the CRL the server pushes to every other host makes them refuse it."""
        hid = ctx.resource_id

        def fence() -> int:
            with self.it.app.sessions() as s, s.begin():
                row = s.get(models.Host, hid)
                if row is None:
                    raise NotFound(f"host {hid} is not registered", field="name")
                row.state = HostState.FENCED
                return revoke_identity(self.it.app, s, f"spiffe://reddwarf/host/{hid}",
                                       f"host lost: {ctx.params.get('reason', '')}"[:255])
        revoked = await asyncio.to_thread(fence)
        log.warning("host fenced", extra={"host": hid, "certificates_revoked": revoked,
                                          "reason": ctx.params.get("reason", "")})

    async def step_fence_volumes(self, ctx: tasks.StepContext) -> None:
        """Every LUN of an instance on the host admits nobody (tgtd drops its sessions at once), before
        anything of it starts elsewhere: a half-alive host cannot write another byte."""
        for row in self._on_host(ctx.resource_id):
            if row.storage_host_id and row.volume_driver == ISCSI:
                await self.it.san._san_call(row.storage_host_id, "ExportVolume",
                                            host_pb2.ExportVolumeRequest(id=row.id, initiator_iqn=""), timeout=60)

    async def step_evacuate(self, ctx: tasks.StepContext) -> None:
        """An evacuate_instance task for each instance on a SAN volume; an instance on a loop volume goes to
        ERROR saying why it cannot follow. One with a task of its own running is left to it."""
        hid = ctx.resource_id
        reason = ctx.params.get("reason", "")

        def submit() -> tuple[int, int]:
            moved = stuck = 0
            with self.it.app.sessions() as s, s.begin():
                for row in s.scalars(select(models.Instance).where(models.Instance.host_id == hid,
                                                                   models.Instance.deleted_at.is_(None))).all():
                    tid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{ctx.task_id}/{row.id}"))
                    if s.get(models.Task, tid) is not None:
                        continue  # submitted before a restart of this step
                    running = tasks.active_task_for(s, f"instances/{row.id}")
                    if running is not None:
                        log.warning("instance on a lost host has a task running; left to it",
                                    extra={"instance": row.id, "task": running.id, "kind": running.kind})
                        continue
                    if row.storage_host_id and row.volume_driver == ISCSI:
                        tasks.submit(s, EVACUATE_INSTANCE, f"instances/{row.id}",
                                     {"source": hid, "token_generation": _generation(tid)}, task_id=tid)
                        moved += 1
                    elif row.status != InstanceStatus.ERROR:
                        row.status = InstanceStatus.ERROR
                        row.fault_message = (
                            f"host {hid} was lost ({reason}); this instance's {row.volume_driver or 'loop'} "
                            "volume is a file on that host's own disk, so it cannot be evacuated to another "
                            "host. It comes back only if the host does.")
                        row.fault_details = f"host={hid} volume_driver={row.volume_driver or 'loop'}"
                        row.fault_at = utcnow()
                        stuck += 1
            return moved, stuck
        moved, stuck = await asyncio.to_thread(submit)
        for row in self._on_host(hid):
            self.it.registry.disconnect(row.id)
            self.it.events.publish(row.id)
        log.warning("host evacuated", extra={"host": hid, "evacuating": moved, "cannot_move": stuck})

    # -- evacuate_instance ----------------------------------------------------------------------------
    async def step_choose_target(self, ctx: tasks.StepContext) -> None:
        if ctx.params.get("target"):
            return
        row = self.it._row(ctx.resource_id)

        def pick() -> str:
            with self.it.app.sessions() as s:
                f = s.get(models.Flavor, row.flavor_id)
                return pick_target(s, ctx.params["source"], f.memory_mb if f is not None else 0)
        await ctx.save(target=await asyncio.to_thread(pick))

    async def step_revoke_old(self, ctx: tasks.StepContext) -> None:
        """The old guest's certificates are revoked: an agent on the lost host that is still alive cannot
        come back as the instance."""
        iid = ctx.resource_id

        def revoke() -> None:
            with self.it.app.sessions() as s, s.begin():
                revoke_identity(self.it.app, s, f"spiffe://reddwarf/instance/{iid}", "instance evacuated")
        await asyncio.to_thread(revoke)
        self.it.registry.disconnect(iid)

    # -- migrate_instance -----------------------------------------------------------------------------
    async def step_stop_source(self, ctx: tasks.StepContext) -> None:
        row = self.it._row(ctx.resource_id)
        if row.host_id != ctx.params["source"]:
            return  # moved already (a replay after the commit point)
        await self.it.step_stop_container(ctx)

    async def step_detach_source(self, ctx: tasks.StepContext) -> None:
        """The container goes and the volume is let go on the source (the LUN and its data stay); the old
        agent's certificates are revoked, so nothing of the instance on the source can reach us again."""
        iid, source = ctx.resource_id, ctx.params["source"]
        row = self.it._row(iid)
        if row.host_id == source:
            client = self.it.hosts.client(source)
            with contextlib.suppress(NotFound):  # gone already: a replayed step
                await client.DeleteContainer(host_pb2.ContainerRef(id=iid))
            with contextlib.suppress(NotFound):
                await client.DeleteVolume(host_pb2.DeleteVolumeRequest(id=iid, keep_data=True))

        def revoke() -> None:
            with self.it.app.sessions() as s, s.begin():
                revoke_identity(self.it.app, s, f"spiffe://reddwarf/instance/{iid}", "instance migrated")
        await asyncio.to_thread(revoke)
        self.it.registry.disconnect(iid)

    async def _attach_on(self, iid: str, host_id: str, flavor: str = "") -> None:
        """The LUN admits `host_id`'s initiator alone (cutting off any other), then that host attaches it and
        the row names it: from the commit of that row the instance lives there."""
        san = self.it.san
        row = self.it._row(iid)
        assert row.storage_host_id
        initiator = await asyncio.to_thread(san._initiator, host_id)
        place = await asyncio.to_thread(san._placement, iid, row.volume_size_gb)
        await san._san_call(place.storage_host_id, "ExportVolume", host_pb2.ExportVolumeRequest(
            id=iid, initiator_iqn=initiator, chap=place.chap), timeout=60)
        await san._adopt(self.it.hosts.client(host_id), place.storage_host_id, iid, row.volume_locator, place.chap)
        # A resize that migrates takes its flavor in the same commit: the target was chosen with room for it.
        update_row(self.it.app.sessions, models.Instance, iid, host_id=host_id,
                   **({"flavor_id": flavor} if flavor else {}))
        self.it.events.publish(iid)

    async def step_move_volume(self, ctx: tasks.StepContext) -> None:
        target = ctx.params["target"]
        row = self.it._row(ctx.resource_id)
        if ctx.kind == KIND and row.host_id != target:
            # Checked again at the commit point: a target drained or lost since the submit is not moved to
            # (the task fails here, before the commit, and the instance goes back up on its source).
            def state() -> str:
                with self.it.app.sessions() as s:
                    h = s.get(models.Host, target)
                    return h.state if h is not None else "gone"
            now = await asyncio.to_thread(state)
            if now != HostState.UP:
                raise FailedPrecondition(f"target host {target} is {now.upper()} now; the instance stays on "
                                         f"{ctx.params['source']}", field="host")
        await self._attach_on(ctx.resource_id, target, str(ctx.params.get("flavor") or ""))
        log.info("instance volume moved", extra={"instance": ctx.resource_id, "source": ctx.params["source"],
                                                 "target": ctx.params["target"]})

    async def step_prepare(self, ctx: tasks.StepContext) -> None:
        await self.it.prepare(ctx, accounts=False)

    async def compensate(self, ctx: tasks.StepContext) -> None:
        """A move that cannot succeed before its commit point: the instance goes back up on the source. After
        it (the row names the target) there is nothing to undo; the instance shows the fault."""
        iid, source = ctx.resource_id, ctx.params["source"]
        row = self.it._row(iid)
        if row.host_id != source:
            return
        target = str(ctx.params.get("target") or "")
        if target and target != source:
            # Whatever the target made of it before the move failed goes (its session is cut off by the ACL
            # going back to the source anyway). A target that is away is told when it answers again
            # (HostWatch.forget_strays).
            tc = self.it.hosts.client(target)
            with contextlib.suppress(Exception):
                with contextlib.suppress(NotFound):
                    await tc.DeleteContainer(host_pb2.ContainerRef(id=iid), timeout=30)
                with contextlib.suppress(NotFound):
                    await tc.DeleteVolume(host_pb2.DeleteVolumeRequest(id=iid, keep_data=True), timeout=30)
        client = self.it.hosts.client(source)
        try:
            await client.GetContainer(host_pb2.ContainerRef(id=iid))
            await client.StartContainer(host_pb2.ContainerRef(id=iid))  # stopped, not yet detached
            await self.it.step_wait_agent(ctx)
        except NotFound:  # detached already: attach it again and make the container anew
            await self._attach_on(iid, source)
            ctx.params["token_generation"] = int(ctx.params.get("token_generation", 0)) + 1
            await self.it.step_create_container(ctx)
            await self.it.step_start_container(ctx)
            await self.it.step_wait_agent(ctx)
            await self.it.prepare(ctx, accounts=False)
        await self.it.step_activate(ctx)
        await ctx.save(rolled_back=True)

    async def failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        """Rolled back: the instance runs on its source again (ACTIVE), the task's fault says why it did not
        move. Otherwise it is in ERROR with that fault."""
        if ctx.params.get("rolled_back"):
            return
        update_row(self.it.app.sessions, models.Instance, ctx.resource_id, status=InstanceStatus.ERROR,
                   fault_message=fault, fault_details=details, fault_at=utcnow())
        self.it.events.publish(ctx.resource_id)

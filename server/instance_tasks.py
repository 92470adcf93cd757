"""The durable tasks behind the Instances service, as idempotent named steps (see DESIGN.md):

  create_instance   schedule → create_volume → create_container → start_container → wait_agent → prepare
                    → restore → activate; a create that cannot succeed gives back its certificate,
                    container and volume
  delete_instance   final_backup → delete_container → delete_volume → revoke_certificate → mark_deleted;
                    final_backup (only when asked) takes a full backup first, and a failed one ends the task
                    with nothing deleted (the failed task's fault shows on the instance)
  stop_instance     stop_datastore → stop_container → mark_stopped (the volume and its data stay)
  start_instance    start_container → wait_agent → activate; a start that cannot succeed stops the
                    container again (still stopped, the task's fault shown on it)
  restart_instance  restart
  resize_instance   set_limits → apply_limits
  resize_volume     resize_volume → wait_agent

Every hostd call is idempotent by the instance id and every agent command carries a task-derived id, so a
server killed after any step resumes it without duplicating a container or a volume.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import json_format
from sqlalchemy import select

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import FailedPrecondition, NotFound, RedDwarfError
from reddwarf.common.states import BackupStatus, InstanceStatus
from reddwarf.v1 import agent_pb2, common_pb2, host_pb2

from . import configurations, models, tasks
from .admin import revoke_identity
from .agents import AgentRegistry
from .app import App
from .backups import Backups
from .catalog import limits_of, template_for
from .db import update_row
from .enrollment import Enrollment
from .events import EventBus
from .guest_health import GuestHealthRecorder
from .hosts import HostClient, HostPool, place
from .instance_views import MEMCACHED_PORT, STOPPED, extra_services
from .mysql_ca import sign_instance_csr
from .san import SanVolumes
from .sealing import PasswordSealer

DATADIR = "/var/lib/mysql"
AGENT_CONNECT_TIMEOUT = 180
PREPARE_TIMEOUT = 900
# A clean mysqld shutdown flushes InnoDB; past this the step fails (and is retried).
STOP_TIMEOUT = 300
# How long a container's init (the agent) gets to end before it is killed, when mysqld was not stopped
# cleanly first. Once it was, nothing in the container holds data worth waiting for: it is killed at once
# (an agent as a container's PID 1 ignores lxc-stop's SIGPWR, and a connected one keeps its stream).
CONTAINER_STOP_SECONDS = 10
# Stored on a deleted instance's row only (deleted_at says so too); never shown, so not an InstanceStatus.
DELETED = "DELETED"
Row = TypeVar("Row", bound=models.Base)


def build_limits(limits: common_pb2.Limits) -> common_pb2.Limits:
    """A flavor's limits less its CPU cap and IO caps, for a container being built (Settings.build_boost)."""
    out = common_pb2.Limits()
    out.CopyFrom(limits)
    out.cpu_limit_millicores = out.io_iops = out.io_bytes_per_sec = 0
    return out


@dataclass(eq=False)
class InstanceTasks:
    app: App
    hosts: HostPool
    registry: AgentRegistry
    events: EventBus
    enrollment: Enrollment
    sealer: PasswordSealer
    guests: GuestHealthRecorder
    backups: Backups
    san: SanVolumes  # volumes of hosts with the iscsi driver: LUNs on SAN nodes

    def kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        return [
            tasks.TaskKind("create_instance", (
                S("schedule", self.step_schedule), S("create_volume", self.step_create_volume),
                S("create_container", self.step_create_container), S("start_container", self.step_start_container),
                S("wait_agent", self.step_wait_agent), S("prepare", self.step_prepare),
                S("restore", self.step_restore), S("activate", self.step_activate)),
                compensate=self.compensate_create, on_failed=self.failed),
            tasks.TaskKind("delete_instance", (
                S("final_backup", self.step_final_backup),
                S("delete_container", self.step_delete_container), S("delete_volume", self.step_delete_volume),
                S("revoke_certificate", self.step_revoke), S("mark_deleted", self.step_mark_deleted)),
                max_attempts=20),
            tasks.TaskKind("stop_instance", (
                S("stop_datastore", self.step_stop_datastore), S("stop_container", self.step_stop_container),
                S("mark_stopped", self.step_mark_stopped))),
            tasks.TaskKind("start_instance", (
                S("start_container", self.step_start_container), S("wait_agent", self.step_wait_agent),
                S("activate", self.step_activate)), compensate=self.step_stop_container),
            tasks.TaskKind("restart_instance", (S("restart", self.step_restart),)),
            tasks.TaskKind("resize_instance", (S("set_limits", self.step_set_limits),
                                               S("apply_limits", self.step_apply_limits))),
            tasks.TaskKind("resize_volume", (S("resize_volume", self.step_resize_volume),
                                             S("wait_agent", self.step_wait_running))),
        ]

    # -- rows --------------------------------------------------------------------------------------
    def _detached(self, model: type[Row], key: str, missing: str, field: str) -> Row:
        with self.app.sessions() as s:
            row = s.get(model, key)
            if row is None:
                raise NotFound(missing, field=field)
            s.expunge(row)
            return row

    def _row(self, iid: str) -> models.Instance:
        return self._detached(models.Instance, iid, f"instance {iid} vanished", "instance")

    def _update(self, iid: str, **values: Any) -> None:
        update_row(self.app.sessions, models.Instance, iid, **values)
        self.events.publish(iid)

    def _host(self, row: models.Instance) -> HostClient:
        if not row.host_id:
            raise NotFound(f"host {row.host_id!r} is not registered", field="host")
        return self.hosts.client(row.host_id)

    def _flavor(self, flavor_id: str) -> models.Flavor:
        return self._detached(models.Flavor, flavor_id, f"flavor {flavor_id} does not exist", "flavor")

    # -- create_instance -----------------------------------------------------------------------------
    async def step_schedule(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.host_id:
            return

        def pick() -> str:
            with self.app.sessions() as s, s.begin():
                f = s.get(models.Flavor, row.flavor_id)
                live = s.get(models.Instance, row.id)
                assert f is not None and live is not None
                live.host_id = place(s, f.memory_mb, row.volume_size_gb)
                return live.host_id
        host = await asyncio.to_thread(pick)
        await ctx.save(host_id=host)

    async def step_create_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        iscsi: bool = bool(row.host_id) and await asyncio.to_thread(self.san.host_uses_iscsi, row.host_id or "")
        if iscsi:
            await self.san.create(row.id)
            return
        vol = await self._host(row).CreateVolume(host_pb2.CreateVolumeRequest(
            volume=host_pb2.HostVolume(id=row.id, size_gb=row.volume_size_gb)))
        self._update(row.id, volume_driver=vol.driver)

    async def step_create_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        token = await asyncio.to_thread(self.enrollment.issue_token, row.id, int(ctx.params.get("token_generation", 0)))
        st = self.app.settings
        # An upgrade or patch names the template revision it moves onto; everything else (create, migration,
        # evacuation, an upgrade's roll-back) recreates the container from the revision the instance runs.
        revision = ctx.params.get("template_revision")
        revision = int(revision) if revision is not None else row.template_revision
        limits = limits_of(self._flavor(row.flavor_id))
        if st.build_boost and not ctx.params.get("build_boost"):
            await ctx.save(build_boost=True)  # before the container exists: activate must apply the caps
        if ctx.params.get("build_boost"):
            limits = build_limits(limits)
        c = await self._host(row).CreateContainer(host_pb2.CreateContainerRequest(
            container=host_pb2.Container(
                id=row.id, limits=limits, network_mode=host_pb2.NETWORK_MODE_UNSPECIFIED,
                volume_id=row.id, datadir=DATADIR, template=template_for(row.datastore, row.datastore_version, revision),
                bootstrap=host_pb2.AgentBootstrap(
                    server_address=st.agent_public_address, enroll_address=st.enroll_public_address,
                    ca_pem=self.app.ca.cert_pem.decode(), enrollment_token=token, instance_id=row.id,
                    heartbeat_seconds=st.heartbeat_seconds))))
        if extra_services(row) and c.network_mode != host_pb2.NETWORK_MODE_BRIDGE:
            # Host networking shares one port space between instances: 11211 would be the first one's.
            raise FailedPrecondition(f"instance.services: {', '.join(extra_services(row))} needs a host in bridge "
                                     f"network mode; host {row.host_id} placed this instance in host mode",
                                     field="instance.services")
        self._update(row.id, address=c.address, port=c.port)
        if c.package_versions:
            await asyncio.to_thread(self._record_package_versions, row, dict(c.package_versions))

    def _record_package_versions(self, row: models.Instance, versions: dict[str, str]) -> None:
        """The catalog shows each version's exact packages as the hosts report its template's."""
        with self.app.sessions() as s, s.begin():
            dv = s.scalar(select(models.DatastoreVersion).where(
                models.DatastoreVersion.datastore_id == row.datastore,
                models.DatastoreVersion.version == row.datastore_version))
            if dv is not None and dv.package_versions != versions:
                dv.package_versions = versions

    async def step_start_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        await self._host(row).StartContainer(host_pb2.ContainerRef(id=row.id))

    async def step_wait_agent(self, ctx: tasks.StepContext) -> None:
        await self.registry.wait_for_hello(ctx.resource_id, AGENT_CONNECT_TIMEOUT)

    async def step_prepare(self, ctx: tasks.StepContext) -> None:
        await self.prepare(ctx, accounts=True)

    async def prepare(self, ctx: tasks.StepContext, accounts: bool) -> None:
        """The agent's prepare. accounts=False prepares a datadir that holds the instance's data already (its
        volume moved to another host: a fresh container knows nothing of it): mysqld configured and started,
        its internal admin made again, while databases and users, which live in the datadir, are left as
        they are (their passwords were never kept, so they are not sent again)."""
        row = self._row(ctx.resource_id)
        params = row.create_params or {}
        with self.app.sessions() as s:
            version = s.scalar(select(models.DatastoreVersion).where(
                models.DatastoreVersion.datastore_id == row.datastore,
                models.DatastoreVersion.version == row.datastore_version))
            packages = list(version.packages) if version else []
        access = params.get("access", {})
        # mysqld's TLS: the guest makes the key and answers with a CSR (the same key on a replay), which the
        # tenant-facing MySQL CA signs for the address clients dial. An agent with no TLS answers "".
        tls = await self.registry.call(row.id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:mysql-tls", mysql_tls_request=agent_pb2.MysqlTlsRequest()), timeout=120)
        cert_pem = ca_pem = ""
        if tls.mysql_tls_csr.csr_pem:
            cert_pem, ca_pem = await asyncio.to_thread(sign_instance_csr, self.app, tls.mysql_tls_csr.csr_pem,
                                                       row.id, row.address or "127.0.0.1")
        spec = agent_pb2.Prepare(
            services=[agent_pb2.ServiceSpec(service=row.datastore, version=row.datastore_version,
                                            packages=packages, port=row.port),
                      *[agent_pb2.ServiceSpec(service=x, packages=[x], port=MEMCACHED_PORT)
                        for x in extra_services(row)]],
            limits=limits_of(self._flavor(row.flavor_id)), datadir=DATADIR, bind_address=row.address or "127.0.0.1",
            databases=[json_format.ParseDict(d, common_pb2.Database())
                       for d in (params.get("databases", []) if accounts else [])],
            users=[json_format.ParseDict({**u, "password": self.sealer.unseal(u["password"])}
                                         if u.get("password") else u, common_pb2.User())
                   for u in (params.get("users", []) if accounts else [])],
            allowed_cidrs=list(access.get("allowed_cidrs", [])),
            require_secure_transport=bool(access.get("require_secure_transport", False)),
            tls_cert_pem=cert_pem, tls_ca_pem=ca_pem,
            configuration=await asyncio.to_thread(configurations.values_for_prepare, self.app.sessions, row.id))

        async def progress(p: agent_pb2.Progress) -> None:
            await ctx.progress(min(95, 60 + p.percent // 3))
        await self.registry.call(row.id, agent_pb2.Command(command_id=f"{ctx.task_id}:prepare", prepare=spec),
                                 timeout=PREPARE_TIMEOUT, on_progress=progress)
        if not accounts:
            return
        # The users' passwords were needed exactly once; they are not kept.
        kept = {"databases": params.get("databases", []),
                "users": [{k: v for k, v in u.items() if k != "password"} for u in params.get("users", [])],
                **({"access": access} if access else {}),
                **({"services": params["services"]} if params.get("services") else {})}
        self._update(row.id, create_params=kept)

    async def step_restore(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.restored_from:
            await self.backups.restore_into(ctx, row.id, row.restored_from)

    async def step_activate(self, ctx: tasks.StepContext) -> None:
        # ACTIVE means "accepting connections now", proven by a fresh health report, not assumed.
        health = self.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:health", get_health=agent_pb2.GetHealth()), timeout=60)
        if ctx.params.get("build_boost"):
            # The flavor's caps, which the container was built without (Settings.build_boost), in place before
            # ACTIVE; set while the health report is on its way (both idempotent, so a replay does both again).
            row = self._row(ctx.resource_id)
            caps = self._host(row).SetLimits(host_pb2.SetLimitsRequest(
                id=row.id, limits=limits_of(self._flavor(row.flavor_id))))
            res, _ = await asyncio.gather(health, caps)
        else:
            res = await health
        if not res.health.accepting_connections:
            raise tasks.TransientError(f"mysqld is not accepting connections yet: {res.health.last_error}")
        await self.guests.on_health(ctx.resource_id, res.health)
        self._update(ctx.resource_id, status=InstanceStatus.ACTIVE)

    async def compensate_create(self, ctx: tasks.StepContext) -> None:
        """A create that cannot succeed gives back what it took: its certificate, container and volume."""
        await self.step_revoke(ctx)
        row = self._row(ctx.resource_id)
        if not row.host_id:
            return
        await self.step_delete_container(ctx)
        await self.step_delete_volume(ctx)

    async def failed(self, ctx: tasks.StepContext, fault: str, details: str) -> None:
        self._update(ctx.resource_id, status=InstanceStatus.ERROR, fault_message=fault, fault_details=details,
                     fault_at=utcnow())

    # -- delete_instance -----------------------------------------------------------------------------
    async def step_final_backup(self, ctx: tasks.StepContext) -> None:
        """The final backup (RDS's final snapshot), when the delete asked for one: its row was made with the
        task. Taken once: a backup cut off midway is not retried under the same id (its upload is write-once),
        so any failure fails the delete, which then has deleted nothing."""
        bid = ctx.params.get("backup_id")
        if not bid:
            return
        b = self._detached(models.Backup, bid, f"final backup {bid} vanished", "final_backup_name")
        if b.status == BackupStatus.COMPLETED:
            return  # taken before a restart of this step
        try:
            if b.status != BackupStatus.NEW:
                raise FailedPrecondition(f"it was cut off ({b.status}) and is not taken twice", field="backup")
            await self.backups.step_take(ctx)
        except (asyncio.CancelledError, tasks.LeaseLost):
            raise
        except Exception as exc:
            message = exc.message if isinstance(exc, RedDwarfError) else str(exc) or type(exc).__name__
            await self.backups.backup_failed(ctx, f"final backup failed: {message}", message)
            raise FailedPrecondition(f"the final backup {bid} failed, so nothing was deleted: {message}",
                                     field="final_backup_name") from exc

    async def step_delete_container(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.host_id:
            with contextlib.suppress(NotFound):  # already gone: a replayed step
                await self._host(row).DeleteContainer(host_pb2.ContainerRef(id=row.id))

    async def step_delete_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        if row.storage_host_id:
            await self.san.delete(row.id)
        elif row.host_id:
            with contextlib.suppress(NotFound):  # already gone: a replayed step
                await self._host(row).DeleteVolume(host_pb2.DeleteVolumeRequest(id=row.id))

    async def step_revoke(self, ctx: tasks.StepContext) -> None:
        iid = ctx.resource_id

        def revoke() -> None:
            with self.app.sessions() as s, s.begin():
                revoke_identity(self.app, s, f"spiffe://reddwarf/instance/{iid}", "instance deleted")
        await asyncio.to_thread(revoke)
        self.registry.disconnect(iid)

    async def step_mark_deleted(self, ctx: tasks.StepContext) -> None:
        self._update(ctx.resource_id, status=DELETED, deleted_at=utcnow())

    # -- stop_instance, start_instance ------------------------------------------------------------------
    async def step_stop_datastore(self, ctx: tasks.StepContext) -> None:
        """mysqld shut down cleanly by its agent; a guest not connected (gone silent) is left to the container's
        stop, after which InnoDB recovers at the next start."""
        if self.registry.is_connected(ctx.resource_id):
            await self.registry.call(ctx.resource_id, agent_pb2.Command(
                command_id=f"{ctx.task_id}:stop", stop=agent_pb2.StopDatastore()), timeout=STOP_TIMEOUT)
            await ctx.save(stopped_cleanly=True)

    async def step_stop_container(self, ctx: tasks.StepContext) -> None:
        """hostd stops the container and keeps it stopped (it revives only containers meant to run); the
        volume stays. Also the start's compensation: a start that failed leaves the instance stopped."""
        row = self._row(ctx.resource_id)
        grace = 0 if ctx.params.get("stopped_cleanly") else CONTAINER_STOP_SECONDS
        await self._host(row).StopContainer(host_pb2.StopContainerRequest(id=row.id, timeout_seconds=grace),
                                            timeout=CONTAINER_STOP_SECONDS + 120)
        self.registry.disconnect(row.id)  # its stream died with it; a start waits for a new hello

    async def step_mark_stopped(self, ctx: tasks.StepContext) -> None:
        # mysqld is down: its next start reads the configuration include, static values and all.
        await asyncio.to_thread(configurations.restarted, self.app.sessions, ctx.resource_id)
        self._update(ctx.resource_id, status=STOPPED)

    # -- restart_instance, resize_instance, resize_volume --------------------------------------------
    async def step_restart(self, ctx: tasks.StepContext) -> None:
        await self.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:restart", restart=agent_pb2.RestartDatastore()), timeout=300)
        # Static configuration values are in effect now: no longer RESTART_REQUIRED.
        await asyncio.to_thread(configurations.restarted, self.app.sessions, ctx.resource_id)

    async def step_set_limits(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        f = self._flavor(ctx.params["flavor"])
        await self._host(row).SetLimits(host_pb2.SetLimitsRequest(id=row.id, limits=limits_of(f)))

    async def step_apply_limits(self, ctx: tasks.StepContext) -> None:
        f = self._flavor(ctx.params["flavor"])
        await self.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:limits", apply_limits=agent_pb2.ApplyLimits(limits=limits_of(f))), timeout=300)
        self._update(ctx.resource_id, flavor_id=f.id)

    async def step_resize_volume(self, ctx: tasks.StepContext) -> None:
        row = self._row(ctx.resource_id)
        size = int(ctx.params["size_gb"])
        if row.storage_host_id:
            await self.san.resize(row.id, size)
        else:
            await self._host(row).ResizeVolume(host_pb2.ResizeVolumeHostRequest(id=row.id, size_gb=size),
                                               timeout=900)
        self._update(row.id, volume_size_gb=size)

    async def step_wait_running(self, ctx: tasks.StepContext) -> None:
        """After an offline volume grow the container restarted: wait for its agent again."""
        await self.registry.wait_for_hello(ctx.resource_id, AGENT_CONNECT_TIMEOUT)

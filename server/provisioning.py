"""Wires provisioning into the server: the event bus, the task engine with the instance and backup task
kinds, the agent registry, the backup store, and the Instances/Databases/Users/Root/Backups, AgentGateway
and Enrollment servicers with the background loops behind them (see main.wire)."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.descriptor import FileDescriptor

from reddwarf.common.clock import now as utcnow
from reddwarf.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    configuration_pb2,
    configuration_pb2_grpc,
    database_pb2,
    database_pb2_grpc,
    observe_pb2,
    observe_pb2_grpc,
)

from . import models, mysql_ca, tasks
from .agents import AgentGatewayServicer, AgentRegistry, EnrollmentServicer
from .app import App
from .auth import certificate_revoked, serial_hex
from .backup_store import BackupStore
from .backups import Backups, BackupSink, BackupsServicer, schedule_loop
from .cluster import ClusterLink, RevocationSync, WatchNotifier
from .configurations import ConfigurationsServicer
from .enrollment import Enrollment
from .events import EventBus
from .guest import DatabasesServicer, RootServicer, UsersServicer
from .guest_health import GuestHealthRecorder
from .guest_logs import LogsServicer
from .host_watch import HostWatch
from .hosts import HostPool
from .instance_tasks import InstanceTasks
from .instances import InstancesServicer
from .migration import Migrations
from .pagination import Paginator
from .san import SanVolumes
from .sealing import PasswordSealer

if TYPE_CHECKING:
    from .main import Wiring


def full_name(file: FileDescriptor, service: str) -> str:
    """A service's full name (`reddwarf.v1.Instances`), as reflection and health report it."""
    return file.services_by_name[service].full_name


def register(app: App, paginator: Paginator, hosts: HostPool, store: BackupStore, wiring: Wiring) -> None:
    st = app.settings
    secret = (Path(st.state_dir) / "secret").read_bytes()
    events = EventBus()
    sink = BackupSink(app, store)
    guests = GuestHealthRecorder(app.sessions, events)

    def is_revoked(serial: int) -> bool:
        return certificate_revoked(app.sessions, serial)
    link = None
    notifier: WatchNotifier | None = None
    if st.clustered:  # several servers over this state DB: streams recorded, commands relayed
        link = ClusterLink(app.sessions, st.name, st.agent_public_address, poll_seconds=st.cluster_poll_seconds,
                           member_expiry=st.cluster_member_expiry_seconds)
        link.start()
        notifier = WatchNotifier(app.sessions, events)
        wiring.background += [link.run, notifier.run, RevocationSync(app.sessions, app.ca).run]
    registry = AgentRegistry(on_health=guests.on_health, on_silent=guests.on_silent, is_revoked=is_revoked,
                             heartbeat_seconds=st.heartbeat_seconds, heartbeat_expiry=st.heartbeat_expiry_seconds,
                             heartbeat_max_bytes=st.heartbeat_max_bytes, heartbeat_flood_burst=st.heartbeat_flood_burst,
                             cluster=link)
    wiring.metrics.agents = registry  # live guest health and stream count, read at scrape time
    backups = Backups(app, store, registry, hosts)
    backups.clear_scratch()  # what a killed server left of a scratch restore
    store.clean_partials()   # and of uploads cut off with it
    sealer = PasswordSealer(secret)
    enrollment = Enrollment(app, secret)
    san = SanVolumes(app, hosts, sealer)
    instance_tasks = InstanceTasks(app, hosts, registry, events, enrollment, sealer, guests, backups, san)

    def on_change(task_id: str, resource: str) -> None:
        if resource.startswith("instances/"):
            events.publish(resource.split("/", 1)[1], "task")

    engine = tasks.TaskEngine(app.sessions, owner=st.name, workers=st.task_workers,
                              per_tenant=st.task_workers_per_tenant,
                              pools=[tasks.Pool("verify", st.verify_workers, st.verify_workers_per_tenant,
                                                ("verify_backup",))],
                              lease_seconds=st.task_lease_seconds, exit_after_step=st.test_exit_after_step,
                              on_change=on_change, on_end=wiring.metrics.task_ended)
    migrations = Migrations(instance_tasks)
    for kind in instance_tasks.kinds() + migrations.kinds() + migrations.evacuation_kinds() + backups.kinds():
        engine.register(kind)

    instances = InstancesServicer(app, engine, events, registry, sealer, paginator)
    if notifier is not None:
        # A change another server made: this server's cached view of the instance goes before its watchers
        # are poked, so they read the change rather than a view cached before it.
        notifier.on_change = lambda iid: instances.views.cache.invalidate([iid])
    db = database_pb2.DESCRIPTOR
    wiring.api += [
        (configuration_pb2_grpc.add_ConfigurationsServicer_to_server,
         ConfigurationsServicer(app, registry, events, paginator),
         full_name(configuration_pb2.DESCRIPTOR, "Configurations")),
        (database_pb2_grpc.add_InstancesServicer_to_server,
         instances, full_name(db, "Instances")),
        (database_pb2_grpc.add_DatabasesServicer_to_server, DatabasesServicer(app, registry),
         full_name(db, "Databases")),
        (database_pb2_grpc.add_UsersServicer_to_server, UsersServicer(app, registry), full_name(db, "Users")),
        (database_pb2_grpc.add_RootServicer_to_server, RootServicer(app, registry), full_name(db, "Root")),
        (database_pb2_grpc.add_BackupsServicer_to_server, BackupsServicer(app, backups, engine, paginator),
         full_name(db, "Backups")),
        (observe_pb2_grpc.add_LogsServicer_to_server, LogsServicer(app, registry, store),
         full_name(observe_pb2.DESCRIPTOR, "Logs")),
    ]
    def revoke_serial(serial: int, reason: str) -> None:
        with app.sessions() as s, s.begin():
            row = s.get(models.Certificate, serial_hex(serial))
            if row is not None and row.revoked_at is None:
                row.revoked_at, row.revoke_reason = utcnow(), reason[:255]
        app.ca.revoke(serial)
    wiring.agent.append((agent_pb2_grpc.add_AgentGatewayServicer_to_server,
                         AgentGatewayServicer(registry, sink, enrollment.sign_csr, revoke_serial), full_name(agent_pb2.DESCRIPTOR, "AgentGateway")))
    wiring.enroll.append((agent_pb2_grpc.add_EnrollmentServicer_to_server,
                          EnrollmentServicer(enrollment.verify_and_consume_token, enrollment.sign_csr),
                          full_name(agent_pb2.DESCRIPTOR, "Enrollment")))

    async def run_engine() -> None:
        await engine.start()
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await engine.stop()

    async def run_schedules() -> None:
        await schedule_loop(app, store, engine)

    async def renew_mysql_certificates() -> None:
        await mysql_ca.renew_loop(app, registry)

    wiring.background += [run_engine, registry.run, hosts.refresh_loop, run_schedules, renew_mysql_certificates]
    if st.san_reattach_seconds > 0:
        async def run_san_reattach() -> None:
            await san.reattach_loop(st.san_reattach_seconds)
        wiring.background.append(run_san_reattach)
    if st.host_check_seconds > 0:
        wiring.background.append(HostWatch(app, hosts, engine).run)
    wiring.on_stop.append(hosts.close)

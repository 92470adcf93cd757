"""Wires provisioning into the server: the agent registry, the hostd pool, the task engine with the
instance task kinds, the event bus, and the Instances/Databases/Users/Root, AgentGateway and Enrollment
servicers (see main.wire)."""
from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from reddwarf.v1 import agent_pb2_grpc, database_pb2, database_pb2_grpc

from . import tasks
from .agents import AgentGatewayServicer, AgentRegistry, EnrollmentServicer
from .app import App
from .backup_store import LocalStore
from .backups import Backups, BackupSink, BackupsServicer, schedule_loop
from .events import EventBus
from .guest import DatabasesServicer, RootServicer, UsersServicer
from .hosts import HostPool
from .instances import Instances, InstancesServicer
from .keys import TenantKeys, ensure_kek
from .pagination import Paginator


def register(app: App, paginator: Paginator, wiring: Any) -> None:
    st = app.settings
    app.events = EventBus()
    store = LocalStore(st.backup_dir, TenantKeys(app.sessions, ensure_kek(st.backup_kek_file, app.sessions)))
    app.backups = BackupSink(app, store)
    backups = Backups(app, store)
    backups.clear_scratch()  # what a killed server left of a scratch restore
    store.clean_partials()   # and of uploads cut off with it
    app.extras["backups"] = backups
    app.hosts = HostPool(app)
    instances = Instances(app, (Path(st.state_dir) / "secret").read_bytes())
    app.extras["instances"] = instances
    app.registry = AgentRegistry(on_health=instances.on_health, on_silent=instances.on_silent,
                                 is_revoked=instances.is_revoked, heartbeat_seconds=st.heartbeat_seconds,
                                 heartbeat_expiry=st.heartbeat_expiry_seconds)

    def on_change(task_id: str, resource: str) -> None:
        if resource.startswith("instances/"):
            app.events.publish(resource.split("/", 1)[1], "task")

    engine = tasks.TaskEngine(app.sessions, owner=st.name, workers=st.task_workers,
                              lease_seconds=st.task_lease_seconds, exit_after_step=st.test_exit_after_step,
                              on_change=on_change)
    for kind in instances.kinds() + backups.kinds():
        engine.register(kind)
    app.tasks = engine

    def svc(pb2: Any, name: str) -> str:
        return pb2.DESCRIPTOR.services_by_name[name].full_name

    wiring.api += [
        (database_pb2_grpc.add_InstancesServicer_to_server, InstancesServicer(app, instances, paginator),
         svc(database_pb2, "Instances")),
        (database_pb2_grpc.add_DatabasesServicer_to_server, DatabasesServicer(app, instances),
         svc(database_pb2, "Databases")),
        (database_pb2_grpc.add_UsersServicer_to_server, UsersServicer(app, instances), svc(database_pb2, "Users")),
        (database_pb2_grpc.add_RootServicer_to_server, RootServicer(app, instances), svc(database_pb2, "Root")),
        (database_pb2_grpc.add_BackupsServicer_to_server, BackupsServicer(app, backups, paginator),
         svc(database_pb2, "Backups")),
    ]
    wiring.agent.append((agent_pb2_grpc.add_AgentGatewayServicer_to_server,
                         AgentGatewayServicer(app.registry, app.backups), "reddwarf.v1.AgentGateway"))
    wiring.enroll.append((agent_pb2_grpc.add_EnrollmentServicer_to_server,
                          EnrollmentServicer(instances.verify_and_consume_token, instances.sign_csr),
                          "reddwarf.v1.Enrollment"))

    async def run_engine() -> None:
        await engine.start()
        try:
            await asyncio.Event().wait()
        finally:
            with contextlib.suppress(Exception):
                await engine.stop()

    async def run_schedules() -> None:
        await schedule_loop(app, store)

    wiring.background += [run_engine, app.registry.run, app.hosts.refresh_loop, run_schedules]
    wiring.on_stop.append(app.hosts.close)

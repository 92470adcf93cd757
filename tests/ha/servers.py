"""Two real control servers sharing one state DB (a real PostgreSQL) and one state directory (so one CA and
one set of client certificates), each on its own ports; either can be stopped and started again."""
from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from reddwarf.v1 import admin_pb2, admin_pb2_grpc
from tests.fixtures import postgres
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import RunningServer, launch, start_server, stop_process, wait_ready


@dataclass
class Pair:
    first: RunningServer
    env: dict[str, str]
    apis: list[str]
    tenant: str
    token: str
    # The processes now serving apis[i] (a restarted one replaces its entry).
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _ports: list[tuple[str, str]] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return ",".join(self.apis)

    def stop(self, i: int, sig: int = signal.SIGTERM) -> None:
        stop_process(self.procs[i], sig)

    def start(self, i: int) -> None:
        agent, enroll = self._ports[i]
        # A /metrics port of its own each time (the default one is fixed, and tests run side by side).
        env = {**self.env, "REDDWARF_METRICS_LISTEN": f"127.0.0.1:{free_port()}"}
        proc, log = launch(self.first.state_dir, self.apis[i], agent, enroll, env)
        self.procs[i] = proc
        wait_ready(self.apis[i], self.first.admin_files, proc, log)


@contextmanager
def two_servers(tmp_path: Path) -> Iterator[Pair]:
    """Two servers on a fresh database of a real PostgreSQL of their own."""
    if not postgres.available():
        raise RuntimeError("PostgreSQL 15 (Debian's postgresql package) is needed: make setup installs it")
    with postgres.postgres_server() as pg:
        name = f"ha_{uuid.uuid4().hex[:8]}"
        pg.create_database(name)
        with servers_on(tmp_path, pg.url(name)) as pair:
            yield pair


@contextmanager
def servers_on(tmp_path: Path, db_url: str) -> Iterator[Pair]:
    """Two servers on the state DB at db_url (any the server takes: a multi-host Galera URL too)."""
    env = {"REDDWARF_DB_URL": db_url}
    with start_server(tmp_path, extra_env=env) as first:
        api2 = f"127.0.0.1:{free_port()}"
        ports = [(first.agent, first.enroll), (f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}")]
        pair = Pair(first, env, [first.api, api2], "", "", [first.proc, first.proc], ports)
        try:
            pair.start(1)
            with first.channel(first.admin_files) as ch:
                admin = admin_pb2_grpc.AdminStub(ch)
                pair.tenant = f"t{uuid.uuid4().hex[:8]}"
                admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=pair.tenant)))
                pair.token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{pair.tenant}")).secret
            yield pair
        finally:
            for p in pair.procs:
                stop_process(p)

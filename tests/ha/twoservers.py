"""Two real control servers (s1, s2) on one shared state DB, one hostd, for the HA tests.

s1 is started by tests/fixtures/cluster.py (which registers the hostd and makes a tenant); s2 is a copy of
s1's state directory (the same CA, server secret and backup key-encryption key, as an operator would
install on a second machine) with its own name and ports. Guests are given both agent endpoints."""
from __future__ import annotations

import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from reddwarf.common import tls
from tests.fixtures.cluster import Cluster, start_cluster
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import launch, stop_process, wait_ready


@dataclass
class TwoServers:
    c: Cluster            # s1, the hostd, the tenant
    api2: str
    proc2: Any
    log2: Path
    pg: Any
    dbname: str

    def channel(self, which: int) -> grpc.Channel:
        return tls.sync_channel(self.c.server.api if which == 1 else self.api2, self.c.server.client_files)

    def holders(self) -> dict[str, str]:
        """instance id -> the server holding its agent stream (agent_streams)."""
        out = self.pg.psql("SELECT instance_id, server_name FROM agent_streams", self.dbname)
        return dict(line.split("|") for line in out.splitlines() if line)

    def kill_s1(self) -> None:
        self.kill(1)

    def kill(self, which: int) -> None:
        """kill -9 of that server's whole process group: no clean-up, no goodbye to its streams."""
        proc = self.c.server.proc if which == 1 else self.proc2
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


@contextmanager
def two_servers(tmp_path: Path, pg: Any, driver: str, extra_env: dict[str, str] | None = None
                ) -> Iterator[TwoServers]:
    dbname = f"rd_{uuid.uuid4().hex[:8]}"
    pg.create_database(dbname)
    a1, a2, e1, e2 = (f"127.0.0.1:{free_port()}" for _ in range(4))
    # Guests get every server's agent and enrollment endpoints: a guest made by s1 just before s1 dies
    # enrolls with s2.
    env = {"REDDWARF_DB_URL": pg.url(dbname), "REDDWARF_AGENT_LISTEN": a1, "REDDWARF_ENROLL_LISTEN": e1,
           "REDDWARF_AGENT_PUBLIC_ADDRESS": f"{a1},{a2}", "REDDWARF_ENROLL_PUBLIC_ADDRESS": f"{e1},{e2}",
           "REDDWARF_NAME": "s1", **(extra_env or {})}
    with start_cluster(tmp_path, server_env=env, driver=driver) as c:
        dir2 = tmp_path / "server2"
        shutil.copytree(c.server.state_dir, dir2, ignore=shutil.ignore_patterns("*.log", "backups", "scratch"))
        api2 = f"127.0.0.1:{free_port()}"
        proc2, log2 = launch(dir2, api2, a2, e2, {**env, "REDDWARF_NAME": "s2", "REDDWARF_AGENT_LISTEN": a2,
                                                      "REDDWARF_ENROLL_LISTEN": e2,
                                                      "REDDWARF_METRICS_LISTEN": f"127.0.0.1:{free_port()}"})
        try:
            wait_ready(api2, c.server.admin_files, proc2, log2)
            yield TwoServers(c, api2, proc2, log2, pg, dbname)
        finally:
            stop_process(proc2)

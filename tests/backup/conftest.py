"""Backup-test fixtures: MariaDB servers that the tests can stop and start (a restore needs both),
each in its own temporary datadir, killed and removed at teardown."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pymysql
import pytest

from reddwarf.agent.backup import BackupRunner, BackupSettings, MysqlAccess
from tests.fixtures.mariadb import free_port


class Mysqld:
    """A mariadbd on a tmp datadir; `stop`/`start` are what BackupRunner gets as its callables."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.datadir = os.path.join(base, "data")
        self.socket = os.path.join(base, "mysqld.sock")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(self.datadir)
        done = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}",
                               "--user=root", "--auth-root-authentication-method=normal", "--skip-test-db"],
                              capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError("mariadb-install-db failed: " + (done.stderr + done.stdout).decode()[-3000:])

    def start_sync(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             f"--port={self.port}", "--bind-address=127.0.0.1", "--user=root",
             f"--pid-file={self.base}/mysqld.pid", f"--log-error={self.base}/error.log",
             "--innodb-buffer-pool-size=64M", "--skip-log-bin"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        while True:
            try:
                pymysql.connect(unix_socket=self.socket, user="root", password="").close()
                return
            except pymysql.err.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("mariadbd did not start: " + self.error_log()[-2000:]) from None
                time.sleep(0.1)

    def stop_sync(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def start(self) -> None:
        import asyncio
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        import asyncio
        await asyncio.to_thread(self.stop_sync)

    def error_log(self) -> str:
        path = os.path.join(self.base, "error.log")
        return open(path).read() if os.path.exists(path) else ""

    def connect(self, **kw: object) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=self.socket, user="root", password="", autocommit=True,
                               **kw)  # type: ignore[arg-type]

    def runner(self, **settings: object) -> BackupRunner:
        access = MysqlAccess(socket=self.socket, user="root", password="", datadir=self.datadir)
        return BackupRunner(access, self.stop, self.start, BackupSettings(**settings))  # type: ignore[arg-type]


@pytest.fixture
def mysqld_factory() -> Iterator:
    made: list[Mysqld] = []
    bases: list[str] = []

    def make() -> Mysqld:
        base = tempfile.mkdtemp(prefix="reddwarf-test-backup-")
        bases.append(base)
        m = Mysqld(base)
        made.append(m)
        m.start_sync()
        return m

    try:
        yield make
    finally:
        for m in made:
            m.stop_sync()
        for b in bases:
            shutil.rmtree(b, ignore_errors=True)

"""Backup-test fixtures: MariaDB servers that the tests can stop and start (a restore needs both),
each in its own temporary datadir, killed and removed at teardown."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pymysql
import pytest

from reddwarf.agent.backup import BackupRunner, BackupSettings, MysqlAccess
from reddwarf.agent.verify import Scratch
from tests.fixtures.mariadb import free_port


class Mysqld(Scratch):
    """The agent's scratch mariadbd (reddwarf.agent.verify.Scratch) on a loopback port, with a pymysql
    connection and a BackupRunner bound to it."""

    def __init__(self, base: str) -> None:
        super().__init__(base, port=free_port())

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

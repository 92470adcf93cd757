"""mysqld's certificate from the tenant-facing MySQL CA is renewed before it expires: the server
(server/mysql_ca.py: renew_instance_tls) asks the guest for a CSR and its current certificate, signs a new
one once the current is in the last third of its life, and the guest installs it and has mysqld load it
with FLUSH SSL, without a restart. On a real mariadbd prepared by the real agent driver, reached through
the agent's real command table (the stream between them is left out: tests/provisioning covers it)."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import ssl
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pymysql
import pytest
from cryptography import x509

from reddwarf.agent.commands import CommandRunner
from reddwarf.agent.model import Prepare
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common.errors import InvalidArgument
from reddwarf.server import mysql_ca
from reddwarf.v1 import agent_pb2
from tests.fixtures.mariadb import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
              pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]


@pytest.fixture
async def driver(tmp_path: Any) -> AsyncIterator[MysqlDriver]:
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(tmp_path / "data"), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    try:
        yield d
    finally:
        await d.close()


def served_certificate(d: MysqlDriver, ca_pem: bytes) -> x509.Certificate:
    """The certificate mysqld presents to a new, verified TLS connection."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    with pymysql.connect(host="127.0.0.1", port=d._port, user="root", password="", ssl=ctx,
                         connect_timeout=5, unix_socket=None) as conn:
        der = conn._sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    return x509.load_der_x509_certificate(der)


async def no_progress(percent: int, message: str, done: int) -> None:
    return None


async def test_a_short_lived_mysqld_certificate_is_renewed_and_loaded_without_a_restart(
        driver: MysqlDriver, tmp_path: Any) -> None:
    d = driver
    app: Any = SimpleNamespace(settings=SimpleNamespace(pki_dir=str(tmp_path / "pki")))
    ca = mysql_ca.mysql_ca(app)
    csr = await d.mysql_tls_request()
    first = ca.sign_tls_server_csr(csr.csr_pem.encode(), "mysql/i1", (), ["127.0.0.1"], days=1)  # short-lived
    await d.prepare(Prepare(tls_cert_pem=first.cert_pem.decode(), tls_ca_pem=ca.cert_pem.decode()))
    with d.mysqld.connect_root() as c, c.cursor() as cur:  # root over TCP, for the test's TLS connections
        cur.execute("CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY ''")
        cur.execute("GRANT ALL ON *.* TO 'root'@'127.0.0.1'")
    before = served_certificate(d, ca.cert_pem)
    assert before.serial_number == x509.load_pem_x509_certificate(first.cert_pem).serial_number
    runner = CommandRunner(d)

    async def call(cmd: agent_pb2.Command) -> agent_pb2.CommandResult:
        return await runner.run(cmd, no_progress)

    session = d._admin_connect()  # a session open across the renewal: mysqld is not restarted
    try:
        with session.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
            uptime = int(cur.fetchone()[1])
        # A day-long certificate with a day left is not due: nothing is signed or installed.
        assert not await mysql_ca.renew_instance_tls(app, call, "i1", "127.0.0.1")
        assert served_certificate(d, ca.cert_pem).serial_number == before.serial_number
        # Twenty hours on, it is in its last third: renewed, on the same key, and served from the next
        # connection on.
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=20)
        assert await mysql_ca.renew_instance_tls(app, call, "i1", "127.0.0.1", now=later)
        after = served_certificate(d, ca.cert_pem)
        assert after.serial_number != before.serial_number
        assert after.public_key() == before.public_key()  # the guest's key never left it
        assert after.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=mysql_ca.CERT_DAYS - 1)
        with session.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Uptime'")
            assert int(cur.fetchone()[1]) >= uptime  # the same mysqld, and the old session still works
        # And a renewed certificate is not renewed again.
        assert not await mysql_ca.renew_instance_tls(app, call, "i1", "127.0.0.1")
    finally:
        session.close()


async def test_a_renewal_for_another_key_or_without_its_ca_is_refused_and_changes_nothing(
        driver: MysqlDriver, tmp_path: Any) -> None:
    d = driver
    app: Any = SimpleNamespace(settings=SimpleNamespace(pki_dir=str(tmp_path / "pki")))
    ca = mysql_ca.mysql_ca(app)
    csr = await d.mysql_tls_request()
    first = ca.sign_tls_server_csr(csr.csr_pem.encode(), "mysql/i2", (), ["127.0.0.1"], days=1)
    await d.prepare(Prepare(tls_cert_pem=first.cert_pem.decode(), tls_ca_pem=ca.cert_pem.decode()))
    cert_file = d.mysqld.tls_files.cert
    with open(cert_file) as f:
        installed = f.read()
    other = ca.issue("client", "x")  # a certificate for a key that is not the guest's
    with pytest.raises(InvalidArgument) as exc:
        await d.install_mysql_tls(other.cert_pem.decode(), ca.cert_pem.decode())
    assert exc.value.violations[0][0] == "tls_cert_pem"
    with pytest.raises(InvalidArgument) as exc:
        await d.install_mysql_tls(first.cert_pem.decode(), "")
    assert exc.value.violations[0][0] == "tls_ca_pem"
    with open(cert_file) as f:
        assert f.read() == installed

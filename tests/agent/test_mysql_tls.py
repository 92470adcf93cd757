"""Client TLS and access rules of a guest's mysqld, on a real MariaDB prepared by the real driver: the
guest makes its own key and CSR, the MySQL CA signs it for the address, my.cnf names the TLS files, the
transport rule and a tmpdir on the volume; a verified TLS connection succeeds, a plain one is refused under
require_secure_transport, and users exist only at hosts inside access.allowed_cidrs."""
from __future__ import annotations

import os
import shutil
import ssl
from collections.abc import AsyncIterator

import pymysql
import pytest
from cryptography import x509

from reddwarf.agent.model import Database, Prepare, User
from reddwarf.agent.mycnf import VOLUME_WORK_DIR, MyCnf, Tls, render_my_cnf
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import CertificateAuthority
from tests.fixtures.mariadb import free_port

needs_mariadb = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
                 pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]


def test_my_cnf_names_the_tls_files_the_transport_rule_and_a_tmpdir_on_the_volume() -> None:
    cnf = MyCnf(datadir="/var/lib/mysql", socket="/run/mysqld/mysqld.sock", pid_file="/run/mysqld/mysqld.pid",
                log_error="/run/mysqld/mysqld.err", port=3306, bind_address="10.0.3.5", buffer_pool_mb=128,
                max_connections=100, open_files_limit=65535, tmpdir="/var/lib/mysql/.reddwarf-tmp/mysqld",
                tls=Tls(cert="/etc/mysql/reddwarf-tls/server-cert.pem", key="/etc/mysql/reddwarf-tls/server-key.pem",
                        ca="/etc/mysql/reddwarf-tls/ca.pem"),
                require_secure_transport=True)
    text = render_my_cnf(cnf)
    mysqld = text.split("[client]")[0]
    for line in ("tmpdir = /var/lib/mysql/.reddwarf-tmp/mysqld", f"ignore-db-dirs = {VOLUME_WORK_DIR}",
                 "ssl_cert = /etc/mysql/reddwarf-tls/server-cert.pem",
                 "ssl_key = /etc/mysql/reddwarf-tls/server-key.pem", "ssl_ca = /etc/mysql/reddwarf-tls/ca.pem",
                 "require_secure_transport = ON"):
        assert line in mysqld.splitlines()
    plain = render_my_cnf(MyCnf(datadir="/d", socket="/s", pid_file="/p", log_error="/e", port=1,
                                bind_address="127.0.0.1", buffer_pool_mb=32, max_connections=20,
                                open_files_limit=1024))
    assert "ssl" not in plain and "require_secure_transport" not in plain and "tmpdir" not in plain


@pytest.fixture(scope="module")
def mysql_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("pki") / "mysql-ca", "Test MySQL CA")


@pytest.fixture
async def driver(tmp_path) -> AsyncIterator[MysqlDriver]:
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(tmp_path / "data"), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    try:
        yield d
    finally:
        await d.close()


def tls_context(ca_pem: bytes, check_hostname: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.check_hostname = check_hostname
    return ctx


def login(d: MysqlDriver, user: str, password: str, ctx: ssl.SSLContext | None) -> pymysql.connections.Connection:
    """Verified TLS with `ctx`; with None, plain (pymysql would otherwise try TLS unverified)."""
    if ctx is None:
        return pymysql.connect(host="127.0.0.1", port=d._port, user=user, password=password, connect_timeout=5,
                               ssl_disabled=True)
    return pymysql.connect(host="127.0.0.1", port=d._port, user=user, password=password, connect_timeout=5,
                           ssl=ctx)


@pytest.mark.slow
async def test_prepared_mysqld_serves_verified_tls_refuses_plain_and_keeps_users_inside_the_cidrs(
        driver: MysqlDriver, mysql_ca: CertificateAuthority, tmp_path) -> None:
    for mark in needs_mariadb:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    d = driver
    csr = await d.mysql_tls_request()
    again = await d.mysql_tls_request()  # a replayed request: the same key, never a second one
    assert x509.load_pem_x509_csr(csr.csr_pem.encode()).public_key() == \
        x509.load_pem_x509_csr(again.csr_pem.encode()).public_key()
    issued = mysql_ca.sign_tls_server_csr(csr.csr_pem.encode(), "mysql/test", (), ["127.0.0.1"])
    await d.prepare(Prepare(databases=(Database(name="shop"),),
                            users=(User(name="app", password="s3cret-pw", databases=("shop",)),),
                            allowed_cidrs=("127.0.0.0/8", "10.1.2.0/24"), require_secure_transport=True,
                            tls_cert_pem=issued.cert_pem.decode(), tls_ca_pem=mysql_ca.cert_pem.decode()))
    key_path = d.mysqld.tls_files.key
    assert os.stat(key_path).st_mode & 0o777 == 0o600

    # Verified TLS (CA and the address as the name) works; the session is encrypted.
    with login(d, "app", "s3cret-pw", tls_context(mysql_ca.cert_pem)) as conn, conn.cursor() as cur:
        cur.execute("SHOW STATUS LIKE 'Ssl_version'")
        row = cur.fetchone()
        assert row is not None and row[1].startswith("TLS")
        cur.execute("SHOW DATABASES")
        assert {r[0] for r in cur.fetchall()} == {"shop", "information_schema"}  # the volume's tmp is no schema
        cur.execute("SELECT @@tmpdir, @@require_secure_transport")
        tmpdir, rst = cur.fetchone()
        assert tmpdir.startswith(os.path.join(d.volume, VOLUME_WORK_DIR)) and rst == 1
    # Another CA's certificate is not trusted.
    other = CertificateAuthority.init(tmp_path / "other-ca", "Other")
    with pytest.raises(pymysql.err.OperationalError):
        login(d, "app", "s3cret-pw", tls_context(other.cert_pem))
    # A plain connection with the same password is refused (MariaDB 10.11 says "access denied", 1045).
    with pytest.raises(pymysql.err.OperationalError) as refused:
        login(d, "app", "s3cret-pw", None)
    assert refused.value.args[0] in (1045, 4151)

    # The user exists only at the allowed networks' host patterns.
    page = await d.list_users(100, "")
    assert sorted(u.host for u in page.users if u.name == "app") == ["10.1.2.0/255.255.255.0",
                                                                    "127.0.0.0/255.0.0.0"]
    # A resumed agent (restart) renders the same my.cnf.
    before = open(d.mysqld.my_cnf_path).read()
    d._write_my_cnf()
    assert open(d.mysqld.my_cnf_path).read() == before
    # A certificate for another key is refused.
    other_key = mysql_ca.issue("client", "x")
    with pytest.raises(InvalidArgument) as exc:
        d._install_tls(other_key.cert_pem.decode(), mysql_ca.cert_pem.decode())
    assert exc.value.violations[0][0] == "tls_cert_pem"


@pytest.mark.slow
async def test_require_secure_transport_without_a_certificate_is_refused(driver: MysqlDriver) -> None:
    with pytest.raises(InvalidArgument) as exc:
        await driver.prepare(Prepare(require_secure_transport=True))
    assert exc.value.violations[0][0] == "require_secure_transport"
    with pytest.raises(InvalidArgument) as exc:
        await driver.prepare(Prepare(allowed_cidrs=("10.0.0.0/33",)))
    assert exc.value.violations[0][0] == "allowed_cidrs[0]"


async def make_driver(base) -> MysqlDriver:
    d = MysqlDriver(MysqlSettings(state_dir=str(base / "state"), datadir=str(base / "data"), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    await d.prepare(Prepare(databases=(Database(name="shop"),)))
    return d


@pytest.mark.slow
async def test_backup_and_restore_work_on_the_volume_not_beside_it(tmp_path, monkeypatch) -> None:
    for mark in needs_mariadb:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    import tempfile

    from reddwarf.agent.model import BackupChunk, StoredBackup
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(*args, **kw):  # records where the backup runner puts its work
        path = real_mkdtemp(*args, **kw)
        made.append(path)
        return path
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    src, dst = await make_driver(tmp_path / "src"), await make_driver(tmp_path / "dst")
    stored: dict[str, bytes] = {}
    try:
        with src._admin_connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE shop.t (id INT PRIMARY KEY) ENGINE=InnoDB")
            cur.execute("INSERT INTO shop.t VALUES (1), (2), (3)")

        async def upload(chunks: AsyncIterator[BackupChunk]) -> StoredBackup:
            data, bid = b"", ""
            async for c in chunks:
                bid = c.backup_id or bid
                data += c.data
            stored[bid] = data
            import hashlib
            return StoredBackup(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

        async def download(backup_id: str) -> AsyncIterator[BackupChunk]:
            yield BackupChunk(data=stored[backup_id])

        async def progress(percent: int, message: str, done: int) -> None:
            return None
        res = await src.backups().backup("b1", "", upload, progress)
        await dst.backups().restore(["b1"], [res.sha256], download, progress)
        with dst._admin_connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM shop.t")
            assert cur.fetchone() == (3,)
            cur.execute("SHOW DATABASES")
            assert VOLUME_WORK_DIR not in {r[0] for r in cur.fetchall()}
        # Every work directory was on the volume (its work dir, beside the datadir), none is left.
        assert len(made) == 2
        for path, d in zip(made, (src, dst), strict=True):
            assert path.startswith(os.path.join(d.volume, VOLUME_WORK_DIR) + os.sep)
            assert not os.path.exists(path)
        # The restored mysqld still has its tmpdir on the volume.
        assert os.path.isdir(os.path.join(dst.volume, VOLUME_WORK_DIR, "mysqld"))
    finally:
        await src.close()
        await dst.close()

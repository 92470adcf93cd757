"""Two instances made from one template's datadir seed share nothing that is one server's own: each takes the
seed over instead of running mariadb-install-db, and has its own server_id, internal admin password, root password
and TLS key (the Aria control file's uuid is the one value they share: see common/datadir_seed.py); the copied
system tables are whole. A prepare whose configuration shapes the system tables makes its own datadir."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pymysql
import pytest

from reddwarf.agent.model import Database, Prepare, User
from reddwarf.agent.mycnf import server_id_for
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common import datadir_seed
from reddwarf.hostd import template, volume_seed
from reddwarf.hostd.settings import Settings
from tests.fixtures.mariadb import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the seed is made in a chroot of the template"),
              pytest.mark.skipif(not shutil.which("mariadbd"), reason="MariaDB server package missing")]


@pytest.fixture(scope="module")
def seed() -> str:
    settings = Settings(host_id="seed-test")
    made = volume_seed.seed_for(settings, template.build_template(settings))
    assert made is not None
    return made


def seeded_volume(base: Path, seed: str) -> Path:
    vol = base / "vol"
    (vol / "lost+found").mkdir(parents=True)
    assert volume_seed.seed_volume(seed, str(vol))  # what hostd does for a fresh volume
    return vol


def make_driver(base: Path, vol: Path, instance_id: str) -> MysqlDriver:
    return MysqlDriver(MysqlSettings(state_dir=str(base / "state"), datadir=str(vol), run_as="root",
                                     port=free_port(), bind_address="127.0.0.1",
                                     server_id=server_id_for(instance_id), install_db="/bin/false"))


def query(d: MysqlDriver, sql: str) -> list[tuple[object, ...]]:
    with d._admin_connect() as conn, conn.cursor() as cur:
        cur.execute(sql)
        return list(cur.fetchall())


async def test_two_instances_from_one_seed_share_no_identity(tmp_path: Path, seed: str,
                                                           drivers: list[MysqlDriver]) -> None:
    made: list[MysqlDriver] = []
    for i in range(2):
        base = tmp_path / f"i{i}"
        vol = seeded_volume(base, seed)
        # install_db is /bin/false: a prepare that ran mariadb-install-db instead of taking the seed fails.
        d = make_driver(base, vol, f"instance-{i}")
        drivers.append(d)
        await d.prepare(Prepare(datadir=str(vol), databases=(Database(name="app"),),
                                users=(User(name="app", password="app-pw-123456", databases=("app",)),)))
        assert not (vol / datadir_seed.VOLUME_SEED_DIR).exists()  # taken over: renamed into place
        assert query(d, "SELECT COUNT(*) FROM mysql.global_priv WHERE User = 'app'") == [(1,)]
        tls = await d.mysql_tls_request()
        assert "CERTIFICATE REQUEST" in tls.csr_pem
        made.append(d)
    a, b = made
    ids = [query(d, "SELECT @@server_id")[0][0] for d in made]
    assert ids == [server_id_for("instance-0"), server_id_for("instance-1")] and ids[0] != ids[1]
    # Every system table install-db wrote is whole: mysql.proc (read by DROP DATABASE) and the rest.
    for d in made:
        with d._admin_connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE scratch")
            cur.execute("DROP DATABASE scratch")
            cur.execute("SELECT COUNT(*) FROM mysql.proc")
            assert cur.fetchone()[0] > 0  # the sys schema's routines
            cur.execute("CHECK TABLE mysql.proc, mysql.global_priv, mysql.db, mysql.help_topic")
            assert {r[3] for r in cur.fetchall()} == {"OK"}
    assert a.admin_password() != b.admin_password()
    with open(a.mysqld.tls_files.key, "rb") as fa, open(b.mysqld.tls_files.key, "rb") as fb:
        assert fa.read() != fb.read()
    # root has no password to share: unix_socket only, until the root API gives each its own.
    for d in made:
        assert query(d, "SELECT JSON_VALUE(Priv, '$.authentication_string') FROM mysql.global_priv "
                        "WHERE User = 'root' AND Host = 'localhost'") == [("invalid",)]
    pw_a, pw_b = (await a.enable_root()).password, (await b.enable_root()).password
    assert pw_a != pw_b
    hashes = [query(d, "SELECT JSON_VALUE(Priv, '$.authentication_string') FROM mysql.global_priv "
                       "WHERE User = 'root' AND Host = '%'")[0][0] for d in made]
    assert hashes[0] != hashes[1]
    # Each root password opens its own instance only.
    port_a = a.settings.port
    pymysql.connect(host="127.0.0.1", port=port_a, user="root", password=pw_a, ssl_disabled=True).close()
    with pytest.raises(pymysql.err.OperationalError):
        pymysql.connect(host="127.0.0.1", port=port_a, user="root", password=pw_b, ssl_disabled=True).close()


async def test_a_configuration_that_shapes_the_system_tables_makes_its_own_datadir(
        tmp_path: Path, seed: str, drivers: list[MysqlDriver]) -> None:
    vol = seeded_volume(tmp_path, seed)
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(vol), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    drivers.append(d)
    await d.prepare(Prepare(datadir=str(vol), configuration={"character_set_server": "latin1",
                                                             "collation_server": "latin1_swedish_ci"}))
    assert not (vol / datadir_seed.VOLUME_SEED_DIR).exists()
    # mariadb-install-db ran with the group's character set: the system schema's default is latin1.
    assert query(d, "SELECT DEFAULT_CHARACTER_SET_NAME FROM information_schema.SCHEMATA "
                    "WHERE SCHEMA_NAME = 'mysql'") == [("latin1",)]


async def test_an_incomplete_seed_is_ignored_and_removed(tmp_path: Path, seed: str,
                                                        drivers: list[MysqlDriver]) -> None:
    vol = seeded_volume(tmp_path, seed)
    os.unlink(vol / datadir_seed.VOLUME_SEED_DIR / datadir_seed.SEED_MANIFEST)  # a copy cut off before its end
    d = MysqlDriver(MysqlSettings(state_dir=str(tmp_path / "state"), datadir=str(vol), run_as="root",
                                  port=free_port(), bind_address="127.0.0.1"))
    drivers.append(d)
    await d.prepare(Prepare(datadir=str(vol)))
    assert not (vol / datadir_seed.VOLUME_SEED_DIR).exists()
    assert query(d, "SELECT 1") == [(1,)]

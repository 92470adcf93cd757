"""mysqld's datadir is a directory on the data volume, not its root: ext4's lost+found (and the agent's
work directory) are never schemas. A volume an older agent initialised at its root keeps working there,
through a restarted agent and a replayed prepare, with its data and without a second datadir beside it."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reddwarf.agent import mysql as mysql_driver
from reddwarf.agent.model import Database, Prepare
from reddwarf.agent.mycnf import VOLUME_WORK_DIR
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.agent.mysqld import DATADIR_ON_VOLUME, INIT_MARKER, datadir_on_volume
from tests.fixtures.mariadb import free_port

needs_mariadb = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
                 pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing")]


def new_volume(base: Path) -> Path:
    """A fresh volume as mkfs.ext4 leaves it: only lost+found at the root."""
    (base / "vol" / "lost+found").mkdir(parents=True)
    return base / "vol"


def make_driver(base: Path, volume: Path) -> MysqlDriver:
    return MysqlDriver(MysqlSettings(state_dir=str(base / "state"), datadir=str(volume), run_as="root",
                                     port=free_port(), bind_address="127.0.0.1"))


def schemas(d: MysqlDriver) -> set[str]:
    """Every schema mysqld sees (SHOW DATABASES as the internal admin: no listing filter in the way)."""
    with d._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SHOW DATABASES")
        return {r[0] for r in cur.fetchall()}


def test_layout_is_a_subdirectory_unless_the_volume_root_holds_an_older_datadir(tmp_path: Path) -> None:
    vol = new_volume(tmp_path)
    assert datadir_on_volume(str(vol)) == str(vol / DATADIR_ON_VOLUME)
    (vol / "mysql").mkdir()  # an older agent's system schema at the root
    assert datadir_on_volume(str(vol)) == str(vol)
    # A tenant's database named "data" in that older datadir is not mistaken for the new layout.
    (vol / "data").mkdir()
    assert datadir_on_volume(str(vol)) == str(vol)
    # An older agent's initialisation cut off before the system schema existed: cleared at the root later.
    other = new_volume(tmp_path / "cut")
    (other / INIT_MARKER).touch()
    assert datadir_on_volume(str(other)) == str(other)
    # Once the subdirectory holds a system schema, it is the datadir whatever else the root holds.
    third = new_volume(tmp_path / "new")
    (third / DATADIR_ON_VOLUME / "mysql").mkdir(parents=True)
    (third / "mysql").mkdir()
    assert datadir_on_volume(str(third)) == str(third / DATADIR_ON_VOLUME)


@pytest.mark.slow
async def test_a_new_volume_gets_its_datadir_in_a_subdirectory_and_lost_found_is_no_schema(
        tmp_path: Path, drivers: list[MysqlDriver]) -> None:
    for mark in needs_mariadb:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    vol = new_volume(tmp_path)
    d = make_driver(tmp_path, vol)
    drivers.append(d)
    await d.prepare(Prepare(databases=(Database(name="shop"),), datadir=str(vol)))
    assert d.datadir == str(vol / DATADIR_ON_VOLUME)
    assert (vol / DATADIR_ON_VOLUME / "mysql").is_dir() and not (vol / "mysql").exists()
    assert sorted(os.listdir(vol)) == sorted([DATADIR_ON_VOLUME, "lost+found", VOLUME_WORK_DIR])
    # mysqld itself sees no lost+found and no work directory, so my.cnf needs no ignore-db-dirs.
    assert schemas(d) == {"shop", "information_schema", "mysql", "performance_schema", "sys"}
    cnf = Path(d.mysqld.my_cnf_path).read_text()
    assert f"datadir = {vol / DATADIR_ON_VOLUME}" in cnf.splitlines() and "ignore-db-dirs" not in cnf
    with d._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@datadir, @@tmpdir")
        datadir, tmpdir = cur.fetchone()
    assert datadir.rstrip("/") == str(vol / DATADIR_ON_VOLUME) and tmpdir.startswith(str(vol / VOLUME_WORK_DIR))
    assert [x.name for x in (await d.list_databases(100, "")).databases] == ["shop"]
    h = await d.health()
    assert h.datadir_bytes_total > 0


@pytest.mark.slow
async def test_an_older_instance_with_its_datadir_at_the_volume_root_keeps_it_there(
        tmp_path: Path, drivers: list[MysqlDriver], monkeypatch: pytest.MonkeyPatch) -> None:
    for mark in needs_mariadb:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    vol = new_volume(tmp_path)
    # What an older agent made: the datadir is the volume's root (its prepared.json records the volume).
    with monkeypatch.context() as m:
        m.setattr(mysql_driver, "datadir_on_volume", lambda volume: volume)
        old = make_driver(tmp_path, vol)
        drivers.append(old)
        await old.prepare(Prepare(databases=(Database(name="shop"), Database(name="data")), datadir=str(vol)))
        assert (vol / "mysql").is_dir() and (vol / "data").is_dir()  # "data": a tenant's database
        with old._admin_connect() as conn, conn.cursor() as cur:
            cur.execute("CREATE TABLE shop.t (id INT PRIMARY KEY) ENGINE=InnoDB")
            cur.execute("INSERT INTO shop.t VALUES (1), (2)")
        await old.close()
    # The upgraded agent starts (resume after a container restart) on the same volume and state.
    new = make_driver(tmp_path, vol)
    drivers.append(new)
    await new.resume()
    assert new.datadir == str(vol)
    with new._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM shop.t")
        assert cur.fetchone() == (2,)
    # mysqld sees lost+found there as "#mysql50#lost+found"; the tenant's listing never shows it.
    assert "#mysql50#lost+found" in schemas(new)
    assert [x.name for x in (await new.list_databases(100, "")).databases] == ["data", "shop"]
    assert not (vol / "data" / "mysql").exists()  # no second datadir was made inside the tenant's "data"
    # A replayed prepare converges on the same datadir.
    await new.prepare(Prepare(databases=(Database(name="shop"),), datadir=str(vol)))
    assert new.datadir == str(vol) and not (vol / "data" / "mysql").exists()
    # A backup of the older layout restores into a new volume's subdirectory datadir.
    progress_calls: list[int] = []

    async def progress(percent: int, message: str, done: int) -> None:
        progress_calls.append(percent)
    stored: dict[str, bytes] = {}

    async def upload(chunks):  # type: ignore[no-untyped-def]
        import hashlib

        from reddwarf.agent.model import StoredBackup
        data = b""
        async for c in chunks:
            data += c.data
        stored["b"] = data
        return StoredBackup(size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    async def download(backup_id: str):  # type: ignore[no-untyped-def]
        from reddwarf.agent.model import BackupChunk
        yield BackupChunk(data=stored[backup_id])
    res = await new.backups().backup("b", "", upload, progress)
    vol2 = new_volume(tmp_path / "second")
    target = make_driver(tmp_path / "second", vol2)
    drivers.append(target)
    await target.prepare(Prepare(datadir=str(vol2)))
    await target.backups().restore(["b"], [res.sha256], download, progress)
    assert target.datadir == str(vol2 / DATADIR_ON_VOLUME)
    with target._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT COUNT(*) FROM shop.t")
        assert cur.fetchone() == (2,)
    assert [x.name for x in (await target.list_databases(100, "")).databases] == ["data", "shop"]

"""A template's datadir seed: made once by the template's own mariadb-install-db (nothing of one server's own
in it), reused while the template is the same, made again when the template changes, and copied onto a fresh
volume only (sparsely), never onto one holding data."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from reddwarf.common import datadir_seed
from reddwarf.hostd import template, volume_seed
from reddwarf.hostd.settings import Settings

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chroot into the template, mount namespaces")]


@pytest.fixture(scope="module")
def built() -> tuple[Settings, str]:
    settings = Settings(host_id="seed-test")
    return settings, template.build_template(settings)  # cached by recipe hash: built once per machine


@pytest.fixture
def own_template(tmp_path: Path, built: tuple[Settings, str]) -> tuple[Settings, str]:
    """A template directory of this test's own (its rootfs the real template's, by a symlink; its recipe
    record a copy), so that changing it touches nobody else's template or seed."""
    settings, name = built
    real = Path(settings.template_lxc_path) / name
    tdir = tmp_path / "templates" / name
    tdir.mkdir(parents=True)
    (tdir / "rootfs").symlink_to(real / "rootfs")
    shutil.copy(real / template.READY_MARKER, tdir / template.READY_MARKER)
    return Settings(host_id="seed-test", template_lxc_path=str(tmp_path / "templates")), name


def test_the_seed_holds_system_tables_and_nothing_of_one_server_and_is_made_once(
        own_template: tuple[Settings, str]) -> None:
    settings, name = own_template
    seed = volume_seed.seed_for(settings, name)
    assert seed is not None
    manifest = datadir_seed.read_manifest(seed)
    assert manifest is not None and manifest["stamp"] == volume_seed.stamp(settings, name)
    data = Path(seed) / datadir_seed.SEED_DATA
    assert (data / "mysql" / "global_priv.MAI").exists() and (data / "ibdata1").exists()
    # The buffer pool dump, pid, log and TLS files: none.
    assert datadir_seed.identity_files(str(data)) == []
    assert not (data / "ib_buffer_pool").exists()
    # The Aria control file and log stay: the system tables install-db wrote need them (common/datadir_seed.py).
    assert (data / "aria_log_control").exists()
    made = os.stat(Path(seed) / datadir_seed.SEED_MANIFEST).st_mtime_ns
    assert volume_seed.seed_for(settings, name) == seed
    assert os.stat(Path(seed) / datadir_seed.SEED_MANIFEST).st_mtime_ns == made  # reused, not made again


def test_a_changed_template_gets_a_new_seed(own_template: tuple[Settings, str]) -> None:
    settings, name = own_template
    seed = volume_seed.seed_for(settings, name)
    assert seed is not None
    before = datadir_seed.read_manifest(seed)
    assert before is not None
    (Path(seed) / "left-from-the-old-template").touch()
    # The template rebuilt in place with other packages: its recipe record differs.
    marker = Path(settings.template_lxc_path) / name / template.READY_MARKER
    doc = json.loads(marker.read_text())
    doc["package_versions"] = {**doc.get("package_versions", {}), "mariadb-server": "1:99.0-test"}
    marker.write_text(json.dumps(doc))
    again = volume_seed.seed_for(settings, name)
    assert again == seed
    after = datadir_seed.read_manifest(seed)
    assert after is not None and after["stamp"] != before["stamp"]
    assert after["stamp"] == volume_seed.stamp(settings, name)
    assert not (Path(seed) / "left-from-the-old-template").exists()


def test_a_template_without_mariadbd_gives_no_seed(tmp_path: Path) -> None:
    settings = Settings(host_id="seed-test", template_lxc_path=str(tmp_path))
    (tmp_path / "bare" / "rootfs" / "usr" / "sbin").mkdir(parents=True)
    (tmp_path / "bare" / template.READY_MARKER).write_text("{}")
    assert volume_seed.seed_for(settings, "bare") is None


def test_only_a_fresh_volume_is_seeded_sparsely_and_a_cut_off_copy_is_redone(
        tmp_path: Path, built: tuple[Settings, str]) -> None:
    settings, name = built
    seed = volume_seed.seed_for(settings, name)
    assert seed is not None
    vol = tmp_path / "vol"
    (vol / "lost+found").mkdir(parents=True)
    (vol / (datadir_seed.VOLUME_SEED_DIR + ".tmp")).mkdir()  # a copy cut off by a killed hostd
    (vol / (datadir_seed.VOLUME_SEED_DIR + ".tmp") / "junk").touch()
    assert volume_seed.seed_volume(seed, str(vol), base=template.IDMAP_BASE)
    copied = vol / datadir_seed.VOLUME_SEED_DIR
    assert datadir_seed.read_manifest(str(copied)) is not None
    assert sorted(os.listdir(vol)) == [datadir_seed.VOLUME_SEED_DIR, "lost+found"]
    redo = copied / datadir_seed.SEED_DATA / "ib_logfile0"
    # The redo log is ~100 MB of mostly zeros: the copy holds its data, not its zeros.
    assert redo.stat().st_size >= 8 << 20 and redo.stat().st_blocks * 512 < redo.stat().st_size // 4
    # Given to the container's mapped ids: the template's mysql user inside, its root for the manifest.
    assert (copied / datadir_seed.SEED_MANIFEST).stat().st_uid == template.IDMAP_BASE
    assert (copied / datadir_seed.SEED_DATA / "ibdata1").stat().st_uid > template.IDMAP_BASE
    # A second call (a replayed create) keeps what is there.
    assert volume_seed.seed_volume(seed, str(vol))
    # A volume holding anything else (a moved or upgraded instance's datadir) is never touched.
    used = tmp_path / "used"
    (used / "data" / "mysql").mkdir(parents=True)
    assert not volume_seed.seed_volume(seed, str(used))
    assert sorted(os.listdir(used)) == ["data"]

"""Id ranges of their own for containers (hostd/idmap.py): handed out once per container, taken back from
a container that is gone, and files moved from one range to another keep their place in the range."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from reddwarf.hostd import idmap, template
from reddwarf.hostd.containers import Bootstrap, ContainerSpec, Limits, NetworkPlan
from reddwarf.hostd.lxc import LxcDriver
from reddwarf.hostd.settings import Settings


def owner(tmp_path: Path, name: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "config").write_text("")
    return str(d)


def test_each_container_gets_a_range_of_its_own_and_keeps_it(tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    a, b = owner(tmp_path, "a"), owner(tmp_path, "b")
    ba, bb = idmap.allocate(a, reg), idmap.allocate(b, reg)
    assert ba != bb and idmap.is_isolated(ba) and idmap.is_isolated(bb)
    assert abs(ba - bb) >= idmap.RANGE
    assert idmap.allocate(a, reg) == ba  # asked again (a restarted hostd): the same range
    idmap.release(a, reg)
    c = owner(tmp_path, "c")
    assert idmap.allocate(c, reg) == ba  # a released range is handed out again


def test_a_range_whose_container_is_gone_is_taken_again(tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    gone = owner(tmp_path, "gone")
    base = idmap.allocate(gone, reg)
    os.unlink(os.path.join(gone, "config"))  # deleted behind hostd's back (a crash mid-delete)
    assert idmap.allocate(owner(tmp_path, "new"), reg) == base


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: chown")
def test_a_volume_moved_between_ranges_keeps_each_owner_relative(tmp_path: Path) -> None:
    first, second = idmap.ISOLATED_BASE, idmap.ISOLATED_BASE + 7 * idmap.RANGE
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "f").write_text("x")
    os.chown(tmp_path / "v", first, first)
    os.chown(tmp_path / "v" / "f", first + 999, first + 999)  # mysql in the first range
    host_user = tmp_path / "v" / "host"
    host_user.write_text("y")
    os.chown(host_user, 1_500_000_000, 0)  # nobody's range: its uid is left alone
    template.shift_tree(str(tmp_path / "v"), second)
    assert os.stat(tmp_path / "v").st_uid == second
    assert (os.stat(tmp_path / "v" / "f").st_uid, os.stat(tmp_path / "v" / "f").st_gid) == (second + 999,) * 2
    assert (os.stat(host_user).st_uid, os.stat(host_user).st_gid) == (1_500_000_000, second)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: id-mapped mounts")
def test_an_id_mapped_mount_shows_the_range_and_is_read_only(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("x")
    base = idmap.ISOLATED_BASE + 3 * idmap.RANGE
    idmap.mount_idmapped(str(src), str(dst), base)
    try:
        assert idmap.is_mounted(str(dst))
        idmap.mount_idmapped(str(src), str(dst), base)  # again: a no-op, not a second mount
        with open("/proc/self/mountinfo") as f:
            assert sum(1 for ln in f if ln.split()[4] == str(dst)) == 1
        assert os.stat(dst / "f").st_uid == base and os.stat(src / "f").st_uid == 0
        with pytest.raises(OSError):
            (dst / "g").write_text("y")
    finally:
        idmap.unmount(str(dst))
    assert not idmap.is_mounted(str(dst)) and not dst.exists()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: LXC")
def test_after_a_reboot_the_id_mapped_lower_layer_is_mounted_again_and_delete_leaves_nothing() -> None:
    """A host reboot drops the id-mapped mount: the next start makes it again, the container keeps its range;
    a delete unmounts it and gives the range back."""
    work = tempfile.mkdtemp(prefix="reddwarf-test-idmap-", dir="/var/tmp")
    settings = Settings(host_id="idmap-test", state_dir=os.path.join(work, "state"),
                        lxc_path=os.path.join(work, "lxc"), container_prefix="rdtid-",
                        agent_init_cmd="/bin/sleep 3600", rootfs_quota_mb=0)
    driver = LxcDriver(settings)
    tpl = template.build_template(settings)
    cid = "reboot"
    spec = ContainerSpec(id=cid, limits=Limits(memory_mb=128, cpu_shares=512, max_processes=64).validate(),
                         bootstrap=Bootstrap("127.0.0.1:1", "", "unused", cid),
                         network=NetworkPlan("host", "127.0.0.1", 0), template=tpl)
    lower = os.path.join(settings.lxc_path, ".lower", driver.container_name(cid))
    try:
        driver.create(spec)
        base = driver._idmap_base(cid)
        assert idmap.is_isolated(base) and idmap.is_mounted(lower)
        assert driver.start(cid).state == "RUNNING"
        driver.stop(cid, 0)
        idmap.unmount(lower)  # what a reboot leaves: the mount gone
        st = driver.start(cid)
        assert st.state == "RUNNING" and idmap.is_mounted(lower)
        with open(f"/proc/{st.init_pid}/uid_map") as f:
            assert f.read().split()[:3] == ["0", str(base), "65536"]
        driver.destroy(cid)
        assert not idmap.is_mounted(lower) and not os.path.exists(lower)
        with open(os.path.join(idmap.REGISTRY, ".lock"), "a"):
            held = [e for e in os.listdir(idmap.REGISTRY) if e.isdigit()
                    and open(os.path.join(idmap.REGISTRY, e)).read().strip() == driver._dir(cid)]
        assert held == [], "the range is given back"
    finally:
        driver.destroy(cid)
        shutil.rmtree(work, ignore_errors=True)

"""hostd's fake drivers (reddwarf.hostd.fake) on their own, with a stand-in init: what makes them behave like
the real ones where hostd relies on it (their whole flows run in tests/functional)."""
from __future__ import annotations

import json
import os
import time

import pytest

from reddwarf.common.errors import FailedPrecondition, NotFound
from reddwarf.hostd.containers import Bootstrap, ContainerSpec, Limits, NetworkPlan, VolumeMount
from reddwarf.hostd.fake import FakeContainerDriver, FakeVolumeDriver, stop_all
from reddwarf.hostd.settings import Settings

LIMITS = Limits(memory_mb=256, cpu_shares=512, max_processes=256)


@pytest.fixture
def settings(tmp_path):
    s = Settings(host_id="t", state_dir=str(tmp_path / "state"), lxc_path=str(tmp_path / "lxc"),
                 storage_path=str(tmp_path / "vols"), container_prefix="rdf-", agent_init_cmd="sleep 60")
    yield s
    stop_all(s.lxc_path, s.container_prefix)


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie its parent has not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except OSError:
        return True


def spec(cid: str, mount: VolumeMount | None = None) -> ContainerSpec:
    return ContainerSpec(id=cid, limits=LIMITS, template="fake", mount=mount,
                         bootstrap=Bootstrap("127.0.0.1:1", "CA PEM", "one-time-token", cid),
                         network=NetworkPlan("host", "127.0.0.1", 33061))


def test_a_container_runs_its_init_as_a_process_and_outlives_its_hostd(settings):
    d = FakeContainerDriver(settings)
    d.create(spec("c1"))
    assert d.status("c1").state == "STOPPED" and d.list_names() == ["c1"]
    pid = d.start("c1").init_pid
    assert pid > 0 and d.start("c1").init_pid == pid  # idempotent
    # a new hostd (a new driver over the same paths) finds it running and can stop it
    again = FakeContainerDriver(settings)
    assert again.status("c1").init_pid == pid
    assert again.stop("c1", 5).state == "STOPPED"
    assert gone(pid)
    d.destroy("c1")
    assert d.status("c1").state == "ABSENT" and d.list_names() == []


def test_a_dead_init_stops_the_container(settings):
    d = FakeContainerDriver(settings)
    d.create(spec("c2"))
    pid = d.start("c2").init_pid
    os.kill(pid, 9)
    deadline = time.monotonic() + 10
    while d.status("c2").state != "STOPPED" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert d.status("c2").state == "STOPPED" and gone(pid)


def test_the_agent_gets_the_firstboot_values_with_host_paths(settings):
    d = FakeContainerDriver(settings)
    d.create(spec("c3", VolumeMount("/srv/vol", "/var/lib/mysql")))
    path = d.agent_config_path("c3")
    cfg = json.loads(open(path).read())
    assert os.stat(path).st_mode & 0o777 == 0o600  # the enrollment token is never world-readable
    assert cfg["enrollment_token"] == "one-time-token" and cfg["mysql_port"] == 33061
    assert cfg["driver"] == "fake" and cfg["datadir"] == "/srv/vol"
    assert open(cfg["ca_pem_path"]).read() == "CA PEM" and cfg["state_dir"].startswith(d.rootfs("c3"))
    d.set_mount("c3", None, LIMITS)
    assert json.loads(open(path).read())["datadir"] == os.path.join(d.rootfs("c3"), "var/lib/mysql")
    d.start("c3")
    with pytest.raises(FailedPrecondition):
        d.set_mount("c3", None, LIMITS)  # like LXC: only while stopped
    d.destroy("c3")


def test_a_half_made_create_is_redone(settings):
    d = FakeContainerDriver(settings)
    os.makedirs(os.path.join(settings.lxc_path, "rdf-c4", "rootfs"))  # hostd killed inside create
    with pytest.raises(NotFound):
        d.start("c4")
    d.create(spec("c4"))
    assert d.status("c4").state == "STOPPED"


def test_a_volume_is_a_directory_mounted_by_a_link(settings):
    v = FakeVolumeDriver(settings)
    info = v.create("v1", 1)
    assert (info.size_gb, info.locator) == (1, v.locator_for("v1")) and os.path.isdir(info.locator)
    assert os.path.realpath(info.mount_path) == info.locator and info.fs_bytes_total == 1024**3
    assert v.create("v1", 1) == info  # idempotent
    assert v.resize("v1", info.locator, 3).size_gb == 3
    v.deactivate("v1", info.locator)
    assert v.info("v1", info.locator).mount_path == "" and v.list_locators() == [info.locator]
    assert v.activate("v1", info.locator).mount_path == info.mount_path
    v.delete("v1", info.locator)
    assert v.list_locators() == [] and not os.path.lexists(info.mount_path)
    with pytest.raises(NotFound):
        v.activate("v1", info.locator)

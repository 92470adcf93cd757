"""A loop volume's device goes when its mount goes, even when nobody is left to detach it: hostd marks the
device autoclear once the filesystem is mounted (what `mount -o loop` does). Without it, a hostd killed inside a
mount namespace of its own (a test's host, a container host that died) left the device bound to a file that
no path reaches any more ("/" in `losetup -a`) until someone detached it by hand."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from reddwarf.hostd.loop import LoopDriver
from reddwarf.hostd.settings import Settings


def settings(tmp_path: Path) -> Settings:
    return Settings.from_mapping({"host_id": "autoclear", "state_dir": str(tmp_path / "state"),
                                  "storage_path": str(tmp_path / "volumes")})


def test_a_mounted_volume_frees_its_loop_device_when_its_mount_namespace_dies(tmp_path: Path) -> None:
    cfg = settings(tmp_path)
    driver = LoopDriver(cfg)
    locator = driver.locator_for("v-autoclear")
    # A process in a private mount namespace creates and mounts the volume, then dies without deactivating it
    # (SIGKILL), as a killed hostd in its own namespace does: its mounts end with the namespace.
    child = textwrap.dedent(f"""
        import os, signal
        from reddwarf.hostd.loop import LoopDriver
        from reddwarf.hostd.settings import Settings
        d = LoopDriver(Settings.from_mapping({{"host_id": "autoclear", "state_dir": {str(cfg.state_dir)!r},
                                               "storage_path": {str(cfg.storage_path)!r}}}))
        info = d.create("v-autoclear", 1)
        assert os.path.ismount(d.mount_path("v-autoclear")), "not mounted"
        print(info.device, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-c", child],
                         capture_output=True, text=True, timeout=120)
    device = out.stdout.strip()
    assert device.startswith("/dev/loop"), out.stderr
    try:
        assert LoopDriver.loop_device(locator) == "", "the loop device outlived its only mount"
        assert not Path(driver.mount_path("v-autoclear")).is_mount()  # the mount was the namespace's alone
    finally:
        driver.delete("v-autoclear", locator)
    assert not Path(locator).exists()


def test_deactivate_and_activate_again_keep_working_with_autoclear(tmp_path: Path) -> None:
    driver = LoopDriver(settings(tmp_path))
    info = driver.create("v-again", 1)
    locator = driver.locator_for("v-again")
    try:
        assert info.device and LoopDriver.loop_device(locator) == info.device
        (Path(driver.mount_path("v-again")) / "kept").write_text("yes")
        driver.deactivate("v-again", locator)  # the unmount frees the device; deactivate finds nothing left
        assert LoopDriver.loop_device(locator) == ""
        again = driver.activate("v-again", locator)
        assert again.device and (Path(driver.mount_path("v-again")) / "kept").read_text() == "yes"
        driver.activate("v-again", locator)  # activating an active volume again changes nothing
        assert LoopDriver.loop_device(locator) == again.device
    finally:
        driver.delete("v-again", locator)
    assert LoopDriver.loop_device(locator) == "" and not Path(locator).exists()

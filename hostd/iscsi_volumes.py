"""The iscsi volume driver of a compute host: the volume is a LUN on a SAN node (made there by a hostd in
storage mode, reddwarf.hostd.san); this host logs in with the CHAP account the server hands it, finds the
block device and mounts it under the state dir for its container, as the loop driver does with a file.

The initiator is chosen at start by probing: open-iscsi (`iscsiadm`) where the kernel has iscsi_tcp, else the
user-space initiator (qemu-storage-daemon exporting the LUN as a FUSE file, reddwarf.hostd.qsd) behind a loop
device. Either way the session outlives a hostd restart and is found again from the state dir (user-space)
or from the kernel's sessions (open-iscsi).
"""
from __future__ import annotations

import logging
import os
import shutil
import time

from reddwarf.common.errors import FailedPrecondition
from reddwarf.common.runner import CommandError, run

from . import qsd
from .iscsi import Chap, Initiator, Locator, kernel_has_iscsi_tcp
from .loop import LoopDriver, OnlineResizeDenied, detach, set_autoclear
from .settings import Settings
from .volumes import GIB, VolumeDriver, VolumeInfo

log = logging.getLogger("reddwarf.hostd.iscsi_volumes")


def choose_initiator(setting: str) -> str:
    """"kernel" or "userspace": the setting when it names one, else what this machine can run."""
    if setting in ("kernel", "userspace"):
        return setting
    if kernel_has_iscsi_tcp() and shutil.which("iscsiadm"):
        return "kernel"
    if qsd.available():
        return "userspace"
    raise SystemExit("the iscsi volume driver needs open-iscsi with the kernel's iscsi_tcp, or "
                     "qemu-storage-daemon with qemu-block-extra and /dev/fuse")


class IscsiVolumeDriver(VolumeDriver):
    name = "iscsi"
    remote = True

    def __init__(self, settings: Settings, initiator: str | None = None) -> None:
        self.settings = settings
        self.initiator_iqn = settings.initiator_iqn
        self.kind = choose_initiator(initiator or settings.iscsi_initiator)
        self.userspace = qsd.UserspaceInitiator(os.path.join(settings.state_dir, "iscsi"))
        self.kernel = Initiator()
        os.makedirs(settings.volumes_mount_dir, exist_ok=True)

    def mount_path(self, vid: str) -> str:
        return os.path.join(self.settings.volumes_mount_dir, vid)

    # -- the session ------------------------------------------------------------------------------
    def login(self, vid: str, locator: str, chap: Chap) -> str:
        """Logs in to the LUN (idempotent) and returns the block device or file it became."""
        loc = Locator.parse(locator)
        qsd.probe_portal(loc.portal)  # a SAN node that is down: UNAVAILABLE naming it, in seconds
        if self.kind == "kernel":
            dev = self.kernel.login(loc, self.initiator_iqn, chap)
            deadline = time.monotonic() + 30  # udev makes the by-path link a moment after the login
            while not os.path.exists(dev):
                if time.monotonic() > deadline:
                    self.kernel.logout(loc, self.initiator_iqn)
                    raise FailedPrecondition(f"logged in to {loc} but {dev} did not appear", field="locator")
                time.sleep(0.2)
            return dev
        return self.userspace.login(vid, loc, self.initiator_iqn, chap)

    def _session_device(self, vid: str, locator: str) -> str:
        """The LUN's block device (kernel) or FUSE file (user-space) while a session is open, else ""."""
        if self.kind == "kernel":
            dev = self.kernel.device_path(Locator.parse(locator))
            return dev if os.path.exists(dev) else ""
        return self.userspace.device_path(vid) if self.userspace.has_session(vid) else ""

    def has_session(self, vid: str, locator: str) -> bool:
        return bool(self._session_device(vid, locator))

    def _logout(self, vid: str, locator: str) -> None:
        if self.kind == "kernel":
            self.kernel.logout(Locator.parse(locator), self.initiator_iqn)
        else:
            self.userspace.logout(vid)

    def _block_device(self, vid: str, locator: str) -> str:
        """What gets mounted: the kernel's device itself, or a loop device over the FUSE file."""
        src = self._session_device(vid, locator)
        if not src or self.kind == "kernel":
            return src
        return LoopDriver.loop_device(src)

    # -- VolumeDriver -------------------------------------------------------------------------------
    def create(self, vid: str, size_gb: int) -> VolumeInfo:
        raise FailedPrecondition("iscsi volumes are made on a SAN node; attach one here with AdoptVolume "
                                 "(its locator and CHAP account)", field="volume.id")

    def activate(self, vid: str, locator: str) -> VolumeInfo:
        src = self._session_device(vid, locator)
        if not src:
            raise FailedPrecondition(f"volume {vid} has no iSCSI session on this host; the server must attach "
                                     "it again with its CHAP account", field="chap")
        dev = src
        if self.kind == "userspace":
            dev = LoopDriver.loop_device(src) or run(["losetup", "-f", "--show", src]).stdout.strip()
        mnt = self.mount_path(vid)
        os.makedirs(mnt, exist_ok=True)
        current = LoopDriver._mounted_at(mnt)
        if not current:
            run(["mount", "-t", "ext4", dev, mnt])
        elif current != dev:
            raise FailedPrecondition(f"{mnt} already has {current} mounted", field="id")
        if dev != src:
            set_autoclear(dev)  # the loop device over the user-space initiator's FUSE file
        return self.info(vid, locator)

    def unmount(self, vid: str, locator: str) -> None:
        """Unmounts and frees the loop device but keeps the session (an offline grow, a restart)."""
        mnt = self.mount_path(vid)
        if LoopDriver._mounted_at(mnt):
            run(["umount", mnt])
        if os.path.isdir(mnt):
            os.rmdir(mnt)
        if self.kind == "userspace":
            src = self.userspace.device_path(vid)
            if os.path.exists(src):
                detach(src)

    def deactivate(self, vid: str, locator: str) -> None:
        self.unmount(vid, locator)
        self._logout(vid, locator)

    def delete(self, vid: str, locator: str) -> None:
        # The data lives on the SAN node: the server deletes the LUN there. Here only the session goes.
        self.deactivate(vid, locator)

    def resize(self, vid: str, locator: str, size_gb: int) -> VolumeInfo:
        """The SAN node grew the LUN first; make the session and the filesystem see it."""
        if not self._session_device(vid, locator):
            self.activate(vid, locator)  # raises: no session
        if self.kind == "kernel":
            self.kernel.rescan(Locator.parse(locator), self.initiator_iqn)
        else:
            self.userspace.resize(vid, size_gb * GIB)
        info = self.info(vid, locator)
        if not info.device:
            info = self.activate(vid, locator)
        if self.kind == "userspace":
            run(["losetup", "-c", info.device])
        try:
            run(["resize2fs", info.device], timeout=600)
        except CommandError as exc:
            if "Permission denied" in exc.stderr:  # as in the loop driver: the caller grows it offline
                raise OnlineResizeDenied(str(exc)) from exc
            raise
        log.info("iscsi volume resized", extra={"volume": vid, "size_gb": size_gb})
        return self.info(vid, locator)

    def grow_offline(self, vid: str, locator: str) -> None:
        """Grows the unmounted filesystem to the LUN's size (the session is still open)."""
        src = self._session_device(vid, locator)
        if not src:
            raise FailedPrecondition(f"volume {vid} has no iSCSI session on this host", field="chap")
        run(["e2fsck", "-f", "-p", src], timeout=600, check=False)
        run(["resize2fs", src], timeout=600)
        log.info("iscsi volume grown offline", extra={"volume": vid})

    def info(self, vid: str, locator: str) -> VolumeInfo:
        src = self._session_device(vid, locator)
        size = 0
        if src:
            with open(src, "rb") as f:
                size = f.seek(0, os.SEEK_END)
        dev = self._block_device(vid, locator) if src else ""
        mnt = self.mount_path(vid)
        total = used = 0
        if dev and LoopDriver._mounted_at(mnt) == dev:
            st = os.statvfs(mnt)
            total = st.f_blocks * st.f_frsize
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
        else:
            mnt = ""
        return VolumeInfo(id=vid, size_gb=size // GIB, driver=self.name, locator=locator, device=dev,
                          mount_path=mnt, fs_bytes_total=total, fs_bytes_used=used)

    def list_locators(self) -> list[str]:
        """The LUNs this host has sessions to (user-space: found in the state dir): reported as unmanaged
        when no volume record names them, e.g. a hostd killed between login and recording the volume."""
        if self.kind == "kernel":
            return []  # open-iscsi's sessions are the machine's, not only ours
        return sorted(filter(None, (self.userspace.locator(v) for v in self.userspace.sessions())))

    def free_bytes(self) -> int:
        return 0

    def total_bytes(self) -> int:
        return 0

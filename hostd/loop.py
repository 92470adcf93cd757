"""The loop volume driver: a sparse file under the storage path, ext4, attached with losetup and mounted
on the host under the state dir; grown online with truncate + `losetup -c` + resize2fs."""
from __future__ import annotations

import fcntl
import logging
import os
import struct

from reddwarf.common.errors import FailedPrecondition, NotFound
from reddwarf.common.runner import CommandError, run

from .volumes import GIB, LocalVolumeDriver, VolumeInfo

log = logging.getLogger("reddwarf.hostd.loop")


# <linux/loop.h>: struct loop_info64 is 232 bytes and its lo_flags (a __u32) sits at offset 52.
_LOOP_SET_STATUS64 = 0x4C04
_LOOP_GET_STATUS64 = 0x4C05
_LO_FLAGS_AUTOCLEAR = 4
_LOOP_INFO64_SIZE = 232
_LO_FLAGS_OFFSET = 52


def set_autoclear(dev: str) -> None:
    """Marks a mounted loop device to detach itself when its last user goes (as `mount -o loop` does).

    Called once the filesystem is mounted: the mount is then the device's user, so an unmount frees it, and so
    does the end of a mount namespace whose processes were all killed, which would otherwise leave the device
    bound to a file nobody can reach (losetup shows it as "/") until someone detaches it by hand."""
    fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
    try:
        info = bytearray(_LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, _LOOP_GET_STATUS64, info, True)
        (flags,) = struct.unpack_from("=I", info, _LO_FLAGS_OFFSET)
        if not flags & _LO_FLAGS_AUTOCLEAR:
            struct.pack_into("=I", info, _LO_FLAGS_OFFSET, flags | _LO_FLAGS_AUTOCLEAR)
            fcntl.ioctl(fd, _LOOP_SET_STATUS64, bytes(info))
    finally:
        os.close(fd)


def detach(locator: str) -> None:
    """Detaches every loop device still bound to locator; one that detached itself meanwhile is no error."""
    dev = LoopDriver.loop_device(locator)
    while dev:
        try:
            run(["losetup", "-d", dev])
        except CommandError:
            if LoopDriver.loop_device(locator) == dev:
                raise
        dev = LoopDriver.loop_device(locator)


class OnlineResizeDenied(Exception):
    """The kernel would not grow the mounted filesystem."""


class LoopDriver(LocalVolumeDriver):
    name = "loop"
    suffix = ".img"

    @staticmethod
    def loop_device(locator: str) -> str:
        """The loop device backed by this file, "" when none."""
        out = run(["losetup", "-j", locator, "-O", "NAME", "-n"]).stdout.split()
        return out[0] if out else ""

    @staticmethod
    def _mounted_at(path: str) -> str:
        """The source device mounted at path, "" when nothing is."""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if parts[1] == path:
                    return parts[0]
        return ""

    def create(self, vid: str, size_gb: int) -> VolumeInfo:
        locator = self.locator_for(vid)
        if not os.path.exists(locator):
            tmp = locator + ".new"
            try:
                # 0600: a volume image is a tenant's whole database; nobody but hostd (root) reads it.
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    f.truncate(size_gb * GIB)  # sparse: costs nothing until written
                # lazy init keeps mkfs of a large sparse file at a fraction of a second
                run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                     "-L", vid[:16], tmp], timeout=300)
                os.replace(tmp, locator)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.info("loop volume created", extra={"volume": vid, "size_gb": size_gb})
        return self.activate(vid, locator)

    def activate(self, vid: str, locator: str) -> VolumeInfo:
        if not os.path.exists(locator):
            raise NotFound(f"backing file {locator} does not exist", field="locator")
        os.chmod(locator, 0o600)  # images made by an earlier hostd were 0644
        dev = self.loop_device(locator)
        if not dev:
            dev = run(["losetup", "-f", "--show", locator]).stdout.strip()
        mnt = self.mount_path(vid)
        os.makedirs(mnt, exist_ok=True)
        current = self._mounted_at(mnt)
        if not current:
            run(["mount", "-t", "ext4", dev, mnt])
        elif current != dev:
            raise FailedPrecondition(f"{mnt} already has {current} mounted", field="id")
        set_autoclear(dev)
        return self.info(vid, locator)

    def deactivate(self, vid: str, locator: str) -> None:
        mnt = self.mount_path(vid)
        if self._mounted_at(mnt):
            run(["umount", mnt])
        if os.path.isdir(mnt):
            os.rmdir(mnt)
        if os.path.exists(locator):
            detach(locator)

    def delete(self, vid: str, locator: str) -> None:
        self.deactivate(vid, locator)
        if os.path.exists(locator):
            os.unlink(locator)
            log.info("loop volume deleted", extra={"volume": vid})

    def resize(self, vid: str, locator: str, size_gb: int) -> VolumeInfo:
        info = self.info(vid, locator)
        if not info.device:
            info = self.activate(vid, locator)
        with open(locator, "r+b") as f:
            f.truncate(size_gb * GIB)
        run(["losetup", "-c", info.device])  # the loop device picks up the file's new size
        try:
            run(["resize2fs", info.device], timeout=600)  # online grow: the filesystem stays mounted
        except CommandError as exc:
            # The kernel refuses EXT4_IOC_RESIZE_FS without CAP_SYS_RESOURCE (some sandboxes drop it):
            # the caller then grows it offline around a short stop of the container.
            if "Permission denied" in exc.stderr:
                raise OnlineResizeDenied(str(exc)) from exc
            raise
        log.info("loop volume resized", extra={"volume": vid, "size_gb": size_gb})
        return self.info(vid, locator)

    def grow_offline(self, vid: str, locator: str) -> None:
        """Grows the filesystem of a deactivated volume to its file's size."""
        run(["e2fsck", "-f", "-p", locator], timeout=600, check=False)  # resize2fs insists on a fresh check
        run(["resize2fs", locator], timeout=600)
        log.info("loop volume grown offline", extra={"volume": vid})

    def info(self, vid: str, locator: str) -> VolumeInfo:
        size = os.path.getsize(locator) if os.path.exists(locator) else 0
        dev = self.loop_device(locator) if size else ""
        mnt = self.mount_path(vid)
        total = used = 0
        if dev and self._mounted_at(mnt):
            st = os.statvfs(mnt)
            total = st.f_blocks * st.f_frsize
            used = (st.f_blocks - st.f_bfree) * st.f_frsize
        else:
            mnt = ""
        return VolumeInfo(id=vid, size_gb=size // GIB, driver=self.name, locator=locator, device=dev,
                          mount_path=mnt, fs_bytes_total=total, fs_bytes_used=used)



def device_numbers(device: str) -> str:
    """"major:minor" of a block device, for per-device cgroup IO throttles."""
    st = os.stat(device)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

"""The volume concept: where an instance's datadir lives, independent of its container, and the driver
interface (loop default; iscsi: a LUN on a SAN node, reddwarf.hostd.iscsi_volumes, whose storage side is
reddwarf.hostd.san). A volume is mounted on the host under the state dir and bind-mounted into its container,
so it outlives the container and can be released here and adopted by another host."""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings

GIB = 1024**3


@dataclass(frozen=True)
class VolumeInfo:
    id: str
    size_gb: int
    driver: str
    locator: str  # backing file path, or "iqn:lun" for iSCSI
    device: str = ""  # /dev/loopN or /dev/sdX while active here
    mount_path: str = ""  # host-side mount point while active here
    fs_bytes_total: int = 0
    fs_bytes_used: int = 0


class VolumeDriver(abc.ABC):
    name: str
    # True when the backing store is elsewhere (a SAN node): this host's disk space does not bound it.
    remote: bool = False

    @abc.abstractmethod
    def create(self, vid: str, size_gb: int) -> VolumeInfo:
        """Makes the backing store and an ext4 filesystem, and activates it (device + host mount)."""

    @abc.abstractmethod
    def activate(self, vid: str, locator: str) -> VolumeInfo:
        """Makes an existing backing store usable here (device + host mount); idempotent."""

    @abc.abstractmethod
    def deactivate(self, vid: str, locator: str) -> None:
        """Unmounts and releases the device, keeping the data; idempotent."""

    def unmount(self, vid: str, locator: str) -> None:
        """Unmounts for an offline grow; a driver with a session to keep (iscsi) keeps it."""
        self.deactivate(vid, locator)

    @abc.abstractmethod
    def delete(self, vid: str, locator: str) -> None:
        """Deactivates and destroys the backing store; idempotent."""

    @abc.abstractmethod
    def resize(self, vid: str, locator: str, size_gb: int) -> VolumeInfo:
        """Grows backing store and filesystem online (mounted, possibly in use)."""

    @abc.abstractmethod
    def info(self, vid: str, locator: str) -> VolumeInfo: ...

    @abc.abstractmethod
    def list_locators(self) -> list[str]:
        """Every backing store of ours in storage, tracked or not (for reconciliation)."""

    @abc.abstractmethod
    def free_bytes(self) -> int: ...

    @abc.abstractmethod
    def total_bytes(self) -> int: ...


class LocalVolumeDriver(VolumeDriver):
    """A volume whose backing store is a file or directory named `<id><suffix>` in this host's storage path,
    mounted under the volumes mount dir: what the loop and fake drivers share."""

    suffix: str

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        os.makedirs(settings.storage_path, exist_ok=True)
        os.makedirs(settings.volumes_mount_dir, exist_ok=True)

    def locator_for(self, vid: str) -> str:
        return os.path.join(self.settings.storage_path, f"{vid}{self.suffix}")

    def mount_path(self, vid: str) -> str:
        return os.path.join(self.settings.volumes_mount_dir, vid)

    def is_store(self, path: str) -> bool:
        return os.path.isfile(path)

    def list_locators(self) -> list[str]:
        root = self.settings.storage_path
        return sorted(p for p in (os.path.join(root, n) for n in os.listdir(root) if n.endswith(self.suffix))
                      if self.is_store(p))

    def free_bytes(self) -> int:
        st = os.statvfs(self.settings.storage_path)
        return st.f_bavail * st.f_frsize

    def total_bytes(self) -> int:
        st = os.statvfs(self.settings.storage_path)
        return st.f_blocks * st.f_frsize

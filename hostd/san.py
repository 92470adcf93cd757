"""Storage mode: hostd on a SAN node. It owns a tgtd of its own (its portal, its management port) and makes one
target per volume, LUN 1 a sparse ext4 file under the storage path. A LUN admits exactly one initiator: the
host the server attached the volume to, by IQN in the target's ACL plus the volume's CHAP account (the server
makes the secret and hands it to both ends). Everyone else is refused at login, and a host the volume moved
away from (or that was fenced) has its session cut.

tgtd keeps its configuration in memory and runs beside hostd, not under it: a hostd restart keeps every
session; a tgtd that died is started again and given back its targets from hostd's state.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time

from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.common.runner import CommandError, run

from .containers import (
    ContainerDriver,
    ContainerSpec,
    ContainerStatus,
    ExecResult,
    Limits,
    Usage,
    VolumeMount,
)
from .iscsi import Chap, Locator, TargetHost, validate_iqn
from .settings import Settings
from .volumes import GIB, LocalVolumeDriver, VolumeInfo

log = logging.getLogger("reddwarf.hostd.san")


class TgtDaemon:
    """A tgtd of this hostd's: portal and management port from the settings, pid in the state dir."""

    def __init__(self, settings: Settings) -> None:
        self.portal = settings.iscsi_portal
        self.control_port = settings.target_control_port
        self.pid_file = os.path.join(settings.state_dir, "tgtd.pid")
        self.log_file = os.path.join(settings.state_dir, "tgtd.log")
        self.target = TargetHost(self.portal, self.control_port)

    def running(self) -> bool:
        try:
            self.target.targets()
        except CommandError:
            return False
        return True

    def start(self) -> None:
        """Starts tgtd unless ours already answers (a hostd restart keeps it and its sessions)."""
        if self.running():
            return
        os.makedirs(os.path.dirname(self.pid_file), mode=0o700, exist_ok=True)
        with open(self.log_file, "ab") as out:
            # -f: stays in the foreground of its own session, so its pid is the one we keep.
            proc = subprocess.Popen(["tgtd", "-f", "-C", str(self.control_port), "--iscsi",
                                     f"portal={self.portal}"], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        with open(self.pid_file, "w") as f:
            f.write(str(proc.pid))
        deadline = time.monotonic() + 15
        while not self.running():
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(self.log_file, errors="replace") as f:
                    tail = f.read()[-500:]
                raise SystemExit(f"tgtd on {self.portal} (control port {self.control_port}) did not start: {tail}")
            time.sleep(0.1)
        log.info("tgtd started", extra={"portal": self.portal, "control_port": self.control_port, "pid": proc.pid})

    def stop(self) -> None:
        """Removes every target (their sessions go with them) and stops tgtd; its socket files go too."""
        if self.running():
            for t in self.target.targets():
                self.target.unexport(t.iqn)
            self.target._adm("--op", "delete", "--mode", "system", check=False)
        pid = 0
        with contextlib.suppress(OSError, ValueError), open(self.pid_file) as f:
            pid = int(f.read().strip())
        deadline = time.monotonic() + 10
        while pid and _is_tgtd(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # our own child when this process started it
            time.sleep(0.1)
        if pid and _is_tgtd(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for path in (self.pid_file, f"/var/run/tgtd/socket.{self.control_port}",
                     f"/var/run/tgtd/socket.{self.control_port}.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        log.info("tgtd stopped", extra={"portal": self.portal, "control_port": self.control_port})


def _is_tgtd(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return "(tgtd)" in stat and stat.split(") ", 1)[1][:1] != "Z"


class SanTargetDriver(LocalVolumeDriver):
    """Volumes as LUNs: backing files `<id>.lun` under the storage path, locators `iscsi://portal/iqn/1`."""

    name = "iscsi"
    suffix = ".lun"

    def __init__(self, settings: Settings, target: TargetHost) -> None:
        super().__init__(settings)
        self.target = target

    def iqn_for(self, vid: str) -> str:
        return validate_iqn(f"{self.settings.iscsi_iqn_prefix}:vol.{vid.lower()}", "volume.id")

    def backing_path(self, vid: str) -> str:
        return os.path.join(self.settings.storage_path, f"{vid}{self.suffix}")

    def locator_for(self, vid: str) -> str:
        return str(Locator(self.target.portal, self.iqn_for(vid), 1))

    def _vid(self, locator: str) -> str:
        loc = Locator.parse(locator)
        prefix = f"{self.settings.iscsi_iqn_prefix}:vol."
        if loc.portal != self.target.portal or not loc.iqn.startswith(prefix):
            raise InvalidArgument(f"locator {locator} is not a LUN of this SAN node", field="locator")
        return loc.iqn[len(prefix):]

    def list_locators(self) -> list[str]:
        root = self.settings.storage_path
        return sorted(self.locator_for(n[: -len(self.suffix)]) for n in os.listdir(root)
                      if n.endswith(self.suffix) and os.path.isfile(os.path.join(root, n)))

    def create(self, vid: str, size_gb: int) -> VolumeInfo:
        path = self.backing_path(vid)
        if not os.path.exists(path):
            tmp = path + ".new"
            try:
                # 0600: a LUN file is a tenant's whole database.
                with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
                    f.truncate(size_gb * GIB)  # sparse
                # The filesystem is made here, once: a compute host only ever mounts it.
                run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1",
                     "-L", vid[:16], tmp], timeout=300)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            log.info("san volume created", extra={"volume": vid, "size_gb": size_gb})
        return self.activate(vid, self.locator_for(vid))

    def activate(self, vid: str, locator: str) -> VolumeInfo:
        """Exported with nobody admitted yet (tgtd refuses every initiator of a target without an ACL)."""
        path = self.backing_path(vid)
        if not os.path.exists(path):
            raise FailedPrecondition(f"no backing file for volume {vid}", field="id")
        self.target.export(self.iqn_for(vid), path, initiators=())
        return self.info(vid, locator)

    def allow(self, vid: str, initiator_iqn: str, chap: Chap | None) -> None:
        """Admits exactly this initiator with this CHAP account ("" = nobody: fenced, or detached)."""
        self.target.allow_only(self.iqn_for(vid), initiator_iqn, chap.user if chap else "",
                               chap.secret if chap else "")

    def deactivate(self, vid: str, locator: str) -> None:
        self.target.unexport(self.iqn_for(vid))

    def delete(self, vid: str, locator: str) -> None:
        self.deactivate(vid, locator)
        path = self.backing_path(vid)
        if os.path.exists(path):
            os.unlink(path)
            log.info("san volume deleted", extra={"volume": vid})

    def resize(self, vid: str, locator: str, size_gb: int) -> VolumeInfo:
        """Grows the file and the LUN; the filesystem is grown by the compute host that has it mounted."""
        path = self.backing_path(vid)
        with open(path, "r+b") as f:
            f.truncate(size_gb * GIB)
        self.target.relun(self.iqn_for(vid), path)
        log.info("san volume grown", extra={"volume": vid, "size_gb": size_gb})
        return self.info(vid, locator)

    def info(self, vid: str, locator: str) -> VolumeInfo:
        path = self.backing_path(vid)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        return VolumeInfo(id=vid, size_gb=size // GIB, driver=self.name, locator=locator)


class NoContainers(ContainerDriver):
    """A SAN node runs no containers: every container call is refused, and it has none."""

    name = "none"

    def _refuse(self) -> FailedPrecondition:
        return FailedPrecondition("this hostd is a SAN storage node: it runs no containers", field="id")

    def create(self, spec: ContainerSpec) -> None:
        raise self._refuse()

    def start(self, cid: str) -> ContainerStatus:
        raise self._refuse()

    def stop(self, cid: str, timeout: int) -> ContainerStatus:
        raise self._refuse()

    def destroy(self, cid: str) -> None:
        raise self._refuse()

    def status(self, cid: str) -> ContainerStatus:
        return ContainerStatus("ABSENT")

    def set_limits(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        raise self._refuse()

    def usage(self, cid: str, limits: Limits) -> Usage:
        raise self._refuse()

    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        raise self._refuse()

    def set_mount(self, cid: str, mount: VolumeMount | None, limits: Limits | None = None) -> None:
        raise self._refuse()

    def list_names(self) -> list[str]:
        return []

"""iSCSI volumes: the target side (tgtd via tgtadm) exports a backing file as a LUN; the initiator side
(open-iscsi's iscsiadm) logs a host into it so the LUN appears as a block device there.

Target and initiator are separate values because they run on different hosts: the storage host exports, the
container host logs in. A volume's locator is `iscsi://<portal>/<iqn>/<lun>`, which is what another host
needs to adopt it.

Every call goes through an injectable runner (default common.runner.run) so the exact commands are testable
where a piece (the kernel's iscsi_tcp initiator) does not exist.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.common.runner import Result, run

log = logging.getLogger("reddwarf.hostd.iscsi")

Runner = Callable[..., Result]
IQN_RE = re.compile(r"^iqn\.\d{4}-\d{2}\.[a-z0-9.-]+(:[a-z0-9.:-]+)?\Z")
PORTAL_RE = re.compile(r"^[0-9.]+:\d{1,5}\Z")


def validate_iqn(iqn: str, field_name: str = "iqn") -> str:
    if not IQN_RE.match(iqn or "") or len(iqn) > 223:  # RFC 3720: at most 223 bytes
        raise InvalidArgument(f"{field_name} must be an iqn.YYYY-MM.domain[:name] name, got {iqn!r}",
                              field=field_name)
    return iqn


@dataclass(frozen=True)
class Locator:
    portal: str  # "address:port"
    iqn: str
    lun: int

    def __str__(self) -> str:
        return f"iscsi://{self.portal}/{self.iqn}/{self.lun}"

    @staticmethod
    def parse(text: str, field_name: str = "locator") -> Locator:
        m = re.match(r"^iscsi://([^/]+)/([^/]+)/(\d+)\Z", text or "")
        if not m or not PORTAL_RE.match(m.group(1)):
            raise InvalidArgument(f"{field_name} must look like iscsi://addr:port/iqn/lun, got {text!r}",
                                  field=field_name)
        return Locator(m.group(1), validate_iqn(m.group(2), field_name), int(m.group(3)))


@dataclass(frozen=True)
class Lun:
    lun: int
    backing_path: str
    size_bytes: int


@dataclass(frozen=True)
class Target:
    tid: int
    iqn: str
    luns: tuple[Lun, ...]
    acl: tuple[str, ...]


def parse_show(text: str) -> list[Target]:
    """Parses `tgtadm --op show --mode target`."""
    targets: list[Target] = []
    tid, iqn = 0, ""
    luns: list[Any] = []
    acl: list[str] = []
    lun_no, size, section = -1, 0, ""

    def flush() -> None:
        if tid:
            targets.append(Target(tid, iqn, tuple(luns), tuple(acl)))

    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^Target (\d+): (\S+)\Z", line)
        if m and not raw.startswith(" "):
            flush()
            tid, iqn, luns, acl, section = int(m.group(1)), m.group(2), [], [], ""
            continue
        if line.endswith("information:"):
            section = line
            continue
        if section == "ACL information:" and line:
            acl.append(line)
        elif line.startswith("LUN:"):
            lun_no = int(line.split(":", 1)[1])
        elif line.startswith("Size:"):
            size_mb = re.match(r"Size: (\d+) MB", line)
            size = int(size_mb.group(1)) * 1000 * 1000 if size_mb else 0  # tgtadm prints decimal MB
        elif line.startswith("Backing store path:") and lun_no > 0:
            luns.append(Lun(lun_no, line.split(":", 1)[1].strip(), size))
    flush()
    return targets


class TargetHost:
    """tgtd on this host: export backing files as LUNs of per-volume targets (idempotent by IQN)."""

    def __init__(self, portal: str, control_port: int = 0, runner: Runner = run) -> None:
        self.portal = portal
        self.control_port = control_port
        self._run = runner

    def _adm(self, *args: str, check: bool = True) -> Result:
        ctl = ["-C", str(self.control_port)] if self.control_port else []
        return self._run(["tgtadm", *ctl, "--lld", "iscsi", *args], timeout=30, check=check)

    def targets(self) -> list[Target]:
        return parse_show(self._adm("--op", "show", "--mode", "target").stdout)

    def find(self, iqn: str) -> Target | None:
        return next((t for t in self.targets() if t.iqn == iqn), None)

    def export(self, iqn: str, backing_path: str, initiators: tuple[str, ...] = ("ALL",)) -> Locator:
        """Target `iqn` with LUN 1 backed by `backing_path`, open to `initiators` (addresses, or ALL)."""
        validate_iqn(iqn)
        if not os.path.isfile(backing_path):
            raise FailedPrecondition(f"backing file {backing_path} does not exist", field="backing_path")
        existing = self.find(iqn)
        if existing is not None:
            if [lun.backing_path for lun in existing.luns] != [backing_path]:
                raise FailedPrecondition(f"target {iqn} exists with another backing store", field="iqn")
            return Locator(self.portal, iqn, 1)
        tid = max((t.tid for t in self.targets()), default=0) + 1
        self._adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        try:
            self._adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", "1", "-b", backing_path)
            for addr in initiators:
                self._adm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", addr)
        except Exception:
            self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(tid), check=False)
            raise
        log.info("iscsi target exported", extra={"iqn": iqn, "tid": tid, "backing": backing_path})
        return Locator(self.portal, iqn, 1)

    def unexport(self, iqn: str) -> bool:
        """Removes the target (sessions are dropped); the backing file stays. False when absent."""
        target = self.find(iqn)
        if target is None:
            return False
        self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(target.tid))
        log.info("iscsi target removed", extra={"iqn": iqn, "tid": target.tid})
        return True


@dataclass(frozen=True)
class Discovered:
    iqn: str
    portal: str
    luns: tuple[int, ...]


def discover_with_iscsi_ls(portal: str, initiator_iqn: str, runner: Runner = run) -> list[Discovered]:
    """Userspace discovery (libiscsi's iscsi-ls): works without the kernel initiator."""
    res = runner(["iscsi-ls", "-s", "-i", initiator_iqn, f"iscsi://{portal}"], timeout=30)
    found: list[Discovered] = []
    for line in res.stdout.splitlines():
        m = re.match(r"^Target:(\S+) Portal:(\S+?),\d+\Z", line.strip())
        if m:
            found.append(Discovered(m.group(1), m.group(2), ()))
            continue
        m = re.match(r"^Lun:(\d+)\s+Type:DIRECT_ACCESS", line.strip())
        if m and found:
            last = found[-1]
            found[-1] = Discovered(last.iqn, last.portal, last.luns + (int(m.group(1)),))
    return found


def kernel_has_iscsi_tcp() -> bool:
    """The open-iscsi initiator needs the kernel's iscsi_tcp transport."""
    if os.path.isdir("/sys/module/iscsi_tcp"):
        return True
    release = os.uname().release
    for _root, _dirs, files in os.walk(f"/lib/modules/{release}/kernel/drivers/scsi"):
        if any(f.startswith("iscsi_tcp.ko") for f in files):
            return True
    return False


class Initiator:
    """open-iscsi on a container host: log in to a locator and find the block device it becomes."""

    def __init__(self, runner: Runner = run, by_path: str = "/dev/disk/by-path") -> None:
        self._run = runner
        self.by_path = by_path

    def _iscsiadm(self, *args: str, check: bool = True) -> Result:
        return self._run(["iscsiadm", *args], timeout=60, check=check)

    def login(self, loc: Locator) -> str:
        """Discovers the portal, logs in (idempotent: an existing session is kept), returns the device."""
        self._iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", loc.portal)
        res = self._iscsiadm("-m", "node", "-T", loc.iqn, "-p", loc.portal, "--login", check=False)
        # 15 = ISCSI_ERR_SESS_EXISTS: already logged in, which is what we want.
        if res.returncode not in (0, 15):
            raise FailedPrecondition(f"iscsi login to {loc} failed: {res.stderr.strip()[:300]}", field="locator")
        return self.device_path(loc)

    def logout(self, loc: Locator) -> None:
        res = self._iscsiadm("-m", "node", "-T", loc.iqn, "-p", loc.portal, "--logout", check=False)
        # 21 = ISCSI_ERR_NO_OBJS_FOUND: no session, already logged out.
        if res.returncode not in (0, 21):
            raise FailedPrecondition(f"iscsi logout from {loc} failed: {res.stderr.strip()[:300]}",
                                     field="locator")

    def device_path(self, loc: Locator) -> str:
        return os.path.join(self.by_path, f"ip-{loc.portal}-iscsi-{loc.iqn}-lun-{loc.lun}")

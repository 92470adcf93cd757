"""iSCSI volumes: the target side (tgtd via tgtadm) exports a backing file as a LUN and admits exactly one
initiator (ACL by initiator name + an incoming CHAP account); the kernel initiator side (open-iscsi's iscsiadm)
logs a host into it so the LUN appears as a block device there. The user-space initiator is in qsd.py, the
storage-mode driver in san.py, the compute side's volume driver in iscsi_volumes.py.

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
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, Unavailable
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
class Session:
    """One I_T nexus: an initiator logged in to a target."""

    sid: int
    initiator: str
    connections: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    tid: int
    iqn: str
    luns: tuple[Lun, ...]
    acl: tuple[str, ...]
    accounts: tuple[str, ...] = ()
    sessions: tuple[Session, ...] = ()


def parse_show(text: str) -> list[Target]:
    """Parses `tgtadm --op show --mode target`."""
    targets: list[Target] = []
    tid, iqn = 0, ""
    luns: list[Any] = []
    acl: list[str] = []
    accounts: list[str] = []
    sessions: list[Session] = []
    lun_no, size, section = -1, 0, ""

    def flush() -> None:
        if tid:
            targets.append(Target(tid, iqn, tuple(luns), tuple(acl), tuple(accounts), tuple(sessions)))

    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^Target (\d+): (\S+)\Z", line)
        if m and not raw.startswith(" "):
            flush()
            tid, iqn, luns, acl, accounts, sessions, section = int(m.group(1)), m.group(2), [], [], [], [], ""
            continue
        if line.endswith("information:") and raw.startswith("    ") and not raw.startswith("     "):
            section = line
            continue
        if section == "ACL information:" and line:
            acl.append(line)
        elif section == "Account information:" and line:
            accounts.append(line.removesuffix(" (outgoing)"))
        elif section == "I_T nexus information:":
            m = re.match(r"^I_T nexus: (\d+)\Z", line)
            if m:
                sessions.append(Session(int(m.group(1)), "", ()))
            elif line.startswith("Initiator:") and sessions:
                last = sessions[-1]
                sessions[-1] = Session(last.sid, line.split()[1], last.connections)
            elif line.startswith("Connection:") and sessions:
                last = sessions[-1]
                sessions[-1] = Session(last.sid, last.initiator,
                                       last.connections + (int(line.split(":", 1)[1]),))
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
        # Target ids are picked as the highest in use + 1: exports of different volumes run in parallel
        # (hostd/host.py locks per volume), so the pick and the target's creation go under one lock.
        self._tid_lock = threading.Lock()

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
        with self._tid_lock:
            return self._export(iqn, backing_path, initiators)

    def _export(self, iqn: str, backing_path: str, initiators: tuple[str, ...]) -> Locator:
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

    def allow_only(self, iqn: str, initiator_iqn: str, chap_user: str, chap_secret: str) -> None:
        """Lets exactly one initiator in: its name in the ACL and one incoming CHAP account bound; every
        other initiator is unbound and its sessions cut (a fenced or former host must not keep writing).
        An empty initiator_iqn lets nobody in."""
        target = self.find(iqn)
        if target is None:
            raise FailedPrecondition(f"target {iqn} is not exported", field="id")
        tid = str(target.tid)
        for entry in target.acl:
            if entry != initiator_iqn:
                by = "--initiator-name" if entry.startswith("iqn.") else "--initiator-address"
                self._adm("--op", "unbind", "--mode", "target", "--tid", tid, by, entry)
        for sess in target.sessions:
            if sess.initiator != initiator_iqn:
                self.drop_session(target.tid, sess)
        for user in target.accounts:
            if user != chap_user or not initiator_iqn:
                self._adm("--op", "unbind", "--mode", "account", "--tid", tid, "--user", user, check=False)
                self._adm("--op", "delete", "--mode", "account", "--user", user, check=False)
        if not initiator_iqn:
            log.info("iscsi target closed to every initiator", extra={"iqn": iqn})
            return
        validate_iqn(initiator_iqn, "initiator_iqn")
        if chap_user not in target.accounts:
            self._new_account(chap_user, chap_secret)
            self._adm("--op", "bind", "--mode", "account", "--tid", tid, "--user", chap_user)
        if initiator_iqn not in target.acl:
            self._adm("--op", "bind", "--mode", "target", "--tid", tid, "--initiator-name", initiator_iqn)
        log.info("iscsi target restricted to one initiator", extra={"iqn": iqn, "initiator": initiator_iqn})

    def _new_account(self, user: str, secret: str) -> None:
        """tgtadm takes the CHAP secret only as an argument: run it without the runner, whose log and errors
        would carry the argv, and say what failed without it."""
        validate_chap(Chap(user, secret))
        # One left unbound by a crash between "new" and "bind" would make "new" fail: start from none.
        self._adm("--op", "delete", "--mode", "account", "--user", user, check=False)
        ctl = ["-C", str(self.control_port)] if self.control_port else []
        proc = subprocess.run(["tgtadm", *ctl, "--lld", "iscsi", "--op", "new", "--mode", "account",
                               "--user", user, "--password", secret], capture_output=True, timeout=30, check=False)
        if proc.returncode != 0:
            raise FailedPrecondition(f"tgtadm could not add CHAP account {user}: "
                                     f"{proc.stderr.decode(errors='replace').strip()[:200]}", field="chap")

    def drop_session(self, tid: int, sess: Session) -> None:
        for cid in sess.connections or (0,):
            self._adm("--op", "delete", "--mode", "conn", "--tid", str(tid), "--sid", str(sess.sid),
                      "--cid", str(cid), check=False)
        log.info("iscsi session cut", extra={"tid": tid, "initiator": sess.initiator})

    def relun(self, iqn: str, backing_path: str) -> None:
        """Makes tgtd see a grown backing file: tgtd reads a LUN's size when the LUN is added, so LUN 1 is
        removed and added again on the same file (logged-in initiators keep their session and see the
        new capacity at their next READ CAPACITY)."""
        target = self.find(iqn)
        if target is None:
            raise FailedPrecondition(f"target {iqn} is not exported", field="id")
        tid = str(target.tid)
        self._adm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", "1")
        self._adm("--op", "new", "--mode", "logicalunit", "--tid", tid, "--lun", "1", "-b", backing_path)

    def unexport(self, iqn: str) -> bool:
        """Removes the target (sessions are dropped); the backing file stays. False when absent."""
        target = self.find(iqn)
        if target is None:
            return False
        self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(target.tid))
        for user in target.accounts:
            self._adm("--op", "delete", "--mode", "account", "--user", user, check=False)
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


@dataclass(frozen=True)
class Chap:
    """A volume's incoming CHAP account: the server holds it and hands it to the host it attaches to."""

    user: str
    secret: str

    def __repr__(self) -> str:  # never print the secret
        return f"Chap(user={self.user!r}, secret=***)"


def _login_error(loc: Locator, initiator_iqn: str, code: int, stderr: str) -> Exception:
    """iscsiadm's exit status (open-iscsi's iscsi_err.h) as the error the caller can act on."""
    if code == 24:  # ISCSI_ERR_LOGIN_AUTH_FAILED
        return PermissionDenied(f"the SAN node at {loc.portal} refused the CHAP credentials: {stderr}", field="chap")
    if code == 19:  # ISCSI_ERR_FATAL_LOGIN: the target turned the initiator away (not in its ACL)
        return PermissionDenied(f"the SAN node at {loc.portal} does not admit initiator {initiator_iqn or '(default)'}"
                                f": {stderr}", field="locator")
    if code in (4, 8):  # ISCSI_ERR_TRANS, ISCSI_ERR_TRANS_TIMEOUT
        return Unavailable(f"the SAN node at {loc.portal} is unreachable: {stderr}", field="locator")
    return FailedPrecondition(f"iscsi login to {loc} failed ({code}): {stderr}", field="locator")


def validate_chap(chap: Chap) -> Chap:
    """tgtd and libiscsi take these characters without quoting; 12 bytes is CHAP's usual minimum secret."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", chap.user) or not re.fullmatch(r"[A-Za-z0-9_.~-]{12,64}",
                                                                              chap.secret):
        raise InvalidArgument("chap.user must be 1..64 and chap.secret 12..64 characters of [A-Za-z0-9_.~-]",
                              field="chap")
    return chap


class Initiator:
    """open-iscsi on a container host: log in to a locator and find the block device it becomes.

    With an initiator name, sessions go through an iface of ours (`rd-<name hash>`) carrying that name, so
    the target's ACL sees this host's IQN whatever /etc/iscsi/initiatorname.iscsi says. CHAP goes into the
    node record (`node.session.auth.*`), the one place iscsid reads it from; logout deletes the record."""

    def __init__(self, runner: Runner = run, by_path: str = "/dev/disk/by-path") -> None:
        self._run = runner
        self.by_path = by_path

    def _iscsiadm(self, *args: str, check: bool = True) -> Result:
        return self._run(["iscsiadm", *args], timeout=60, check=check)

    @staticmethod
    def iface_for(initiator_iqn: str) -> str:
        import hashlib
        return "rd-" + hashlib.sha256(initiator_iqn.encode()).hexdigest()[:10]

    def _ensure_iface(self, initiator_iqn: str) -> list[str]:
        if not initiator_iqn:
            return []
        iface = self.iface_for(initiator_iqn)
        self._iscsiadm("-m", "iface", "-I", iface, "--op", "new", check=False)  # exists already: fine
        self._iscsiadm("-m", "iface", "-I", iface, "--op", "update", "-n", "iface.initiatorname",
                       "-v", initiator_iqn)
        return ["-I", iface]

    def login(self, loc: Locator, initiator_iqn: str = "", chap: Chap | None = None) -> str:
        """Discovers the portal, logs in (idempotent: an existing session is kept), returns the device."""
        iface = self._ensure_iface(initiator_iqn)
        self._iscsiadm("-m", "discovery", "-t", "sendtargets", "-p", loc.portal, *iface)
        node = ["-m", "node", "-T", loc.iqn, "-p", loc.portal, *iface]
        if chap is not None:
            for name, value in (("node.session.auth.authmethod", "CHAP"),
                                ("node.session.auth.username", chap.user),
                                ("node.session.auth.password", chap.secret)):
                self._set_node(node, name, value)
        res = self._iscsiadm(*node, "--login", check=False)
        # 15 = ISCSI_ERR_SESS_EXISTS: already logged in, which is what we want.
        if res.returncode not in (0, 15):
            raise _login_error(loc, initiator_iqn, res.returncode, res.stderr.strip()[:300])
        return self.device_path(loc)

    def _set_node(self, node: list[str], name: str, value: str) -> None:
        # Not through the runner for the password: its log and errors carry argv.
        argv = ["iscsiadm", *node, "--op", "update", "-n", name, "-v", value]
        if name.endswith("password"):
            proc = subprocess.run(argv, capture_output=True, timeout=60, check=False)
            if proc.returncode != 0:
                raise FailedPrecondition("iscsiadm could not store the CHAP secret: "
                                         f"{proc.stderr.decode(errors='replace').strip()[:200]}", field="chap")
        else:
            self._run(argv, timeout=60)

    def logout(self, loc: Locator, initiator_iqn: str = "") -> None:
        iface = ["-I", self.iface_for(initiator_iqn)] if initiator_iqn else []
        node = ["-m", "node", "-T", loc.iqn, "-p", loc.portal, *iface]
        res = self._iscsiadm(*node, "--logout", check=False)
        # 21 = ISCSI_ERR_NO_OBJS_FOUND: no session, already logged out.
        if res.returncode not in (0, 21):
            raise FailedPrecondition(f"iscsi logout from {loc} failed: {res.stderr.strip()[:300]}",
                                     field="locator")
        if initiator_iqn:  # the node record holds the CHAP secret: it goes with the session
            self._iscsiadm(*node, "--op", "delete", check=False)

    def rescan(self, loc: Locator, initiator_iqn: str = "") -> None:
        """Makes the kernel re-read the LUN's capacity after the target grew it."""
        iface = ["-I", self.iface_for(initiator_iqn)] if initiator_iqn else []
        self._iscsiadm("-m", "node", "-T", loc.iqn, "-p", loc.portal, *iface, "-R")

    def device_path(self, loc: Locator) -> str:
        return os.path.join(self.by_path, f"ip-{loc.portal}-iscsi-{loc.iqn}-lun-{loc.lun}")

"""The user-space iSCSI initiator: one qemu-storage-daemon per volume opens the LUN with libiscsi and exports
it as a FUSE file, which a loop device then mounts. Used where the kernel has no iscsi_tcp (as on the
development machines); the kernel initiator (open-iscsi) is reddwarf.hostd.iscsi.Initiator.

Each session lives in `<run_dir>/<volume id>/`: the FUSE file `lun.raw`, the pid file and the QMP socket.
qemu-storage-daemon daemonizes, so a session outlives a hostd restart; the next hostd finds it there. The CHAP
secret reaches qemu as a 0600 file (a `secret` object) that is deleted as soon as the daemon is up; it is
kept nowhere else on the host.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import time

from reddwarf.common.errors import FailedPrecondition, PermissionDenied, Unavailable
from reddwarf.common.runner import CommandError, Result, run

from .iscsi import Chap, Locator

log = logging.getLogger("reddwarf.hostd.qsd")

BINARY = "qemu-storage-daemon"
LOGIN_TIMEOUT = 15  # libiscsi's own timeout; the daemon's start is bounded at twice that


def available() -> bool:
    """qemu-storage-daemon with libiscsi (qemu-block-extra) and FUSE."""
    if shutil.which(BINARY) is None or not os.path.exists("/dev/fuse"):
        return False
    return any(os.path.exists(os.path.join(d, "block-iscsi.so"))
               for d in ("/usr/lib/x86_64-linux-gnu/qemu", "/usr/lib/aarch64-linux-gnu/qemu", "/usr/lib/qemu"))


def _alive(pid: int, marker: str) -> bool:
    """pid is a qemu-storage-daemon serving `marker` (its export file): a recycled pid does not count."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return False
    return bool(args) and os.path.basename(args[0].decode(errors="replace")) == BINARY \
        and any(marker.encode() in a for a in args)


def _pids_serving(marker: str) -> list[int]:
    """Every qemu-storage-daemon for this export file, with or without a pid file (a daemon still in its
    login has written none yet)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _alive(int(p), marker)]


def probe_portal(portal: str, timeout: float = 5.0) -> None:
    """Unavailable naming the portal unless something accepts a TCP connection there: a SAN node that is
    down fails in seconds with a clear error, not after libiscsi's connect retries."""
    host, _, port = portal.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise Unavailable(f"the SAN node at {portal} is unreachable: {exc.strerror or exc}",
                          field="locator") from None


def _fuse_mounted(path: str) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path and line.split()[2].startswith("fuse") for line in f)


def _login_error(portal: str, initiator_iqn: str, stderr: str) -> Exception:
    """What libiscsi said, as the error the caller can act on."""
    text = stderr.strip().splitlines()[-1][-300:] if stderr.strip() else "no output"
    if "Authentication failure" in stderr:
        return PermissionDenied(f"the SAN node at {portal} refused the CHAP credentials: {text}", field="chap")
    if "Target not found" in stderr or "Authorization failure" in stderr:
        return PermissionDenied(f"the SAN node at {portal} does not admit initiator {initiator_iqn}: {text}",
                                field="locator")
    if any(k in stderr for k in ("connect", "Connection", "timed out", "No route", "unreachable")):
        return Unavailable(f"the SAN node at {portal} is unreachable: {text}", field="locator")
    return FailedPrecondition(f"iSCSI login to {portal} failed: {text}", field="locator")


class QmpClient:
    """A minimal QMP conversation over the daemon's unix socket (greeting, capabilities, one command)."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rw")
        self.file.readline()  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        self.file.write(json.dumps({"execute": command, "arguments": arguments}) + "\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise FailedPrecondition(f"qemu-storage-daemon closed QMP during {command}", field="id")
            reply = json.loads(line)
            if "event" in reply:
                continue
            if "error" in reply:
                raise FailedPrecondition(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}",
                                         field="id")
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
            self.sock.close()


class UserspaceInitiator:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        os.makedirs(run_dir, mode=0o700, exist_ok=True)

    def _dir(self, vid: str) -> str:
        return os.path.join(self.run_dir, vid)

    def device_path(self, vid: str) -> str:
        return os.path.join(self._dir(vid), "lun.raw")

    def _qmp_path(self, vid: str) -> str:
        return os.path.join(self._dir(vid), "qmp.sock")

    def pid(self, vid: str) -> int:
        """The live daemon of this volume's session, 0 when none."""
        try:
            with open(os.path.join(self._dir(vid), "qsd.pid")) as f:
                pid = int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0
        return pid if pid and _alive(pid, self.device_path(vid)) else 0

    def sessions(self) -> list[str]:
        return sorted(v for v in os.listdir(self.run_dir) if self.pid(v))

    def locator(self, vid: str) -> str:
        try:
            with open(os.path.join(self._dir(vid), "locator")) as f:
                return f.read().strip()
        except OSError:
            return ""

    def has_session(self, vid: str) -> bool:
        return bool(self.pid(vid)) and _fuse_mounted(self.device_path(vid))

    def login(self, vid: str, loc: Locator, initiator_iqn: str, chap: Chap) -> str:
        """Opens a session (idempotent: a live one is kept) and returns the FUSE file that is the LUN."""
        if self.has_session(vid):
            return self.device_path(vid)
        self.logout(vid)  # whatever a dead daemon left
        probe_portal(loc.portal)
        d = self._dir(vid)
        os.makedirs(d, mode=0o700, exist_ok=True)
        dev = self.device_path(vid)
        with open(dev, "wb"):
            pass  # a FUSE export mounts over an existing regular file
        secret_path = os.path.join(d, "chap.secret")
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(chap.secret)
        host, _, port = loc.portal.rpartition(":")
        argv = [BINARY, "--daemonize", "--pidfile", os.path.join(d, "qsd.pid"),
                "--object", f"secret,id=chap,file={secret_path}",
                "--blockdev", ",".join([
                    "driver=iscsi", "transport=tcp", f"portal={host}:{port}", f"target={loc.iqn}",
                    f"lun={loc.lun}", f"initiator-name={initiator_iqn}", f"user={chap.user}",
                    "password-secret=chap", f"timeout={LOGIN_TIMEOUT}", "node-name=lun", "cache.direct=on"]),
                "--export", f"type=fuse,id=export,node-name=lun,mountpoint={dev},writable=on",
                "--chardev", f"socket,id=qmp,path={self._qmp_path(vid)},server=on,wait=off",
                "--monitor", "chardev=qmp,mode=control"]
        proc: Result | None = None
        try:
            proc = run(argv, timeout=2 * LOGIN_TIMEOUT + 10, check=False)
        except CommandError:
            pass  # timed out: reported below
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(secret_path)  # qemu read it at start; nothing on disk holds the secret now
        if proc is None or proc.returncode != 0 or not self.has_session(vid):
            stderr = "timed out connecting" if proc is None else proc.stderr
            self.logout(vid)
            raise _login_error(loc.portal, initiator_iqn, stderr)
        with open(os.path.join(d, "locator"), "w") as f:  # what this session is of, for reconciliation
            f.write(str(loc))
        log.info("iscsi session opened (user-space)", extra={"volume": vid, "target": loc.iqn,
                                                            "pid": self.pid(vid)})
        return dev

    def resize(self, vid: str, size_bytes: int) -> None:
        """Makes the session see the LUN's new size (after the target grew it)."""
        qmp = QmpClient(self._qmp_path(vid))
        try:
            qmp.execute("block_resize", **{"node-name": "lun", "size": size_bytes})
        finally:
            qmp.close()
        # The kernel caches a FUSE file's attributes for a moment: wait until the new size shows, or losetup
        # and resize2fs would still see the old one.
        deadline = time.monotonic() + 10
        while os.stat(self.device_path(vid)).st_size != size_bytes:
            if time.monotonic() > deadline:
                raise FailedPrecondition(f"the LUN of volume {vid} did not show its new size", field="size_gb")
            time.sleep(0.1)

    def logout(self, vid: str) -> None:
        """Ends the session: the daemon quits (unmounting its FUSE export) and its directory goes."""
        d = self._dir(vid)
        marker = self.device_path(vid)
        pids = _pids_serving(marker)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while any(_alive(p, marker) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid, marker):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        if _fuse_mounted(self.device_path(vid)):  # a killed daemon leaves its mount behind
            run(["umount", "-l", self.device_path(vid)], timeout=30, check=False)
        if os.path.isdir(d):
            shutil.rmtree(d, ignore_errors=True)
            log.info("iscsi session closed (user-space)", extra={"volume": vid})

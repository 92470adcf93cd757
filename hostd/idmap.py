"""An id range of its own for each container (LXD's security.idmap.isolated): root in one container is not
the same host uid as root in its neighbour.

The template stays as debootstrap made it (owned by ids 0..65535); each container sees it through an
idmapped, read-only bind mount (mount_setattr(MOUNT_ATTR_IDMAP), Linux 5.12+; overlayfs accepts such a
mount as its lower layer from 5.19) that shows those files as the container's range, so no copy or chown
of the template is made per range. The mount is made by hostd in the host's mount namespace, outside the
container's dir (lxc-destroy never walks into it), in well under a millisecond.

Ranges are handed out machine-wide (every hostd on the machine, and every test's hostd, shares one
registry directory), one file per range naming its owner's container dir; a range whose owner is gone
is taken again.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import subprocess
import time

RANGE = 65536
ISOLATED_BASE = 100_000_000           # above template.IDMAP_BASE's shared range, below the sandbox's (2e9)
RANGES = 10_000                       # 100,000,000 .. 755,360,000
REGISTRY = "/var/lib/reddwarf/idmaps"

_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC = 1, 0o2000000
_AT_EMPTY_PATH, _AT_FDCWD, _MOVE_MOUNT_F_EMPTY_PATH = 0x1000, -100, 0x4
_MOUNT_ATTR_RDONLY, _MOUNT_ATTR_NODEV, _MOUNT_ATTR_IDMAP = 0x1, 0x4, 0x100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


def subid_range() -> tuple[int, int]:
    """What /etc/subuid and /etc/subgid must give root for isolated ranges."""
    return ISOLATED_BASE, RANGE * RANGES


def _owner_alive(owner: str) -> bool:
    return os.path.exists(os.path.join(owner, "config"))


def allocate(owner: str, registry: str = REGISTRY) -> int:
    """The base of `owner`'s range (its container dir): the one it already holds, else the first free one."""
    os.makedirs(registry, mode=0o700, exist_ok=True)
    with open(os.path.join(registry, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held: dict[int, str] = {}
        for entry in os.listdir(registry):
            if entry.isdigit():
                with open(os.path.join(registry, entry)) as f:
                    held[int(entry)] = f.read().strip()
        for k, who in held.items():
            if who == owner:
                return ISOLATED_BASE + k * RANGE
        for k in range(RANGES):
            if k not in held or not _owner_alive(held[k]):
                with open(os.path.join(registry, f"{k}.new"), "w") as f:
                    f.write(owner + "\n")
                os.replace(os.path.join(registry, f"{k}.new"), os.path.join(registry, str(k)))
                return ISOLATED_BASE + k * RANGE
    raise RuntimeError(f"all {RANGES} isolated id ranges are in use")


def release(owner: str, registry: str = REGISTRY) -> None:
    with contextlib.suppress(FileNotFoundError), open(os.path.join(registry, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for entry in os.listdir(registry):
            if entry.isdigit():
                path = os.path.join(registry, entry)
                with open(path) as f:
                    if f.read().strip() == owner:
                        os.unlink(path)


def is_isolated(base: int) -> bool:
    return ISOLATED_BASE <= base < ISOLATED_BASE + RANGE * RANGES and (base - ISOLATED_BASE) % RANGE == 0


def _userns_fd(base: int) -> int:
    """A user namespace mapping 0..RANGE-1 onto base.. (held by a short-lived child; root writes its maps
    directly, so no newuidmap or /etc/subuid entry is involved)."""
    # Not the runner: this child must live while its namespace is opened, and is killed right after.
    child = subprocess.Popen(["unshare", "--user", "--", "sleep", "30"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ours = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 5
        while os.readlink(f"/proc/{child.pid}/ns/user") == ours:  # until unshare has run
            if time.monotonic() > deadline or child.poll() is not None:
                raise OSError("could not make a user namespace for the id-mapped mount")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{child.pid}/{name}", "w") as f:
                f.write(f"0 {base} {RANGE}\n")
        return os.open(f"/proc/{child.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        child.kill()
        child.wait()


def is_mounted(path: str) -> bool:
    """Whether something is mounted at `path` (os.path.ismount cannot tell a bind mount of the same
    filesystem from a plain dir)."""
    target = os.path.realpath(path).encode().replace(b" ", b"\\040")
    with open("/proc/self/mountinfo", "rb") as f:
        return any(line.split()[4] == target for line in f)


def mount_idmapped(source: str, target: str, base: int) -> None:
    """Binds `source` read-only at `target` with its ids 0..RANGE-1 shown as base.. (a no-op when `target`
    is already a mount)."""
    if is_mounted(target):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    nsfd = _userns_fd(base)
    try:
        tree = libc.syscall(_SYS_OPEN_TREE, _AT_FDCWD, source.encode(), _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC)
        if tree < 0:
            raise OSError(ctypes.get_errno(), f"open_tree {source}: {os.strerror(ctypes.get_errno())}")
        try:
            attr = _MountAttr(_MOUNT_ATTR_IDMAP | _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NODEV, 0, 0, nsfd)
            if libc.syscall(_SYS_MOUNT_SETATTR, tree, b"", _AT_EMPTY_PATH, ctypes.byref(attr),
                            ctypes.sizeof(attr)) != 0:
                raise OSError(ctypes.get_errno(), f"mount_setattr (idmap) {source}: "
                                                  f"{os.strerror(ctypes.get_errno())}")
            os.makedirs(target, mode=0o755, exist_ok=True)
            if libc.syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target.encode(), _MOVE_MOUNT_F_EMPTY_PATH) != 0:
                raise OSError(ctypes.get_errno(), f"move_mount {target}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(tree)
    finally:
        os.close(nsfd)


def unmount(target: str) -> None:
    while is_mounted(target):
        subprocess.run(["umount", target], check=True, capture_output=True, timeout=60)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(target)

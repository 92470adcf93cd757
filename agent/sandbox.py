"""`python -m reddwarf.agent.sandbox HOST_DIR`: the throw-away sandbox a proof restore runs in.

hostd (and only in tests, the control server) runs it through `launch`, in two stages, so that nothing a
tenant wrote is ever opened by a process that is root on the host:

1. In cgroups of its own (memory, cpu, pids: `Limits`, made by `launch` and removed after it) and a new
   mount namespace (`sandbox_argv`), still host root: mounts a private tmpfs on /run and binds HOST_DIR (the
   chain's files and spec.json) at /run/reddwarf-sandbox; hides every secret path named in
   HOST_DIR/sandbox.json (the server's state dir, PKI, KEK, database, config: a tmpfs over a directory,
   /dev/null over a file), puts empty tmpfs on /tmp, /var/tmp, /dev/shm, /root, /home and the like, and
   makes every disk read-only. Then it execs util-linux `unshare` for stage 2 (`inner_argv`).
2. A user namespace whose ids 0..65535 are host ids IDMAP_BASE.. (a range of their own, apart from the
   instance containers' and from every real user; /etc/subuid gives it to root), and new mount, network
   (a down loopback only), pid, ipc, uts and cgroup namespaces with a fresh /proc. Its pid 1 drops to
   INNER_UID (host SANDBOX_UID: no groups, an empty bounding set, no_new_privs, SIGKILL when unshare dies),
   installs a seccomp filter (`seccomp_program`) and execs `reddwarf.agent.verify`. Even the namespace's root is an unmapped nobody to every host file.

What it still shares with the host: the kernel, a read-only view of /usr, /etc and the like (as a uid
that owns nothing there), and the disk HOST_DIR is on. The memory cgroup also caps swap when the kernel
accounts it, so a hostile restore cannot push a host into swap; the cpu cgroup gives it a fraction of one
core's weight and at most `cpu_quota_pct` of one core; pids caps its threads (mariadbd's count).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import importlib.util
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from reddwarf.common.runner import Result, run_async
from reddwarf.common.subids import ensure_subids

SANDBOX_ROOT = "/run/reddwarf-sandbox"   # where HOST_DIR appears inside the sandbox
IDMAP_BASE = 2_000_000_000               # the user namespace's ids 0..IDMAP_SIZE-1 on the host
IDMAP_SIZE = 65536
INNER_UID = 1000                         # what verify runs as inside; no passwd entry, no groups
SANDBOX_UID = IDMAP_BASE + INNER_UID     # the same uid as the host sees it: owns nothing on the host
SPEC = "spec.json"
CONFIG = "sandbox.json"
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "reddwarf-sandbox-"
_V1_CONTROLLERS = ("memory", "cpu", "pids")
# Empty tmpfs on these as well: world-writable places and homes.
ALWAYS_HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/etc/reddwarf", "/var/lib/reddwarf",
                 "/var/lib/lxc", "/var/cache/lxc", "/var/lib/mysql", "/var/lib/vz", "/var/backups", "/var/log",
                 "/var/crash", "/srv", "/mnt", "/media")
_DISK_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "overlay", "f2fs", "nfs", "nfs4", "9p", "virtiofs")
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_PR_CAPBSET_DROP = 24


@dataclass(frozen=True)
class Limits:
    """The sandbox's cgroup limits. A scratch mariadbd on a restored chain needs a few hundred MiB (its
    default buffer pool is 128 MiB) and a few dozen threads."""
    memory_mb: int = 1024
    cpu_shares: int = 256        # a quarter of an instance's default weight (1024): tenants come first
    cpu_quota_pct: int = 100     # at most one core
    pids: int = 512


def sandbox_argv(host_dir: str) -> list[str]:
    """Stage 1, run by `launch` as root: a private mount namespace, then the sandbox's setup."""
    return ["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-m",
            "reddwarf.agent.sandbox", host_dir]


def inner_argv(host_dir: str) -> list[str]:
    """Stage 2, exec'd by stage 1: the user namespace and the rest, with a fresh /proc."""
    return ["unshare", "--user", f"--map-users={IDMAP_BASE},0,{IDMAP_SIZE}",
            f"--map-groups={IDMAP_BASE},0,{IDMAP_SIZE}", "--setuid", "0", "--setgid", "0",
            "--mount", "--net", "--pid", "--ipc", "--uts", "--cgroup", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--", sys.executable, "-m", "reddwarf.agent.sandbox", "--inner", host_dir]


def new_stage(parent: str) -> str:
    """A fresh staging dir for one proof (root-only until `prove` hands it to the sandbox uid)."""
    os.makedirs(parent, mode=0o700, exist_ok=True)
    stage = tempfile.mkdtemp(prefix="verify-", dir=parent)
    os.mkdir(os.path.join(stage, "in"), 0o700)
    return stage


def input_path(stage: str, link: int) -> str:
    """Where the caller writes link `link` (0 = the full backup) of the chain before `prove`."""
    return os.path.join(stage, "in", f"{link:03d}.bin")


async def prove(stage: str, ids: Sequence[str], sha256s: Sequence[str], expected: dict[str, int] | None,
                max_extract_bytes: int, hide: Sequence[str], timeout: float, uid: int = SANDBOX_UID,
                limits: Limits | None = None) -> dict[str, Any]:
    """Runs reddwarf.agent.verify in the sandbox on the chain staged in `stage` (by `input_path`) and returns
    {ok, detail, checksums}. The caller (the server, or hostd for ProveBackup) removes `stage` afterwards."""
    files = [f"{SANDBOX_ROOT}/in/{i:03d}.bin" for i in range(len(ids))]
    with open(os.path.join(stage, SPEC), "w") as f:
        json.dump({"files": files, "ids": list(ids), "sha256s": list(sha256s), "checksums": expected,
                   "scratch_dir": SANDBOX_ROOT, "max_extract_bytes": max_extract_bytes}, f)
    limits = limits or Limits()
    res, oom_kills = await launch(stage, {"uid": uid, "hide": [os.path.abspath(p) for p in hide if p]}, limits,
                                  timeout)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        why = res.stderr.strip()[-500:]
        if oom_kills:
            why = f"killed at its memory limit ({limits.memory_mb} MiB); {why}"
        return {"ok": False, "checksums": {}, "detail": f"the restore sandbox failed (exit {res.returncode}): {why}"}
    return proof_result(lines[-1])


async def launch(stage: str, config: dict[str, Any], limits: Limits, timeout: float) -> tuple[Result, int]:
    """Runs the sandbox on `stage` with `config` (uid, hide, and for the hostile tests' look from inside a
    probe) in cgroups made for it, and removes the cgroups (killing whatever is left in them) after.
    Returns the run and how many of its processes the memory limit killed."""
    name = cgroup_name(stage)
    await asyncio.to_thread(ensure_subids, IDMAP_BASE, IDMAP_SIZE)
    try:
        dirs = await asyncio.to_thread(make_cgroups, name, limits)
        with open(os.path.join(stage, CONFIG), "w") as f:
            json.dump({**config, "cgroups": dirs}, f)
        await asyncio.to_thread(chown_tree, stage, int(config.get("uid", SANDBOX_UID)))
        res = await run_async(sandbox_argv(stage), timeout=timeout, check=False)
        return res, await asyncio.to_thread(oom_kills, name)
    finally:
        await asyncio.to_thread(remove_cgroups, name)


def proof_result(line: str) -> dict[str, Any]:
    """The sandbox's one JSON line, checked for shape: what ran there handled a tenant's data."""
    try:
        out = json.loads(line)
        ok, detail, sums = out["ok"], out["detail"], out["checksums"]
        if not isinstance(ok, bool) or not isinstance(detail, str) or not isinstance(sums, dict) \
                or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                           for k, v in sums.items()):
            raise TypeError("unexpected shape")
    except (ValueError, KeyError, TypeError) as exc:
        return {"ok": False, "checksums": {}, "detail": f"the restore sandbox gave no readable result ({exc})"}
    return {"ok": ok, "detail": detail[:2000], "checksums": sums}


def chown_tree(path: str, uid: int) -> None:
    """The staged chain belongs to the sandbox uid (it reads it and unpacks beside it); root still removes it."""
    os.chown(path, uid, uid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, uid)


# ---------------------------------------------------------------------------------------------- cgroups

def cgroup_name(stage: str) -> str:
    return CGROUP_PREFIX + os.path.basename(os.path.normpath(stage))


def _cgroup_v2(root: str = CGROUP_ROOT) -> bool:
    return not os.path.isdir(os.path.join(root, "memory")) and os.path.exists(os.path.join(root, "cgroup.controllers"))


def cgroup_dirs(name: str, root: str = CGROUP_ROOT) -> list[str]:
    """The sandbox's cgroup directories (one per v1 controller, or the one v2 group)."""
    if _cgroup_v2(root):
        return [os.path.join(root, name)]
    return [os.path.join(root, c, name) for c in _V1_CONTROLLERS if os.path.isdir(os.path.join(root, c))]


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def make_cgroups(name: str, limits: Limits, root: str = CGROUP_ROOT) -> list[str]:
    """Makes the sandbox's cgroups with `limits` set; returns their directories. Memory, cpu and pids are
    required: a sandbox without its limits does not start."""
    dirs = cgroup_dirs(name, root)
    memory = limits.memory_mb * 1024 * 1024
    quota = limits.cpu_quota_pct * 1000  # of a 100 ms period
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    if _cgroup_v2(root):
        (d,) = dirs
        _write(os.path.join(d, "memory.max"), str(memory))
        with contextlib.suppress(FileNotFoundError):
            _write(os.path.join(d, "memory.swap.max"), "0")
        _write(os.path.join(d, "cpu.weight"), str(1 + ((limits.cpu_shares - 2) * 9999) // 262142))
        _write(os.path.join(d, "cpu.max"), f"{quota} 100000")
        _write(os.path.join(d, "pids.max"), str(limits.pids))
        return dirs
    by = {os.path.basename(os.path.dirname(d)): d for d in dirs}
    if set(by) != set(_V1_CONTROLLERS):
        raise OSError(f"cgroup v1 controllers missing under {root}: need {', '.join(_V1_CONTROLLERS)}")
    _write(os.path.join(by["memory"], "memory.limit_in_bytes"), str(memory))
    with contextlib.suppress(FileNotFoundError):  # swap accounting: not on every kernel
        _write(os.path.join(by["memory"], "memory.memsw.limit_in_bytes"), str(memory))
    _write(os.path.join(by["cpu"], "cpu.shares"), str(limits.cpu_shares))
    _write(os.path.join(by["cpu"], "cpu.cfs_period_us"), "100000")
    _write(os.path.join(by["cpu"], "cpu.cfs_quota_us"), str(quota))
    _write(os.path.join(by["pids"], "pids.max"), str(limits.pids))
    return dirs


def oom_kills(name: str, root: str = CGROUP_ROOT) -> int:
    """How many processes the sandbox's memory limit has killed so far."""
    for d in cgroup_dirs(name, root):
        for f in ("memory.oom_control", "memory.events"):
            with contextlib.suppress(FileNotFoundError):
                with open(os.path.join(d, f)) as fh:
                    counts = dict(line.split() for line in fh if len(line.split()) == 2)
                return int(counts.get("oom_kill", "0"))
    return 0


def _cgroup_pids(d: str) -> list[int]:
    try:
        with open(os.path.join(d, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def remove_cgroups(name: str, root: str = CGROUP_ROOT, wait: float = 10.0) -> None:
    """Kills what is still in the sandbox's cgroups and removes them (a no-op when they are gone)."""
    deadline = time.monotonic() + wait
    for d in cgroup_dirs(name, root):
        while os.path.isdir(d):
            for pid in _cgroup_pids(d):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                os.rmdir(d)
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # the killed processes are still exiting


def leftover_cgroups(root: str = CGROUP_ROOT) -> list[str]:
    """Names of sandbox cgroups on this machine (of every hostd or server on it)."""
    base = root if _cgroup_v2(root) else os.path.join(root, "memory")
    try:
        return sorted(e for e in os.listdir(base) if e.startswith(CGROUP_PREFIX))
    except FileNotFoundError:
        return []


def clear(stage_parent: str) -> None:
    """What a killed server or hostd left of its sandboxes under `stage_parent`: the processes killed and
    their cgroups removed (the caller then removes the staged data)."""
    for pid in leftovers(stage_parent):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(stage_parent):
            remove_cgroups(cgroup_name(entry))


def leftovers(stage_parent: str) -> list[int]:
    """Pids of sandboxes (unshare, or the sandbox's pid 1) staged under `stage_parent`: what a killed server
    or hostd left running. Killing the sandbox's pid 1 ends its whole pid namespace."""
    prefix = os.path.abspath(stage_parent).encode() + b"/"
    pids = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix) or a.startswith(b"--origin=" + prefix) for a in argv):
            pids.append(int(pid))
    return pids


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def _needed() -> list[str]:
    """Paths the unprivileged side must still read: the interpreter, its venv and our package."""
    paths = [os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
             os.path.realpath(os.path.dirname(sys.executable))]
    # Each package's own folder: an editable install maps reddwarf.agent, reddwarf.common and reddwarf.v1
    # onto separate folders of a checkout (which may sit under /tmp, hidden below), not under reddwarf's.
    for name in ("reddwarf", "reddwarf.agent", "reddwarf.common", "reddwarf.v1"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            paths += [os.path.realpath(p) for p in spec.submodule_search_locations]
    return sorted({p for p in paths if os.path.isdir(p)})


def _hide(paths: list[str]) -> list[str]:
    """An empty tmpfs over each directory, /dev/null over each file (system dirs are never hidden whole)."""
    hidden: list[str] = []
    for raw in paths:
        path = os.path.realpath(raw)
        if path in ("/", "/usr", "/etc", "/var", "/run", "/proc", "/dev", "/sys") or not os.path.lexists(path):
            continue
        if os.path.isdir(path):
            world = path in ("/tmp", "/var/tmp", "/dev/shm")
            mode = "1777" if world else "0700"
            _mount("-t", "tmpfs", "-o", f"size={'16m' if world else '1m'},mode={mode},nosuid,nodev,noexec",
                   "tmpfs", path)
        else:
            _mount("--bind", "/dev/null", path)
        hidden.append(path)
    return hidden


def _keep(needed: list[str], hidden: list[str], staged: dict[str, str]) -> None:
    """Puts back, read-only, what the unprivileged side needs from under a hidden dir (an interpreter
    installed under /root, say): bound from where it was staged before the hiding."""
    for path, stage in staged.items():
        under = [h for h in hidden if path == h or path.startswith(h + "/")]
        if not under:
            continue
        for h in under:
            os.chmod(h, 0o755)  # the empty tmpfs: traversable, still holding nothing else
        os.makedirs(path, mode=0o755, exist_ok=True)
        _mount("--bind", stage, path)
        _mount("-o", "remount,bind,ro,nosuid,nodev", path)
    for stage in staged.values():
        subprocess.run(["umount", "-l", stage], check=True, capture_output=True, timeout=30)


def _read_only_disks() -> None:
    """Every disk filesystem read-only in this mount namespace (the host's stay as they are): the sandbox
    writes only to its own dir and its tmpfs. `/` must take it; other disk mounts are best effort (the
    unprivileged uid's permissions still hold there)."""
    _mount("-o", "remount,bind,ro,nosuid,nodev", "/")
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    for _dev, point, fstype, *_ in mounts:
        point = point.replace("\\040", " ")
        if fstype in _DISK_FS and point not in ("/", SANDBOX_ROOT) and not point.startswith(SANDBOX_ROOT + "/"):
            subprocess.run(["mount", "-o", "remount,bind,ro,nosuid,nodev", point], capture_output=True, timeout=30)


def _drop(uid: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):  # an empty bounding set: nothing exec'd can ever regain a capability
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP failed")
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS failed")
    # A change of uid clears the parent-death signal unshare's --kill-child set: set it again.
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_PDEATHSIG failed")
    if os.getuid() != uid or os.geteuid() != uid or os.getgroups():
        raise OSError("could not drop to the sandbox uid")


# Syscalls the sandbox never needs and that widen the kernel it can reach (LXC's common.seccomp and Docker's
# default profile deny the same): x86_64 numbers. Namespaces are refused through clone's flags and unshare;
# clone3, whose flags sit behind a pointer, answers ENOSYS so that libc falls back to clone.
_DENIED_SYSCALLS = {
    "mount": 165, "umount2": 166, "pivot_root": 155, "swapon": 167, "swapoff": 168, "reboot": 169, "acct": 163,
    "init_module": 175, "delete_module": 176, "finit_module": 313, "kexec_load": 246, "kexec_file_load": 320,
    "quotactl": 179, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272, "setns": 308,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "perf_event_open": 298, "bpf": 321, "userfaultfd": 323,
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "syslog": 103,
    "lookup_dcookie": 212, "iopl": 172, "ioperm": 173, "settimeofday": 164, "clock_settime": 227,
    "adjtimex": 159, "clock_adjtime": 305, "vhangup": 153, "nfsservctl": 180,
}
_SYS_CLONE, _SYS_CLONE3 = 56, 435
_CLONE_NAMESPACES = 0x7E020000  # NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET
_AUDIT_ARCH_X86_64 = 0xC000003E
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_SockFilter))]


def seccomp_program() -> list[tuple[int, int, int, int]]:
    """The classic-BPF seccomp filter (code, jt, jf, k): EPERM for _DENIED_SYSCALLS, for clone with a
    namespace flag and for x32 calls; ENOSYS for clone3; a foreign architecture is killed."""
    ld_w, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    allow, eperm, enosys, kill = 0x7FFF0000, 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS, 0x80000000
    denied = sorted(set(_DENIED_SYSCALLS.values()))
    # Layout: [arch check][nr checks][ALLOW][EPERM][ENOSYS][KILL][clone: flags][ALLOW][EPERM]
    head = 4  # ld arch, jeq arch, ld nr, jge x32
    n_checks = len(denied) + 2  # + clone, clone3
    i_allow = head + n_checks
    i_eperm, i_enosys, i_kill, i_clone = i_allow + 1, i_allow + 2, i_allow + 3, i_allow + 4
    prog = [(ld_w, 0, 0, 4), (jeq, 0, i_kill - 2, _AUDIT_ARCH_X86_64), (ld_w, 0, 0, 0),
            (jge, i_eperm - 4, 0, 0x40000000)]
    for nr in denied:
        at = len(prog)
        prog.append((jeq, i_eperm - at - 1, 0, nr))
    at = len(prog)
    prog.append((jeq, i_clone - at - 1, 0, _SYS_CLONE))
    at = len(prog)
    prog.append((jeq, i_enosys - at - 1, 0, _SYS_CLONE3))
    prog += [(ret, 0, 0, allow), (ret, 0, 0, eperm), (ret, 0, 0, enosys), (ret, 0, 0, kill),
             (ld_w, 0, 0, 16), (jset, 1, 0, _CLONE_NAMESPACES), (ret, 0, 0, allow), (ret, 0, 0, eperm)]
    return prog


def _seccomp() -> None:
    """Installs seccomp_program on this process (inherited by everything it execs). x86_64 only: elsewhere
    the syscall numbers differ and the sandbox runs without it (said in the log of the run)."""
    if platform.machine() != "x86_64":
        print(f"reddwarf sandbox: no seccomp filter on {platform.machine()}", file=sys.stderr)
        return
    prog = seccomp_program()
    filters = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP failed")


def _config(host_dir: str) -> tuple[dict[str, Any], int]:
    """HOST_DIR/sandbox.json and the uid it names (as the host sees it), which must be in the sandbox's range
    and not its root."""
    with open(os.path.join(host_dir, CONFIG)) as f:
        config = json.load(f)
    uid = int(config.get("uid", SANDBOX_UID))
    if not IDMAP_BASE < uid < IDMAP_BASE + IDMAP_SIZE:
        raise SystemExit(f"the sandbox uid must be in {IDMAP_BASE + 1}..{IDMAP_BASE + IDMAP_SIZE - 1}")
    return config, uid


def _join_cgroups(dirs: list[str]) -> None:
    """Stage 1 moves itself into the cgroups `launch` made: everything it starts is counted there."""
    if not dirs:
        raise SystemExit("the sandbox has no cgroups (see launch)")
    for d in dirs:
        real = os.path.realpath(d)
        if not real.startswith(CGROUP_ROOT + "/") or not os.path.basename(real).startswith(CGROUP_PREFIX):
            raise SystemExit(f"not a sandbox cgroup: {d}")
        _write(os.path.join(real, "cgroup.procs"), str(os.getpid()))


def enter(host_dir: str) -> None:
    """Stage 1, root in a private mount namespace: cgroups joined, secrets hidden, disks read-only; then exec
    stage 2 (the user namespace)."""
    config, uid = _config(host_dir)
    _join_cgroups([str(d) for d in config.get("cgroups", [])])
    _mount("-t", "tmpfs", "-o", "size=4m,mode=0755,nosuid,nodev,noexec", "tmpfs", "/run")
    os.mkdir(SANDBOX_ROOT, 0o700)
    os.chown(SANDBOX_ROOT, uid, uid)
    _mount("--bind", host_dir, SANDBOX_ROOT)
    _mount("-o", "remount,bind,nosuid,nodev,noexec", SANDBOX_ROOT)
    staged: dict[str, str] = {}
    for i, path in enumerate(dict.fromkeys(_needed())):
        stage = f"/run/reddwarf-keep/{i}"
        os.makedirs(stage, mode=0o700)
        _mount("--bind", path, stage)
        staged[path] = stage
    os.umask(0o022)
    hidden = _hide([str(p) for p in config.get("hide", [])])
    hidden += _hide([p for p in ALWAYS_HIDDEN if os.path.realpath(p) not in hidden])
    _keep(list(staged), hidden, staged)
    if staged:
        os.chmod("/run/reddwarf-keep", 0o700)
    _read_only_disks()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of a tenant's data
    resource.setrlimit(resource.RLIMIT_NPROC, (1024, 1024))  # per host uid; the pids cgroup caps the rest
    argv = inner_argv(host_dir)
    os.execvp(argv[0], argv)


def inner(host_dir: str) -> None:
    """Stage 2, pid 1 of the new pid namespace and root of the user namespace: drop to the unprivileged uid
    and exec verify (or the hostile tests' probe)."""
    if os.getpid() != 1:
        raise SystemExit("reddwarf.agent.sandbox --inner must run as pid 1 of a new pid namespace (see inner_argv)")
    config, uid = _config(SANDBOX_ROOT)  # HOST_DIR itself may be under a hidden dir now
    os.chdir(SANDBOX_ROOT)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
           "HOME": SANDBOX_ROOT, "TMPDIR": SANDBOX_ROOT, "PYTHONDONTWRITEBYTECODE": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    argv = [sys.executable, "-m", "reddwarf.agent.verify", "--spec", os.path.join(SANDBOX_ROOT, SPEC),
            f"--origin={host_dir}"]
    if config.get("probe"):  # the hostile tests' look from inside: who am I, what can I read
        argv = [sys.executable, "-m", "reddwarf.agent.sandbox", "--probe", json.dumps(config["probe"]),
                f"--origin={host_dir}"]
    _drop(uid - IDMAP_BASE)
    _seccomp()  # after no_new_privs (_drop): an unprivileged process may install a filter only then
    os.execve(sys.executable, argv, env)


def _interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net/dev follows the caller's namespace)."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])


def _reach(target: str) -> str:
    """Whether a TCP connection to "host:port" opens from here: "connected", or the errno's name."""
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _threads(n: int) -> int:
    """How many of `n` threads could be started at once (the pids cgroup counts threads)."""
    stop = threading.Event()
    started = []
    try:
        for _ in range(n):
            t = threading.Thread(target=stop.wait, daemon=True)
            t.start()
            started.append(t)
    except RuntimeError:  # "can't start new thread": EAGAIN from clone
        pass
    finally:
        stop.set()
    for t in started:
        t.join()
    return len(started)


def _syscalls() -> dict[str, str]:
    """What a few syscalls the filter refuses answer here: "allowed", or the errno's name."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, str] = {}

    def check(name: str, r: int) -> None:
        out[name] = "allowed" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
    check("unshare(CLONE_NEWUSER)", libc.syscall(272, 0x10000000))
    r = libc.syscall(_SYS_CLONE, 0x10000000 | signal.SIGCHLD, 0, 0, 0, 0)  # fork into a new user namespace
    if r == 0:
        os._exit(0)
    if r > 0:
        os.waitpid(r, 0)
    check("clone(CLONE_NEWUSER)", r)
    check("keyctl", libc.syscall(250, 0, 0, 0, 0, 0))
    check("mount", libc.syscall(165, b"none", b"/tmp", b"tmpfs", 0, 0))
    check("ptrace", libc.syscall(101, 16, 1, 0, 0))  # PTRACE_ATTACH to pid 1
    check("perf_event_open", libc.syscall(298, 0, 0, -1, -1, 0))
    return out


def probe(look: dict[str, Any]) -> dict[str, object]:
    """What the sandbox sees: its ids and id map, capabilities, network interfaces, which of look["paths"] it
    can read, whether it can create a file in the host's system directories, which of look["connect"]
    ("host:port") it can reach and how many of look["threads"] threads it can start."""
    readable: dict[str, object] = {}  # a file: whether it could be read; a directory: its listing or False
    for p in look.get("paths", []):
        try:
            if os.path.isdir(p):
                readable[p] = sorted(os.listdir(p))
            else:
                with open(p, "rb") as f:
                    readable[p] = bool(f.read(1))
        except OSError:
            readable[p] = False
    writable: dict[str, bool] = {}
    for d in ("/", "/etc", "/usr", "/var", "/var/lib", "/var/cache", "/opt"):
        try:
            fd = os.open(os.path.join(d, f"reddwarf-probe-{os.getpid()}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError:
            writable[d] = False
        else:
            os.close(fd)
            os.unlink(os.path.join(d, f"reddwarf-probe-{os.getpid()}"))
            writable[d] = True
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    maps = {}
    for m in ("uid_map", "gid_map"):
        with open(f"/proc/self/{m}") as f:
            maps[m] = [line.split() for line in f.read().splitlines()]
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "cap_eff": status.get("CapEff", "").strip(), "cap_bnd": status.get("CapBnd", "").strip(),
            "no_new_privs": status.get("NoNewPrivs", "").strip(), "pid": os.getpid(), **maps,
            "interfaces": _interfaces(), "reach": {t: _reach(t) for t in look.get("connect", [])},
            "threads": _threads(int(look.get("threads", 0))), "syscalls": _syscalls(),
            "seccomp": status.get("Seccomp", "").strip(),
            "readable": readable, "writable": writable}


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--probe":
        look = json.loads(sys.argv[2])
        print(json.dumps(probe(look)), flush=True)
        if look.get("alloc_mb"):  # after the report: a process the memory limit kills says no more
            hog = b"\x01" * (int(look["alloc_mb"]) * 1024 * 1024)
            print(json.dumps({"allocated_mb": len(hog) >> 20}), flush=True)
        time.sleep(float(look.get("hold_s", 0)))  # while the test looks at it from the host
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "--inner":
        inner(sys.argv[2])
        return 1  # not reached: inner execs
    if len(sys.argv) != 2:
        print("usage: python -m reddwarf.agent.sandbox HOST_DIR (as root; see launch)", file=sys.stderr)
        return 2
    enter(sys.argv[1])
    return 1  # not reached: enter execs


if __name__ == "__main__":
    sys.exit(main())

"""`python -m reddwarf.agent.sandbox HOST_DIR`: the throw-away sandbox a proof restore runs in.

The control server starts this under util-linux `unshare --mount --net --pid --ipc --uts --cgroup
--fork --kill-child --mount-proc` (argv from `sandbox_argv`), so it begins as root in new namespaces with only a
down loopback and a fresh /proc. Before any tenant byte is read it: mounts a private tmpfs on /run and binds
HOST_DIR (the chain's files and spec.json, owned by the sandbox uid) at /run/reddwarf-sandbox; hides every
secret path named in HOST_DIR/sandbox.json (the server's state dir, PKI, KEK, database, config: a tmpfs over
a directory, /dev/null over a file) and puts empty tmpfs on /tmp, /var/tmp, /dev/shm, /root and /home; then
drops to the dedicated unprivileged uid (no groups, no capabilities, no_new_privs, SIGKILL when unshare
dies) and execs `reddwarf.agent.verify` there. What it still shares with the server: the kernel, the host's
read-only view of /usr, /etc and the like (as an unprivileged uid), and the disk the scratch dir is on.
"""
from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from reddwarf.common.runner import run_async

SANDBOX_ROOT = "/run/reddwarf-sandbox"   # where HOST_DIR appears inside the sandbox
SANDBOX_UID = 2_000_000_000              # owns nothing on the host; no passwd entry, no groups
SPEC = "spec.json"
CONFIG = "sandbox.json"
# Empty tmpfs on these as well: world-writable places and homes.
ALWAYS_HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/root", "/home", "/etc/reddwarf", "/var/lib/reddwarf",
                 "/var/lib/lxc", "/var/cache/lxc", "/var/lib/mysql", "/var/lib/vz", "/var/backups", "/var/log",
                 "/var/crash", "/srv", "/mnt", "/media")
_DISK_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "overlay", "f2fs", "nfs", "nfs4", "9p", "virtiofs")
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS = 1, 38
_PR_CAPBSET_DROP = 24


def sandbox_argv(host_dir: str) -> list[str]:
    """The command the server runs (as root) to prove a chain staged in `host_dir`."""
    return ["unshare", "--mount", "--net", "--pid", "--ipc", "--uts", "--cgroup", "--fork", "--kill-child", "--mount-proc",
            "--propagation", "private", "--", sys.executable, "-m", "reddwarf.agent.sandbox", host_dir]


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
                max_extract_bytes: int, hide: Sequence[str], timeout: float, uid: int = SANDBOX_UID
                ) -> dict[str, Any]:
    """Runs reddwarf.agent.verify in the sandbox on the chain staged in `stage` (by `input_path`) and returns
    {ok, detail, checksums}. The caller (the server, or hostd for ProveBackup) removes `stage` afterwards."""
    files = [f"{SANDBOX_ROOT}/in/{i:03d}.bin" for i in range(len(ids))]
    with open(os.path.join(stage, SPEC), "w") as f:
        json.dump({"files": files, "ids": list(ids), "sha256s": list(sha256s), "checksums": expected,
                   "scratch_dir": SANDBOX_ROOT, "max_extract_bytes": max_extract_bytes}, f)
    with open(os.path.join(stage, CONFIG), "w") as f:
        json.dump({"uid": uid, "hide": [os.path.abspath(p) for p in hide if p]}, f)
    await asyncio.to_thread(chown_tree, stage, uid)
    res = await run_async(sandbox_argv(stage), timeout=timeout, check=False)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines:
        return {"ok": False, "checksums": {},
                "detail": f"the restore sandbox failed (exit {res.returncode}): {res.stderr.strip()[-500:]}"}
    return proof_result(lines[-1])


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


def enter(host_dir: str) -> None:
    """As root in the fresh namespaces: private mounts, secrets hidden, then exec verify as the sandbox uid."""
    if os.getpid() != 1:
        raise SystemExit("reddwarf.agent.sandbox must run as pid 1 of a new pid namespace (see sandbox_argv)")
    with open(os.path.join(host_dir, CONFIG)) as f:
        config = json.load(f)
    uid = int(config.get("uid") or SANDBOX_UID)
    if uid == 0:
        raise SystemExit("the sandbox uid must not be root")
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
    _read_only_disks()
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
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file of a tenant's data
    resource.setrlimit(resource.RLIMIT_NPROC, (1024, 1024))  # mariadbd threads count here
    _drop(uid)
    os.execve(sys.executable, argv, env)


def _interfaces() -> list[str]:
    """This network namespace's interfaces (/proc/self/net/dev follows the caller's namespace)."""
    with open("/proc/self/net/dev") as f:
        return sorted(line.split(":", 1)[0].strip() for line in f.readlines()[2:])


def probe(paths: list[str]) -> dict[str, object]:
    """What the sandbox sees: its ids, capabilities, network interfaces, which of `paths` it can read and
    whether it can create a file in the host's system directories."""
    readable: dict[str, object] = {}  # a file: whether it could be read; a directory: its listing or False
    for p in paths:
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
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "groups": os.getgroups(),
            "cap_eff": status.get("CapEff", "").strip(), "cap_bnd": status.get("CapBnd", "").strip(),
            "no_new_privs": status.get("NoNewPrivs", "").strip(), "pid": os.getpid(),
            "interfaces": _interfaces(),
            "readable": readable, "writable": writable}


def main() -> int:
    if len(sys.argv) >= 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(json.loads(sys.argv[2]))))
        return 0
    if len(sys.argv) != 2:
        print("usage: python -m reddwarf.agent.sandbox HOST_DIR (under unshare; see sandbox_argv)", file=sys.stderr)
        return 2
    enter(sys.argv[1])
    return 1  # not reached: enter execs


if __name__ == "__main__":
    sys.exit(main())

"""Fake drivers, in the spirit of nova's virt/fake.py: hostd's whole API without root, LXC or loop devices,
so the server's flows can be tested end to end in seconds (`container_driver = "fake"`,
`volume_driver = "fake"` in hostd's settings). Never for real guests.

A fake container is a directory `<lxc_path>/<prefix><id>/` with a `rootfs/` laid out like a guest's
(etc/reddwarf/agent.json, ca.pem, the agent's state dir). "Starting" it runs the real guest agent as an
ordinary child process, in a session of its own (so, like a container, it outlives a hostd restart), with
the agent's fake datastore driver (reddwarf.agent.fake: no mysqld); the agent is the container's "PID 1":
stopping the container ends it, and the container is STOPPED when it dies. A fake volume is a plain
directory `<storage_path>/<id>.vol/`, "mounted" as a symlink under the state dir.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from reddwarf.common.errors import FailedPrecondition, NotFound
from reddwarf.common.runner import CommandError, run

from . import firstboot
from .containers import (
    Beancounter,
    ContainerDriver,
    ContainerSpec,
    ContainerStatus,
    ExecResult,
    Limits,
    Usage,
    VolumeMount,
)
from .settings import Settings
from .volumes import GIB, LocalVolumeDriver, VolumeInfo

log = logging.getLogger("reddwarf.hostd.fake")

MADE = "reddwarf-created"  # written last: a container directory without it is a half-made create
SPEC = "spec.json"  # limits and mount, for set_limits / set_mount and a later start
PIDFILE = "init.pid"  # "<pid> <start time>" of the running agent (the start time guards against pid reuse)
AGENT_LOG = "agent.log"
VOLUME_META = ".reddwarf-volume.json"


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (start time in clock ticks) and whether it is a zombie; "" when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return ""
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return ""
    return fields[19]


def _alive(pid: int, started: str) -> bool:
    return pid > 0 and bool(started) and _start_time(pid) == started


def _read_pidfile(path: str) -> tuple[int, str]:
    try:
        with open(path) as f:
            pid, _, started = f.read().strip().partition(" ")
        return int(pid), started
    except (OSError, ValueError):
        return 0, ""


def _end(pid: int, started: str, timeout: float) -> None:
    """SIGTERM (the agent stops its stream and datastore), SIGKILL after `timeout`; waits for it to go."""
    if not _alive(pid, started):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM if timeout > 0 else signal.SIGKILL)
    deadline = time.monotonic() + max(timeout, 0)
    while _alive(pid, started) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid, started) and time.monotonic() < deadline:
            time.sleep(0.05)


def stop_all(lxc_path: str, prefix: str) -> list[int]:
    """Kills the agents of every fake container under lxc_path with that prefix (test teardown, after the
    hostd is gone: its containers outlive it by design). Returns the pids it ended."""
    ended: list[int] = []
    if not os.path.isdir(lxc_path):
        return ended
    for entry in os.listdir(lxc_path):
        if entry.startswith(prefix):
            pid, started = _read_pidfile(os.path.join(lxc_path, entry, PIDFILE))
            if _alive(pid, started):
                _end(pid, started, 0)
                ended.append(pid)
    return ended


class FakeContainerDriver(ContainerDriver):
    name = "fake"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.path = settings.lxc_path
        os.makedirs(self.path, exist_ok=True)
        # Agents this hostd started: polled so that a dead one is reaped (not left a zombie).
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ layout
    def _dir(self, cid: str) -> str:
        return os.path.join(self.path, self.settings.container_prefix + cid)

    def rootfs(self, cid: str) -> str:
        return os.path.join(self._dir(cid), "rootfs")

    def _in_root(self, cid: str, path: str) -> str:
        return os.path.join(self.rootfs(cid), path.lstrip("/"))

    def agent_config_path(self, cid: str) -> str:
        return self._in_root(cid, firstboot.AGENT_JSON)

    def exists(self, cid: str) -> bool:
        return os.path.isdir(self._dir(cid))

    def _require(self, cid: str) -> None:
        if not os.path.exists(os.path.join(self._dir(cid), MADE)):
            raise NotFound(f"container {cid} does not exist on this host", field="id")

    def _write_json(self, path: str, data: dict[str, object], mode: int = 0o644) -> None:
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)

    def _read_json(self, path: str) -> dict[str, object]:
        with open(path) as f:
            data: dict[str, object] = json.load(f)
        return data

    def _save_spec(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        self._write_json(os.path.join(self._dir(cid), SPEC),
                         {"limits": asdict(limits), "mount": asdict(mount) if mount else None})

    def _datadir(self, cid: str, container_path: str, mount: VolumeMount | None) -> str:
        # The bind mount of a real container: the agent gets the volume's host directory itself.
        return mount.host_path if mount is not None else self._in_root(cid, container_path)

    # ------------------------------------------------------------------ lifecycle
    def create(self, spec: ContainerSpec) -> None:
        if self.exists(spec.id):
            if os.path.exists(os.path.join(self._dir(spec.id), MADE)):
                return
            log.warning("redoing a half-made container", extra={"container": spec.id})
            self.destroy(spec.id)
        try:
            os.makedirs(self.rootfs(spec.id))
            # The very FirstBoot values a real guest gets, with the guest's paths moved under rootfs/.
            bind = "0.0.0.0" if spec.network.mode == "bridge" else spec.network.address
            cfg = json.loads(firstboot.agent_config(spec.bootstrap, spec.network.port, spec.datadir,
                                                    bind).to_json())
            cfg.update(ca_pem_path=self._in_root(spec.id, firstboot.CA_PEM),
                       state_dir=self._in_root(spec.id, firstboot.AGENT_STATE_DIR),
                       datadir=self._datadir(spec.id, spec.datadir, spec.mount),
                       container_datadir=spec.datadir, driver="fake")
            os.makedirs(os.path.dirname(cfg["ca_pem_path"]), exist_ok=True)
            with open(cfg["ca_pem_path"], "w") as f:
                f.write(spec.bootstrap.ca_pem)
            os.makedirs(cfg["state_dir"], mode=0o700, exist_ok=True)
            os.makedirs(cfg["datadir"], exist_ok=True)
            # 0600: it holds the one-time enrollment token.
            self._write_json(self.agent_config_path(spec.id), cfg, 0o600)
            self._save_spec(spec.id, spec.limits, spec.mount)
            with open(os.path.join(self._dir(spec.id), MADE), "w"):
                pass
        except Exception:
            self.destroy(spec.id)
            raise
        log.info("container created", extra={"container": spec.id, "driver": self.name})

    def _argv(self, cid: str) -> list[str]:
        if self.settings.agent_init_cmd:
            return shlex.split(self.settings.agent_init_cmd)
        return [sys.executable, "-m", "reddwarf.agent.main", "--config", self.agent_config_path(cid)]

    def start(self, cid: str) -> ContainerStatus:
        self._require(cid)
        st = self.status(cid)
        if st.state == "RUNNING":
            return st
        d = self._dir(cid)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(os.path.join(d, AGENT_LOG), "ab") as logf:
            proc = subprocess.Popen(self._argv(cid), cwd=self.rootfs(cid), env=env, stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        started = _start_time(proc.pid)
        with open(os.path.join(d, PIDFILE + ".tmp"), "w") as f:
            f.write(f"{proc.pid} {started}\n")
        os.replace(os.path.join(d, PIDFILE + ".tmp"), os.path.join(d, PIDFILE))
        with self._lock:
            self._children[cid] = proc
        log.info("container started", extra={"container": cid, "pid": proc.pid})
        return self.status(cid)

    def stop(self, cid: str, timeout: int) -> ContainerStatus:
        self._require(cid)
        pid, started = _read_pidfile(os.path.join(self._dir(cid), PIDFILE))
        _end(pid, started, timeout)
        self._reap(cid)
        return self.status(cid)

    def destroy(self, cid: str) -> None:
        d = self._dir(cid)
        if not os.path.exists(d):
            return
        pid, started = _read_pidfile(os.path.join(d, PIDFILE))
        _end(pid, started, 0)
        self._reap(cid)
        shutil.rmtree(d)
        log.info("container destroyed", extra={"container": cid})

    def _reap(self, cid: str) -> None:
        with self._lock:
            proc = self._children.get(cid)
            if proc is not None and proc.poll() is not None:
                del self._children[cid]

    def status(self, cid: str) -> ContainerStatus:
        if not os.path.exists(os.path.join(self._dir(cid), MADE)):
            return ContainerStatus("ABSENT")
        self._reap(cid)
        pid, started = _read_pidfile(os.path.join(self._dir(cid), PIDFILE))
        if _alive(pid, started):
            return ContainerStatus("RUNNING", pid)
        return ContainerStatus("STOPPED")

    # ------------------------------------------------------------------ limits, usage, exec
    def set_limits(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        self._require(cid)
        self._save_spec(cid, limits, mount)  # nothing to enforce: recorded, and reported by usage()

    def set_mount(self, cid: str, mount: VolumeMount | None, limits: Limits | None = None) -> None:
        self._require(cid)
        if self.status(cid).state != "STOPPED":
            raise FailedPrecondition(f"container {cid} is running; stop it before changing its volume",
                                     field="container_id")
        if limits is None:
            raise ValueError("limits are needed to rewrite the container config")
        path = self.agent_config_path(cid)
        cfg = self._read_json(path)
        cfg["datadir"] = self._datadir(cid, str(cfg.get("container_datadir", "/var/lib/mysql")), mount)
        os.makedirs(str(cfg["datadir"]), exist_ok=True)
        self._write_json(path, cfg, 0o600)
        self._save_spec(cid, limits, mount)

    def usage(self, cid: str, limits: Limits) -> Usage:
        """The agent process's own memory and CPU time, against the recorded limits."""
        self._require(cid)
        st = self.status(cid)
        if st.state != "RUNNING":
            return Usage(id=cid)
        kv: dict[str, int] = {}
        with contextlib.suppress(OSError), open(f"/proc/{st.init_pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "Threads"):
                    kv[key] = int(value.split()[0])
        cpu_ns = 0
        with contextlib.suppress(OSError, IndexError, ValueError), open(f"/proc/{st.init_pid}/stat") as f:
            stat = f.read()
            fields = stat[stat.rindex(")") + 2:].split()
            cpu_ns = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        mem = limits.memory_mb * 1024 * 1024
        rows = (Beancounter("memory", kv.get("VmRSS", 0) * 1024, kv.get("VmHWM", 0) * 1024, mem, mem, 0),
                Beancounter("numproc", kv.get("Threads", 0), kv.get("Threads", 0), limits.max_processes,
                            limits.max_processes, 0),
                Beancounter("cpu", cpu_ns // 1_000_000, cpu_ns // 1_000_000, limits.cpu_limit_millicores,
                            limits.cpu_limit_millicores, 0))
        return Usage(id=cid, beancounters=rows, cpu_usage_ns=cpu_ns)

    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        """Runs argv as an ordinary process in the container's rootfs directory (there is no namespace)."""
        self._require(cid)
        if self.status(cid).state != "RUNNING":
            raise FailedPrecondition(f"container {cid} is not running", field="id")
        try:
            res = run(argv, timeout=timeout or 60, check=False, cwd=self.rootfs(cid))
        except CommandError as exc:
            return ExecResult(124, exc.stdout.encode(), b"timed out: " + shlex.join(argv).encode())
        except OSError as exc:
            return ExecResult(127, b"", str(exc).encode())
        return ExecResult(res.returncode, res.stdout.encode(), res.stderr.encode())

    def list_names(self) -> list[str]:
        prefix = self.settings.container_prefix
        return [e[len(prefix):] for e in sorted(os.listdir(self.path))
                if e.startswith(prefix) and os.path.isdir(os.path.join(self.path, e))]


class FakeVolumeDriver(LocalVolumeDriver):
    """A volume is a directory under the storage path; its size is a number in a file beside the data."""

    name = "fake"
    suffix = ".vol"

    def is_store(self, path: str) -> bool:
        return os.path.isdir(path)

    def _size_gb(self, locator: str) -> int:
        try:
            with open(os.path.join(locator, VOLUME_META)) as f:
                return int(json.load(f)["size_gb"])
        except (OSError, ValueError, KeyError):
            return 0

    def _set_size(self, locator: str, size_gb: int) -> None:
        path = os.path.join(locator, VOLUME_META)
        with open(path + ".tmp", "w") as f:
            json.dump({"size_gb": size_gb}, f)
        os.replace(path + ".tmp", path)

    def create(self, vid: str, size_gb: int) -> VolumeInfo:
        locator = self.locator_for(vid)
        if not os.path.isdir(locator):
            os.makedirs(locator + ".new", exist_ok=True)
            self._set_size(locator + ".new", size_gb)
            os.replace(locator + ".new", locator)
            log.info("fake volume created", extra={"volume": vid, "size_gb": size_gb})
        return self.activate(vid, locator)

    def activate(self, vid: str, locator: str) -> VolumeInfo:
        if not os.path.isdir(locator):
            raise NotFound(f"volume directory {locator} does not exist", field="locator")
        mnt = self.mount_path(vid)
        if os.path.islink(mnt):
            if os.readlink(mnt) != locator:
                raise FailedPrecondition(f"{mnt} already has {os.readlink(mnt)} mounted", field="id")
        else:
            os.symlink(locator, mnt)
        return self.info(vid, locator)

    def deactivate(self, vid: str, locator: str) -> None:
        mnt = self.mount_path(vid)
        if os.path.islink(mnt):
            os.unlink(mnt)

    def delete(self, vid: str, locator: str) -> None:
        self.deactivate(vid, locator)
        if os.path.isdir(locator):
            shutil.rmtree(locator)
            log.info("fake volume deleted", extra={"volume": vid})

    def resize(self, vid: str, locator: str, size_gb: int) -> VolumeInfo:
        if not os.path.isdir(locator):
            raise NotFound(f"volume directory {locator} does not exist", field="locator")
        self._set_size(locator, size_gb)
        return self.info(vid, locator)

    def info(self, vid: str, locator: str) -> VolumeInfo:
        size = self._size_gb(locator)
        mnt = self.mount_path(vid)
        if not (size and os.path.islink(mnt)):
            return VolumeInfo(id=vid, size_gb=size, driver=self.name, locator=locator)
        used = 0
        for root, _, files in os.walk(locator):
            for name in files:
                with contextlib.suppress(OSError):
                    used += os.lstat(os.path.join(root, name)).st_size
        return VolumeInfo(id=vid, size_gb=size, driver=self.name, locator=locator, mount_path=mnt,
                          fs_bytes_total=size * GIB, fs_bytes_used=used)


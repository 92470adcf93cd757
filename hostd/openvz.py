"""The OpenVZ container driver: the same ContainerDriver interface over vzctl/vzlist, with a flavor's Limits
mapped onto User Beancounters (UBC) and the vzctl CPU/IO knobs.

This kernel has no OpenVZ, so the driver takes an injectable `runner` (same signature as common.runner.run)
and the paths it reads and writes (beancounters file, private area root, config dir): tests record the exact
commands and feed it captured `vzlist -j` / `/proc/user_beancounters` output.

Mapping (one page = 4 KiB):
- memory_mb  -> physpages 0:<pages>            (VSwap: RAM limit is the physpages limit)
- swap_mb    -> swappages 0:<pages>
- memory+swap-> privvmpages <pages>:<pages*1.1> (allocation ceiling; limit a little over barrier as UBC
                                                 recommends, so a barrier hit fails mmap, not a running page)
- max_processes -> numproc N:N, max_open_files -> numfile N:N
- cpu_shares -> cpuunits (cgroup's 1024 ~ vzctl's default 1000), cpu_limit_millicores -> cpulimit percent
- io_weight 10..1000 -> ioprio 0..7, io_bytes_per_sec -> iolimit, io_iops -> iopslimit
- the container's root disk -> diskspace <soft>:<hard> (the datadir lives on a separate volume)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound
from reddwarf.common.runner import Result, run

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

log = logging.getLogger("reddwarf.hostd.openvz")

PAGE = 4096
PAGES_PER_MB = 1024 * 1024 // PAGE
UNLIMITED = 9223372036854775807  # what UBC prints for "no limit" on 64-bit kernels
Runner = Callable[..., Result]
AGENT_UNIT = "reddwarf-agent.service"
SAFE_PATH = re.compile(r"^/[A-Za-z0-9_./-]*\Z")

# vzlist's status words -> ours
_STATES = {"running": "RUNNING", "stopped": "STOPPED", "mounted": "STOPPED", "suspended": "FROZEN"}


def parse_beancounters(text: str) -> dict[int, dict[str, Beancounter]]:
    """Parses /proc/user_beancounters: rows grouped under "<uid>:" lines; "dummy" rows dropped. Each row as
    UBC prints it (its own resource name, pages for the *pages rows): usage_from_ubc scales them."""
    out: dict[int, dict[str, Beancounter]] = {}
    ctid: int | None = None
    for raw in text.splitlines():
        parts = raw.split()
        if not parts or parts[0].startswith("Version") or parts[0] == "uid":
            continue
        if parts[0].endswith(":"):
            ctid = int(parts[0][:-1])
            parts = parts[1:]
        if ctid is None or len(parts) != 6 or parts[0] == "dummy":
            continue
        name, *nums = parts
        held, maxheld, barrier, limit, failcnt = (int(n) for n in nums)
        out.setdefault(ctid, {})[name] = Beancounter(name, held, maxheld, barrier, limit, failcnt)
    return out


@dataclass(frozen=True)
class VzEntry:
    """What hostd needs of one `vzlist -j` object."""

    ctid: int
    name: str
    status: str
    ips: tuple[str, ...]
    ubc: dict[str, dict[str, int]]


def parse_vzlist_json(text: str) -> list[VzEntry]:
    entries = []
    for obj in json.loads(text or "[]"):
        ubc = {k: v for k, v in obj.items() if isinstance(v, dict) and "held" in v}
        entries.append(VzEntry(ctid=int(obj["ctid"]), name=obj.get("name") or "",
                               status=obj.get("status", "stopped"), ips=tuple(obj.get("ip") or ()), ubc=ubc))
    return entries


def ctid_for(name: str) -> int:
    """A stable numeric CTID for a container name (vzctl addresses containers by number). Ids 0-100 are
    reserved by OpenVZ; the hash keeps it well inside a signed 32-bit range."""
    return 1000 + int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) % 2_000_000_000


def ubc_args(limits: Limits, diskspace_gb: int) -> list[str]:
    """vzctl set arguments for a flavor's limits."""
    mem = limits.memory_mb * PAGES_PER_MB
    swap = limits.swap_mb * PAGES_PER_MB
    priv = mem + swap
    args = ["--physpages", f"0:{mem}", "--swappages", f"0:{swap}",
            "--privvmpages", f"{priv}:{priv + priv // 10}",
            "--numproc", f"{limits.max_processes}:{limits.max_processes}",
            "--cpuunits", str(max(8, min(500000, limits.cpu_shares * 1000 // 1024))),
            "--cpulimit", str(limits.cpu_limit_millicores // 10),
            "--diskspace", f"{diskspace_gb}G:{diskspace_gb + max(1, diskspace_gb // 10)}G"]
    if limits.max_open_files:
        args += ["--numfile", f"{limits.max_open_files}:{limits.max_open_files}"]
    if limits.io_weight:
        args += ["--ioprio", str(round((limits.io_weight - 10) * 7 / 990))]
    if limits.io_bytes_per_sec:
        args += ["--iolimit", str(limits.io_bytes_per_sec)]
    if limits.io_iops:
        args += ["--iopslimit", str(limits.io_iops)]
    return args


class OpenVzDriver(ContainerDriver):
    name = "openvz"

    def __init__(self, settings: Settings, runner: Runner = run, *,
                 beancounters_path: str = "/proc/user_beancounters", private_root: str = "/vz/private",
                 conf_dir: str = "/etc/vz/conf", diskspace_gb: int = 4) -> None:
        self.settings = settings
        self._run = runner
        self.beancounters_path = beancounters_path
        self.private_root = private_root
        self.conf_dir = conf_dir
        self.diskspace_gb = diskspace_gb

    # ------------------------------------------------------------------ naming
    def container_name(self, cid: str) -> str:
        return self.settings.container_prefix + cid

    def ctid(self, cid: str) -> int:
        return ctid_for(self.container_name(cid))

    def _vz(self, *args: str, timeout: float = 120, check: bool = True) -> Result:
        return self._run(["vzctl", *args], timeout=timeout, check=check)

    def _entries(self, cid: str | None = None) -> list[VzEntry]:
        argv = ["vzlist", "-a", "-j"] + ([str(self.ctid(cid))] if cid else [])
        res = self._run(argv, timeout=30, check=False)
        if res.returncode != 0:
            return []  # vzlist exits non-zero when the asked CTID does not exist
        return parse_vzlist_json(res.stdout)

    def _require(self, cid: str) -> None:
        if self.status(cid).state == "ABSENT":
            raise NotFound(f"container {cid} does not exist on this host", field="id")

    # ------------------------------------------------------------------ lifecycle
    def create(self, spec: ContainerSpec) -> None:
        if self.status(spec.id).state != "ABSENT":
            return
        ct, name = str(self.ctid(spec.id)), self.container_name(spec.id)
        self._vz("create", ct, "--ostemplate", spec.template, "--name", name, "--hostname", name)
        try:
            args = ["set", ct, *ubc_args(spec.limits, self.diskspace_gb)]
            if spec.network.address:
                args += ["--ipadd", spec.network.address]
            self._vz(*args, "--save")
            self._write_mount_script(spec.id, spec.mount)
            config = firstboot.agent_config(spec.bootstrap, spec.network.port, spec.datadir, spec.network.address)
            firstboot.write_firstboot(os.path.join(self.private_root, ct), config, spec.bootstrap.ca_pem)
            self._write_agent_unit(os.path.join(self.private_root, ct))
        except Exception:
            self.destroy(spec.id)
            raise
        log.info("container created", extra={"container": name, "ctid": ct, "driver": "openvz"})

    def start(self, cid: str) -> ContainerStatus:
        self._require(cid)
        if self.status(cid).state != "RUNNING":
            self._vz("start", str(self.ctid(cid)), "--wait")
        return self.status(cid)

    def stop(self, cid: str, timeout: int) -> ContainerStatus:
        self._require(cid)
        if self.status(cid).state != "STOPPED":
            fast = ["--fast"] if timeout <= 0 else []
            self._vz("stop", str(self.ctid(cid)), *fast, timeout=max(timeout, 0) + 60)
        return self.status(cid)

    def destroy(self, cid: str) -> None:
        if self.status(cid).state == "ABSENT":
            return
        ct = str(self.ctid(cid))
        self._vz("stop", ct, "--fast", check=False)
        self._vz("destroy", ct)
        self._write_mount_script(cid, None)

    def status(self, cid: str) -> ContainerStatus:
        entries = [e for e in self._entries(cid) if e.ctid == self.ctid(cid)]
        if not entries:
            return ContainerStatus("ABSENT")
        return ContainerStatus(_STATES.get(entries[0].status, "STOPPED"))

    # ------------------------------------------------------------------ limits, usage, exec, mounts
    def set_limits(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        # vzctl set applies UBC/CPU/IO changes to a running container at once; --save persists them.
        self._require(cid)
        self._vz("set", str(self.ctid(cid)), *ubc_args(limits, self.diskspace_gb), "--save")

    def usage(self, cid: str, limits: Limits) -> Usage:
        self._require(cid)
        try:
            with open(self.beancounters_path) as f:
                rows = parse_beancounters(f.read()).get(self.ctid(cid), {})
        except FileNotFoundError:
            return Usage(id=cid)
        return usage_from_ubc(cid, rows)

    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        self._require(cid)
        if self.status(cid).state != "RUNNING":
            raise FailedPrecondition(f"container {cid} is not running", field="id")
        # exec2 (unlike exec) returns the command's own exit status.
        res = self._vz("exec2", str(self.ctid(cid)), shlex.join(argv), timeout=timeout or 60, check=False)
        return ExecResult(res.returncode, res.stdout.encode(), res.stderr.encode())

    def set_mount(self, cid: str, mount: VolumeMount | None, limits: Limits | None = None) -> None:
        self._require(cid)
        if self.status(cid).state != "STOPPED":
            raise FailedPrecondition(f"container {cid} is running; stop it before changing its volume",
                                     field="container_id")
        self._write_mount_script(cid, mount)

    def _write_agent_unit(self, private: str) -> None:
        """OpenVZ boots the container's own init (no custom PID 1 as with LXC), so the guest agent starts as
        an enabled systemd unit written into the private area."""
        units = os.path.join(private, "etc/systemd/system")
        os.makedirs(os.path.join(units, "multi-user.target.wants"), exist_ok=True)
        env = "".join(f"Environment={e}\n" for e in firstboot.INIT_ENV)
        with open(os.path.join(units, AGENT_UNIT), "w") as f:
            f.write("[Unit]\nDescription=Red Dwarf guest agent\nAfter=network.target\n\n"
                    f"[Service]\n{env}ExecStart={self.settings.agent_init_cmd or firstboot.INIT_CMD}\n"
                    "Restart=always\nRestartSec=2\n\n[Install]\nWantedBy=multi-user.target\n")
        link = os.path.join(units, "multi-user.target.wants", AGENT_UNIT)
        if not os.path.islink(link):
            os.symlink(f"/etc/systemd/system/{AGENT_UNIT}", link)

    def _mount_script(self, cid: str) -> str:
        return os.path.join(self.conf_dir, f"{self.ctid(cid)}.mount")

    def _write_mount_script(self, cid: str, mount: VolumeMount | None) -> None:
        """OpenVZ's way to bind a host directory into a container: a CTID.mount script vzctl runs at every
        start, with VE_ROOT set to the container's root mount."""
        path = self._mount_script(cid)
        if mount is None:
            if os.path.exists(path):
                os.unlink(path)
            return
        if not SAFE_PATH.match(mount.container_path) or not SAFE_PATH.match(mount.host_path):
            # the paths land in a shell script: only plain path characters
            raise InvalidArgument(f"mount path {mount.container_path!r} has characters a mount script cannot "
                                  "carry", field="datadir")
        target = "${VE_ROOT}/" + mount.container_path.lstrip("/")
        script = ("#!/bin/sh\n# written by reddwarf hostd: the instance's data volume\nset -e\n"
                  f"mkdir -p \"{target}\"\n"
                  f"mount -n --bind {shlex.quote(mount.host_path)} \"{target}\"\n")
        os.makedirs(self.conf_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            f.write(script)
        os.chmod(path + ".tmp", 0o755)
        os.replace(path + ".tmp", path)

    def list_names(self) -> list[str]:
        prefix = self.settings.container_prefix
        return sorted(e.name[len(prefix):] for e in self._entries() if e.name.startswith(prefix))


def usage_from_ubc(cid: str, rows: dict[str, Beancounter]) -> Usage:
    """Beancounters in hostd's shape (bytes for memory/swap, counts for processes)."""
    out: list[Beancounter] = []

    def add(resource: str, key: str, scale: int) -> None:
        r = rows.get(key)
        if r is None:
            return
        def scaled(v: int) -> int:
            return v if v >= UNLIMITED or v == 2147483647 else v * scale
        out.append(Beancounter(resource, r.held * scale, r.maxheld * scale, scaled(r.barrier), scaled(r.limit),
                               r.failcnt))

    add("memory", "physpages", PAGE)
    add("swap", "swappages", PAGE)
    add("numproc", "numproc", 1)
    add("privvm", "privvmpages", PAGE)
    add("numfile", "numfile", 1)
    return Usage(id=cid, beancounters=tuple(out))


def vz_commands(argvs: Sequence[Sequence[str]]) -> list[str]:
    """Readable form of recorded commands (for logs and tests)."""
    return [shlex.join(a) for a in argvs]

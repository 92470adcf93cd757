"""Flavor limits mapped onto Linux cgroups (v1 legacy hierarchy and v2), applied live, read back as
beancounters in the shape of /proc/user_beancounters.

The layout is detected once at start (`detect`): v1 when /sys/fs/cgroup/memory is a controller mount,
v2 when /sys/fs/cgroup is cgroup2 with controllers. Only keys whose files exist on this kernel are
emitted (an lxc.cgroup key the kernel lacks makes lxc-start fail).
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from reddwarf.common.errors import Unavailable

from .containers import Beancounter, Limits, Usage

log = logging.getLogger("reddwarf.hostd.cgroups")

MIB = 1024 * 1024
CFS_PERIOD_US = 100_000
UNLIMITED = 2**63 - 1


@dataclass(frozen=True)
class CgroupLayout:
    version: str  # "v1" | "v2"
    root: str = "/sys/fs/cgroup"

    def has(self, key: str) -> bool:
        """Whether the kernel offers this control file (checked on the root's first child or root)."""
        if self.version == "v1":
            controller = key.split(".", 1)[0]
            base = os.path.join(self.root, "cpu" if controller == "cpu" else controller)
            return os.path.exists(os.path.join(base, key))
        if key.startswith(("cpu.", "io.", "memory.", "pids.")):
            ctrls = _read_text(os.path.join(self.root, "cgroup.controllers")).split()
            return key.split(".", 1)[0] in ctrls
        return False

    @property
    def swap_accounting(self) -> bool:
        if self.version == "v1":
            return self.has("memory.memsw.limit_in_bytes")
        return True

    @property
    def lxc_prefix(self) -> str:
        return "lxc.cgroup" if self.version == "v1" else "lxc.cgroup2"


def detect(root: str = "/sys/fs/cgroup") -> CgroupLayout:
    if os.path.isdir(os.path.join(root, "memory")) and os.path.exists(
            os.path.join(root, "memory", "memory.limit_in_bytes")):
        return CgroupLayout("v1", root)
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        return CgroupLayout("v2", root)
    raise RuntimeError(f"no usable cgroup hierarchy under {root}")


def shares_to_weight(shares: int) -> int:
    """cpu.shares (2..262144) onto cpu.weight (1..10000), the same formula systemd and runc use."""
    return 1 + ((shares - 2) * 9999) // 262142


def _devices(device: str) -> list[str]:
    return [d for d in device.split(",") if d]


def disk_of(path: str) -> str:
    """"major:minor" of the whole disk holding `path` (IO throttles apply to disks, not partitions), or ""
    when it is not on a block device (tmpfs, an anonymous overlay device)."""
    dev = os.stat(path).st_dev
    sys_dir = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    if os.major(dev) == 0 or not os.path.isdir(sys_dir):
        return ""
    real = os.path.realpath(sys_dir)
    if os.path.exists(os.path.join(real, "partition")):
        real = os.path.dirname(real)
    try:
        with open(os.path.join(real, "dev")) as f:
            return f.read().strip()
    except OSError:
        return ""


def cgroup_values(layout: CgroupLayout, limits: Limits, device: str = "") -> list[tuple[str, str]]:
    """The (control file, value) pairs for these limits, in a safe write order. `device` is a comma-separated
    list of "major:minor" block devices the container writes to (its data volume, the disk under its root
    filesystem) for per-device throttles: without a weight-aware IO scheduler those caps are the only
    IO isolation there is."""
    mem = limits.memory_mb * MIB
    out: list[tuple[str, str]] = []
    if layout.version == "v1":
        out.append(("memory.limit_in_bytes", str(mem)))
        if layout.swap_accounting:
            out.append(("memory.memsw.limit_in_bytes", str(mem + limits.swap_mb * MIB)))
        out.append(("cpu.shares", str(limits.cpu_shares)))
        out.append(("cpu.cfs_period_us", str(CFS_PERIOD_US)))
        quota = limits.cpu_limit_millicores * CFS_PERIOD_US // 1000 if limits.cpu_limit_millicores else -1
        out.append(("cpu.cfs_quota_us", str(quota)))
        out.append(("pids.max", str(limits.max_processes)))
        if limits.io_weight and layout.has("blkio.weight"):
            out.append(("blkio.weight", str(limits.io_weight)))
        for dev in _devices(device):
            # 0 clears a v1 throttle rule, so unset limits are written as 0 to undo earlier ones live.
            for op in ("read", "write"):
                out.append((f"blkio.throttle.{op}_iops_device", f"{dev} {limits.io_iops}"))
                out.append((f"blkio.throttle.{op}_bps_device", f"{dev} {limits.io_bytes_per_sec}"))
    else:
        out.append(("memory.max", str(mem)))
        out.append(("memory.swap.max", str(limits.swap_mb * MIB)))
        out.append(("cpu.weight", str(shares_to_weight(limits.cpu_shares))))
        quota_v2 = (str(limits.cpu_limit_millicores * CFS_PERIOD_US // 1000)
                    if limits.cpu_limit_millicores else "max")
        out.append(("cpu.max", f"{quota_v2} {CFS_PERIOD_US}"))
        out.append(("pids.max", str(limits.max_processes)))
        if limits.io_weight:
            out.append(("io.weight", f"default {limits.io_weight}"))
        for dev in _devices(device):
            iops = str(limits.io_iops) if limits.io_iops else "max"
            bps = str(limits.io_bytes_per_sec) if limits.io_bytes_per_sec else "max"
            out.append(("io.max", f"{dev} riops={iops} wiops={iops} rbps={bps} wbps={bps}"))
    return out


def lxc_config_lines(layout: CgroupLayout, limits: Limits, device: str = "") -> list[str]:
    lines = [f"{layout.lxc_prefix}.{k} = {v}" for k, v in cgroup_values(layout, limits, device)]
    if limits.max_open_files:
        lines.append(f"lxc.prlimit.nofile = {limits.max_open_files}")
    return lines


def cgroup_dirs(layout: CgroupLayout, pid: int) -> dict[str, str]:
    """controller -> directory of the cgroup `pid` lives in (v2: key "" for the unified one)."""
    dirs: dict[str, str] = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            if layout.version == "v2":
                if ctrls == "":
                    dirs[""] = os.path.join(layout.root, path.lstrip("/"))
                continue
            for c in ctrls.split(","):
                if c in ("memory", "pids", "blkio", "cpuacct", "cpu"):
                    # Controllers may be mounted alone (cpu/, cpuacct/) or co-mounted (cpu,cpuacct/).
                    mount = c if os.path.isdir(os.path.join(layout.root, c)) else ctrls
                    dirs[c] = os.path.join(layout.root, mount, path.lstrip("/"))
    return dirs


def _file(layout: CgroupLayout, dirs: dict[str, str], key: str) -> str:
    if layout.version == "v2":
        return os.path.join(dirs[""], key)
    return os.path.join(dirs[key.split(".", 1)[0]], key)


def apply_live(layout: CgroupLayout, pid: int, limits: Limits, device: str = "") -> None:
    """Writes the limits into the running container's cgroup files (no restart)."""
    try:
        dirs = cgroup_dirs(layout, pid)
    except (FileNotFoundError, ProcessLookupError):
        dirs = {}
    # A container's init that has just died (or is exiting) is gone or shows the root cgroup: never write the
    # host's own limits; the caller retries once the container runs again (hostd restarts it).
    mounts = {os.path.normpath(layout.root)} | {os.path.normpath(os.path.join(layout.root, m))
                                                 for m in (os.listdir(layout.root) if os.path.isdir(layout.root) else ())}
    if not dirs or any(os.path.normpath(d) in mounts for d in dirs.values()):
        raise Unavailable(f"the container's init (pid {pid}) is not running in its cgroup now; retry when it is "
                          "back", field="id")
    pending = cgroup_values(layout, limits, device)
    # memory vs memsw (v1) must keep memsw >= memory at every moment; retrying a failed write after the
    # others resolves either order (lowering writes memory first, raising needs memsw first).
    for _ in range(2):
        failed: list[tuple[str, str]] = []
        for key, value in pending:
            try:
                with open(_file(layout, dirs, key), "w") as f:
                    f.write(value)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EBUSY):
                    raise
                failed.append((key, value))
        if not failed:
            return
        pending = failed
    raise OSError(errno.EINVAL, f"cgroup rejected {pending}")


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _lines(path: str) -> list[str]:
    try:
        return _read_text(path).splitlines()
    except OSError:
        return []


def _read_int(path: str, default: int = 0) -> int:
    try:
        text = _read_text(path).strip()
    except OSError:
        return default
    if text == "max":
        return UNLIMITED
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return default


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in _lines(path):
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _blkio_bytes_v1(path: str) -> tuple[int, int]:
    read = write = 0
    for line in _lines(path):
        parts = line.split()
        if len(parts) == 3 and parts[1] == "Read":
            read += int(parts[2])
        elif len(parts) == 3 and parts[1] == "Write":
            write += int(parts[2])
    return read, write


def read_usage(layout: CgroupLayout, cid: str, pid: int, limits: Limits) -> Usage:
    """Usage of a running container as beancounters read from its real cgroup files."""
    dirs = cgroup_dirs(layout, pid)
    mem_limit = limits.memory_mb * MIB
    swap_limit = limits.swap_mb * MIB
    rows: list[Beancounter] = []
    if layout.version == "v1":
        m = dirs["memory"]
        # A refused charge shows in memory.failcnt or (memsw == memory, no swap) memory.memsw.failcnt, and
        # some kernels do not count it at all when the charge ends in an OOM kill: report the largest.
        failcnt = max(_read_int(f"{m}/memory.failcnt"), _read_int(f"{m}/memory.memsw.failcnt"),
                      _read_kv(f"{m}/memory.oom_control").get("oom_kill", 0))
        rows.append(Beancounter("memory", _read_int(f"{m}/memory.usage_in_bytes"),
                                _read_int(f"{m}/memory.max_usage_in_bytes"), mem_limit, mem_limit, failcnt))
        if layout.swap_accounting:
            memsw = _read_int(f"{m}/memory.memsw.usage_in_bytes")
            rows.append(Beancounter("swap", max(0, memsw - rows[0].held),
                                    max(0, _read_int(f"{m}/memory.memsw.max_usage_in_bytes") - rows[0].maxheld),
                                    swap_limit, swap_limit, _read_int(f"{m}/memory.memsw.failcnt")))
        p = dirs["pids"]
        cpu_ns = _read_int(os.path.join(dirs["cpuacct"], "cpuacct.usage"))
        throttled = _read_kv(os.path.join(dirs["cpu"], "cpu.stat")).get("nr_throttled", 0)
        rd, wr = _blkio_bytes_v1(os.path.join(dirs["blkio"], "blkio.throttle.io_service_bytes"))
    else:
        d = dirs[""]
        events = _read_kv(f"{d}/memory.events")
        rows.append(Beancounter("memory", _read_int(f"{d}/memory.current"),
                                _read_int(f"{d}/memory.peak", _read_int(f"{d}/memory.current")),
                                mem_limit, mem_limit, max(events.get("max", 0), events.get("oom_kill", 0))))
        swap_events = _read_kv(f"{d}/memory.swap.events")
        rows.append(Beancounter("swap", _read_int(f"{d}/memory.swap.current"),
                                _read_int(f"{d}/memory.swap.peak", _read_int(f"{d}/memory.swap.current")),
                                swap_limit, swap_limit, swap_events.get("max", 0)))
        p = d
        cpu_stat = _read_kv(f"{d}/cpu.stat")
        cpu_ns = cpu_stat.get("usage_usec", 0) * 1000
        throttled = cpu_stat.get("nr_throttled", 0)
        rd = wr = 0
        for line in _lines(f"{d}/io.stat"):
            for tok in line.split()[1:]:
                k, _, v = tok.partition("=")
                rd += int(v) if k == "rbytes" else 0
                wr += int(v) if k == "wbytes" else 0
    pids_now = _read_int(f"{p}/pids.current")
    rows.append(Beancounter("numproc", pids_now, _read_int(f"{p}/pids.peak", pids_now), limits.max_processes,
                            limits.max_processes, _read_kv(f"{p}/pids.events").get("max", 0)))
    cap = limits.cpu_limit_millicores
    # cpu: held = CPU time in ms; barrier/limit = the cap in millicores; failcnt = throttled periods.
    rows.append(Beancounter("cpu", cpu_ns // 1_000_000, cpu_ns // 1_000_000, cap, cap, throttled))
    rows.append(Beancounter("blkio", rd + wr, rd + wr, limits.io_bytes_per_sec, limits.io_bytes_per_sec, 0))
    return Usage(id=cid, beancounters=tuple(rows), cpu_usage_ns=cpu_ns, io_read_bytes=rd, io_write_bytes=wr)

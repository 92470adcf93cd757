"""The LXC container driver: overlay snapshots of the OS template, limits as lxc.cgroup keys and live
cgroup writes, the guest agent as the container's PID 1 (no systemd boot).

Every lxc-* command gets `-P <lxcpath>`, so each hostd (and each test) has its own container namespace.
hostd's keys live in a delimited block at the end of the container's config, rewritten as a whole.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shlex

from reddwarf.common.errors import FailedPrecondition, NotFound
from reddwarf.common.runner import CommandError, Result, run

from . import cgroups, firstboot
from .containers import (
    ContainerDriver,
    ContainerSpec,
    ContainerStatus,
    ExecResult,
    Limits,
    NetworkPlan,
    Usage,
    VolumeMount,
)
from .settings import Settings

log = logging.getLogger("reddwarf.hostd.lxc")

BEGIN = "# --- reddwarf hostd (managed; rewritten by hostd) ---"
END = "# --- end reddwarf hostd ---"


class LxcDriver(ContainerDriver):
    name = "lxc"

    def __init__(self, settings: Settings, layout: cgroups.CgroupLayout | None = None) -> None:
        self.settings = settings
        self.layout = layout or cgroups.detect()
        self.path = settings.lxc_path
        os.makedirs(self.path, exist_ok=True)

    # ------------------------------------------------------------------ naming and config
    def container_name(self, cid: str) -> str:
        return self.settings.container_prefix + cid

    def _dir(self, cid: str) -> str:
        return os.path.join(self.path, self.container_name(cid))

    def _config_path(self, cid: str) -> str:
        return os.path.join(self._dir(cid), "config")

    def _lxc(self, tool: str, cid: str, *args: str, timeout: float = 60, check: bool = True) -> Result:
        return run([tool, "-P", self.path, "-n", self.container_name(cid), *args], timeout=timeout,
                   check=check)

    def exists(self, cid: str) -> bool:
        return os.path.exists(self._config_path(cid))

    def _managed_block(self, cid: str, limits: Limits, network: NetworkPlan, mount: VolumeMount | None,
                       ) -> list[str]:
        lines = [BEGIN, f"lxc.uts.name = {self.container_name(cid)}", "lxc.apparmor.profile = unconfined",
                 "lxc.signal.halt = SIGTERM"]
        if network.mode == "bridge":
            lines += ["lxc.net.0.type = veth", f"lxc.net.0.link = {network.bridge}", "lxc.net.0.flags = up",
                      f"lxc.net.0.ipv4.address = {network.address}/{network.prefix_len}"]
            if network.gateway:
                lines.append(f"lxc.net.0.ipv4.gateway = {network.gateway}")
        else:
            lines.append("lxc.net.0.type = none")
        lines.append(f"lxc.init.cmd = {self.settings.agent_init_cmd or firstboot.INIT_CMD}")
        lines += [f"lxc.environment = {e}" for e in firstboot.INIT_ENV]
        if mount is not None:
            # Relative target: LXC mounts it under the container's rootfs; create=dir makes the mountpoint.
            lines.append(f"lxc.mount.entry = {mount.host_path} {mount.container_path.lstrip('/')} none "
                         "bind,create=dir 0 0")
        lines += cgroups.lxc_config_lines(self.layout, limits, self._io_devices(mount))
        lines.append(END)
        return lines

    def _rewrite_config(self, cid: str, block: list[str]) -> None:
        path = self._config_path(cid)
        with open(path) as f:
            text = f.read()
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + text[text.index(END) + len(END):].lstrip("\n")
        kept = [ln for ln in text.splitlines()
                if not ln.startswith(("lxc.net.", "lxc.apparmor.profile", "lxc.init.cmd", "lxc.uts.name"))]
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(kept + block) + "\n")
        os.replace(path + ".tmp", path)

    def _read_block(self, cid: str) -> list[str]:
        with open(self._config_path(cid)) as f:
            text = f.read()
        if BEGIN not in text:
            return []
        return text[text.index(BEGIN):text.index(END) + len(END)].splitlines()

    # ------------------------------------------------------------------ lifecycle
    def _made_marker(self, cid: str) -> str:
        return os.path.join(self._dir(cid), "reddwarf-created")

    def create(self, spec: ContainerSpec) -> None:
        if self.exists(spec.id):
            if os.path.exists(self._made_marker(spec.id)):
                return
            # A create cut off between lxc-copy and FirstBoot (hostd killed): start it over.
            log.warning("redoing a half-made container", extra={"container": self.container_name(spec.id)})
            self.destroy(spec.id)
        tpl_dir = os.path.join(self.settings.template_lxc_path, spec.template)
        if not os.path.exists(os.path.join(tpl_dir, "config")):
            raise FailedPrecondition(f"template {spec.template} is not built on this host",
                                     field="container.template")
        name = self.container_name(spec.id)
        try:
            run(["lxc-copy", "-P", self.settings.template_lxc_path, "-n", spec.template, "-p", self.path,
                 "-N", name, "-s", "-B", "overlayfs"], timeout=120)
            self._rewrite_config(spec.id, self._managed_block(spec.id, spec.limits, spec.network, spec.mount))
            bind = "0.0.0.0" if spec.network.mode == "bridge" else spec.network.address
            config = firstboot.agent_config(spec.bootstrap, spec.network.port, spec.datadir, bind)
            firstboot.write_firstboot(self.upper_dir(spec.id), config, spec.bootstrap.ca_pem)
            with open(self._made_marker(spec.id), "w"):
                pass  # the create is whole only once this exists
        except Exception:
            self.destroy(spec.id)  # no half-made container survives a failed create
            raise
        log.info("container created", extra={"container": name, "template": spec.template})

    def upper_dir(self, cid: str) -> str:
        """The container's own writable layer (overlay upper dir) — where FirstBoot files go."""
        delta = os.path.join(self._dir(cid), "overlay", "delta")
        if os.path.isdir(delta):
            return delta
        return os.path.join(self._dir(cid), "rootfs")

    def start(self, cid: str) -> ContainerStatus:
        self._require(cid)
        st = self.status(cid)
        if st.state == "RUNNING":
            return st
        self._lxc("lxc-start", cid, timeout=60)
        self._lxc("lxc-wait", cid, "-s", "RUNNING", "-t", "10", timeout=20)
        return self.status(cid)

    def stop(self, cid: str, timeout: int) -> ContainerStatus:
        self._require(cid)
        if self.status(cid).state == "STOPPED":
            return ContainerStatus("STOPPED")
        args = ["-t", str(timeout)] if timeout > 0 else ["-k"]
        self._lxc("lxc-stop", cid, *args, timeout=timeout + 30, check=False)
        if self.status(cid).state != "STOPPED":
            self._lxc("lxc-stop", cid, "-k", timeout=30, check=False)
        return self.status(cid)

    def destroy(self, cid: str) -> None:
        if not os.path.exists(self._dir(cid)):
            return
        self._lxc("lxc-stop", cid, "-k", timeout=30, check=False)
        res = self._lxc("lxc-destroy", cid, "-f", timeout=60, check=False)
        if res.returncode != 0 and os.path.exists(self._config_path(cid)):
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        log.info("container destroyed", extra={"container": self.container_name(cid)})

    def status(self, cid: str) -> ContainerStatus:
        if not self.exists(cid):
            return ContainerStatus("ABSENT")
        res = self._lxc("lxc-info", cid, "-s", "-p", check=False)
        if res.returncode != 0:
            return ContainerStatus("STOPPED")
        fields = dict(ln.split(":", 1) for ln in res.stdout.splitlines() if ":" in ln)
        state = fields.get("State", "STOPPED").strip()
        pid_text = fields.get("PID", "0").strip()
        pid = int(pid_text) if pid_text.isdigit() else 0
        if state not in ("RUNNING", "FROZEN"):
            state, pid = "STOPPED", 0
        return ContainerStatus(state, max(0, pid))

    def _require(self, cid: str) -> None:
        if not self.exists(cid):
            raise NotFound(f"container {cid} does not exist on this host", field="id")

    # ------------------------------------------------------------------ limits, usage, exec
    def _io_devices(self, mount: VolumeMount | None) -> str:
        """The disks a container writes to: its data volume's device and the disk under its root filesystem
        (the overlay's upper dir in lxc_path): IO caps apply on both."""
        devices = [mount.device] if mount is not None and mount.device else []
        with contextlib.suppress(OSError):
            root = cgroups.disk_of(self.settings.lxc_path)
            if root and root not in devices:
                devices.append(root)
        return ",".join(devices)

    def _block_with(self, cid: str, limits: Limits, mount: VolumeMount | None) -> list[str]:
        old = self._read_block(cid)
        network = _network_from_block(old)
        return self._managed_block(cid, limits, network, mount)

    def set_limits(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        self._require(cid)
        self._rewrite_config(cid, self._block_with(cid, limits, mount))
        st = self.status(cid)
        if st.state == "RUNNING" and st.init_pid:
            cgroups.apply_live(self.layout, st.init_pid, limits, self._io_devices(mount))
            if limits.max_open_files:
                res = run(["prlimit", "--pid", str(st.init_pid), f"--nofile={limits.max_open_files}"], check=False)
                if res.returncode != 0:
                    # Raising a hard limit needs CAP_SYS_RESOURCE, which some hosts withhold: the config
                    # carries the new value and it applies at the container's next start.
                    log.warning("open-files limit applies at next start",
                                extra={"container": self.container_name(cid), "error": res.stderr.strip()[:200]})

    def set_mount(self, cid: str, mount: VolumeMount | None, limits: Limits | None = None) -> None:
        self._require(cid)
        if self.status(cid).state != "STOPPED":
            raise FailedPrecondition(f"container {cid} is running; stop it before changing its volume",
                                     field="container_id")
        if limits is None:
            raise ValueError("limits are needed to rewrite the container config")
        self._rewrite_config(cid, self._block_with(cid, limits, mount))

    def usage(self, cid: str, limits: Limits) -> Usage:
        self._require(cid)
        st = self.status(cid)
        if st.state != "RUNNING" or not st.init_pid:
            return Usage(id=cid)
        return cgroups.read_usage(self.layout, cid, st.init_pid, limits)

    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        self._require(cid)
        if self.status(cid).state != "RUNNING":
            raise FailedPrecondition(f"container {cid} is not running", field="id")
        try:
            res = run(["lxc-attach", "-P", self.path, "-n", self.container_name(cid), "--clear-env",
                       "--set-var", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                       "--", *argv], timeout=timeout or 60, check=False)
        except CommandError as exc:
            return ExecResult(124, exc.stdout.encode(), b"timed out: " + shlex.join(argv).encode())
        return ExecResult(res.returncode, res.stdout.encode(), res.stderr.encode())

    def list_names(self) -> list[str]:
        prefix = self.settings.container_prefix
        out = []
        for entry in sorted(os.listdir(self.path)):
            if entry.startswith(prefix) and os.path.exists(os.path.join(self.path, entry, "config")):
                out.append(entry[len(prefix):])
        return out


def _network_from_block(block: list[str]) -> NetworkPlan:
    kv = {}
    for ln in block:
        k, sep, v = ln.partition(" = ")
        if sep:
            kv[k.strip()] = v.strip()
    if kv.get("lxc.net.0.type") == "veth":
        addr, _, plen = kv.get("lxc.net.0.ipv4.address", "/0").partition("/")
        return NetworkPlan("bridge", addr, 0, kv.get("lxc.net.0.link", ""), int(plen or 0),
                           kv.get("lxc.net.0.ipv4.gateway", ""))
    return NetworkPlan("host", "", 0)

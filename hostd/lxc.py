"""The LXC container driver: overlay snapshots of the OS template, limits as lxc.cgroup keys and live
cgroup writes, the guest agent as the container's PID 1 (no systemd boot).

Containers are unprivileged by default: a user namespace maps container ids 0..65535 onto a host range of
the container's own (idmap.py: the snapshot's lower layer is an id-mapped mount of the template, so the
container's files are its root's; hostd's FirstBoot files and the data volume are shifted into the range
too). With `idmap_isolated` off every container shares template.IDMAP_BASE.. and snapshots the
template's shifted copy instead. LXC's default seccomp policy applies, and the capabilities in DROP_CAPS
are dropped. AppArmor confines them where the kernel has it
(`generated` profile); this kernel has no AppArmor (no /sys/module/apparmor), so the profile stays
`unconfined` there. In bridge mode each container has its own network namespace (see network.py).

Every lxc-* command gets `-P <lxcpath>`, so each hostd (and each test) has its own container namespace.
hostd's keys live in a delimited block at the end of the container's config, rewritten as a whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import threading

from reddwarf.common.errors import FailedPrecondition, NotFound
from reddwarf.common.runner import CommandError, Result, run

from . import cgroups, firstboot, idmap, network, template, volume_seed
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
SECCOMP_PROFILE = "/usr/share/lxc/config/common.seccomp"  # LXC's default denylist (kexec, modules, ...)
# On top of common.conf's (mac_admin mac_override sys_time sys_module sys_rawio): nothing a database
# needs, each a way to reach the host or other tenants.
DROP_CAPS = ("mac_admin", "mac_override", "sys_time", "sys_module", "sys_rawio", "sys_boot", "sys_pacct",
             "syslog", "wake_alarm", "block_suspend", "audit_control", "audit_read", "mknod", "net_raw")
VETH_SCRIPT = ".reddwarf-veth-up"
LOWER_DIR = ".lower"          # under the lxcpath: each isolated container's id-mapped view of its template
LOWER_SOURCE = "reddwarf-lower"  # in the container's dir: the template rootfs that view shows


def apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


class LxcDriver(ContainerDriver):
    name = "lxc"

    def __init__(self, settings: Settings, layout: cgroups.CgroupLayout | None = None) -> None:
        self.settings = settings
        self.layout = layout or cgroups.detect()
        self.path = settings.lxc_path
        os.makedirs(self.path, exist_ok=True)
        self.bridge = network.Bridge(settings.host_bridge)
        self._bridge_ready = False
        self._published: dict[str, str] = {}  # host service address -> what a container dials for it
        # Containers are created and destroyed in parallel (hostd/host.py); the bridge and its filter are
        # shared by all of them: made, published into and removed under this lock.
        self._net_lock = threading.RLock()
        if settings.unprivileged:
            template.ensure_subids()
            if settings.idmap_isolated:
                template.ensure_subids(*idmap.subid_range())
            # The mapped root mounts the container's overlay from inside its user namespace: it has to be
            # able to walk into the lxcpath (search only, no listing).
            template.grant_search(self.path)

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
        unprivileged = self._unprivileged(cid)
        profile = "generated" if unprivileged and apparmor_enabled() else "unconfined"
        lines = [BEGIN, f"lxc.uts.name = {self.container_name(cid)}", f"lxc.apparmor.profile = {profile}",
                 "lxc.signal.halt = SIGTERM", f"lxc.seccomp.profile = {SECCOMP_PROFILE}",
                 "lxc.cap.drop = " + " ".join(DROP_CAPS)]
        if network.mode == "bridge":
            lines += ["lxc.net.0.type = veth", f"lxc.net.0.link = {network.bridge}", "lxc.net.0.flags = up",
                      f"lxc.net.0.veth.pair = {network_veth(self.container_name(cid))}",
                      f"lxc.net.0.script.up = {os.path.join(self.path, VETH_SCRIPT)}",
                      f"lxc.net.0.ipv4.address = {network.address}/{network.prefix_len}"]
            if network.gateway:
                lines.append(f"lxc.net.0.ipv4.gateway = {network.gateway}")
        else:
            lines.append("lxc.net.0.type = none")
        if unprivileged:
            # /sys can only be mounted by a namespace's owner: with the host's network namespace (host
            # mode) the container gets none; with its own, a read-only one.
            lines += ["lxc.mount.auto =", "lxc.mount.auto = proc:mixed cgroup:mixed"
                      + (" sys:ro" if network.mode == "bridge" else "")]
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
                if not ln.startswith(("lxc.net.", "lxc.apparmor.profile", "lxc.init.cmd", "lxc.uts.name",
                                      "lxc.seccomp.profile"))]
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(kept + block) + "\n")
        os.replace(path + ".tmp", path)

    def _unprivileged(self, cid: str) -> bool:
        """Whether the container has a user namespace (its config, inherited from the template, maps ids);
        containers made privileged by an older hostd stay as they were made."""
        with open(self._config_path(cid)) as f:
            return any(ln.startswith("lxc.idmap") for ln in f.read().splitlines())

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
        source = spec.template
        isolated = self.settings.unprivileged and self.settings.idmap_isolated
        if self.settings.unprivileged and not isolated:
            source = template.shifted_template(self.settings, spec.template)
        name = self.container_name(spec.id)
        try:
            run(["lxc-copy", "-P", self.settings.template_lxc_path, "-n", source, "-p", self.path,
                 "-N", name, "-s", "-B", "overlayfs"], timeout=120)
            if isolated:
                self._isolate(spec.id, os.path.join(tpl_dir, "rootfs"))
            if self.settings.rootfs_quota_mb:
                self._make_layer(spec.id)
            self._rewrite_config(spec.id, self._managed_block(spec.id, spec.limits, spec.network, spec.mount))
            bootstrap = spec.bootstrap
            if spec.network.mode == "bridge":
                with self._net_lock:
                    self._ensure_bridge(spec.network)
                    # The agent dials the control server from its own network namespace: through the gateway.
                    bootstrap = dataclasses.replace(
                        bootstrap, server_address=self._reach(bootstrap.server_address),
                        enroll_address=self._reach(bootstrap.enroll_address) if bootstrap.enroll_address else "")
            bind = "0.0.0.0" if spec.network.mode == "bridge" else spec.network.address
            config = firstboot.agent_config(bootstrap, spec.network.port, spec.datadir, bind)
            firstboot.write_firstboot(self.upper_dir(spec.id), config, spec.bootstrap.ca_pem)
            firstboot.write_name_files(self.upper_dir(spec.id), name, spec.network.mode == "bridge")
            unprivileged = self._unprivileged(spec.id)
            if spec.mount is not None:
                self._seed_volume(spec.template, spec.mount.host_path,
                                  self._idmap_base(spec.id) if unprivileged else 0)
            if unprivileged:
                base = self._idmap_base(spec.id)
                template.shift_tree(self.upper_dir(spec.id), base)  # hostd's files become the container root's
                if spec.mount is not None:
                    self._own_volume(spec.mount.host_path, base)
            with open(self._made_marker(spec.id), "w"):
                pass  # the create is whole only once this exists
        except Exception:
            self.destroy(spec.id)  # no half-made container survives a failed create
            raise
        log.info("container created", extra={"container": name, "template": spec.template})

    # ------------------------------------------------------------------ an id range of its own
    def _lower(self, cid: str) -> str:
        return os.path.join(self.path, LOWER_DIR, self.container_name(cid))

    def _idmap_base(self, cid: str) -> int:
        """The host id the container's root is (from its config's lxc.idmap)."""
        with open(self._config_path(cid)) as f:
            for ln in f.read().splitlines():
                parts = ln.split("=", 1)[-1].split()
                if ln.startswith("lxc.idmap") and len(parts) == 4 and parts[0] == "u" and parts[1] == "0":
                    return int(parts[2])
        return 0

    def _isolate(self, cid: str, template_rootfs: str) -> None:
        """Right after lxc-copy of the (unshifted) template: a range for this container, the template seen
        through an id-mapped mount of it as the overlay's lower layer, and the snapshot's dirs given to
        the range's root (what lxc-copy does itself for a template with id maps)."""
        base = idmap.allocate(self._dir(cid))
        with open(os.path.join(self._dir(cid), LOWER_SOURCE), "w") as f:
            f.write(template_rootfs + "\n")
        os.makedirs(os.path.join(self.path, LOWER_DIR), mode=0o711, exist_ok=True)
        lower = self._lower(cid)
        idmap.mount_idmapped(template_rootfs, lower, base)
        delta = os.path.join(self._dir(cid), "overlay", "delta")
        with open(self._config_path(cid)) as f:
            lines = [ln for ln in f.read().splitlines() if not ln.startswith(("lxc.rootfs.path", "lxc.idmap"))]
        lines += [f"lxc.rootfs.path = overlay:{lower}:{delta}", f"lxc.idmap = u 0 {base} {idmap.RANGE}",
                  f"lxc.idmap = g 0 {base} {idmap.RANGE}"]
        with open(self._config_path(cid) + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(self._config_path(cid) + ".tmp", self._config_path(cid))
        for d in (self._dir(cid), os.path.join(self._dir(cid), "overlay"), delta,
                  os.path.join(self._dir(cid), "overlay", "work")):
            if os.path.isdir(d):
                os.chown(d, base, base)
        template.grant_search(self.path, base)

    def _ensure_lower(self, cid: str) -> None:
        """After a host reboot (or hostd's restart with the mount gone) the id-mapped lower layer again."""
        marker = os.path.join(self._dir(cid), LOWER_SOURCE)
        if os.path.exists(marker):
            with open(marker) as f:
                idmap.mount_idmapped(f.read().strip(), self._lower(cid), self._idmap_base(cid))

    def upper_dir(self, cid: str) -> str:
        """The container's own writable layer (overlay upper dir) — where FirstBoot files go."""
        delta = os.path.join(self._dir(cid), "overlay", "delta")
        if os.path.isdir(delta):
            return delta
        return os.path.join(self._dir(cid), "rootfs")

    # ------------------------------------------------------------------ the writable layer's quota
    def _layer_image(self, cid: str) -> str:
        return os.path.join(self._dir(cid), "overlay.img")

    def _layer_dir(self, cid: str) -> str:
        return os.path.join(self._dir(cid), "overlay")

    def _make_layer(self, cid: str) -> None:
        """Puts the snapshot's writable layer (overlay upper and work dirs) on a filesystem of its own, a
        sparse ext4 image of settings.rootfs_quota_mb: a container filling its root filesystem fills that,
        not the host's disk (mkfs of a sparse image with lazy init: milliseconds). The snapshot's upper and
        work dirs are still empty here: they are made afresh on the new filesystem, as lxc-copy made them."""
        layer, img = self._layer_dir(cid), self._layer_image(cid)
        if not os.path.isdir(os.path.join(layer, "delta")):
            return  # not an overlay snapshot
        dirs = {d: os.stat(os.path.join(layer, d)) for d in ("delta", "work")}
        top = os.stat(layer)
        with open(img, "wb") as f:
            f.truncate(self.settings.rootfs_quota_mb * 1024 * 1024)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "lazy_itable_init=1,lazy_journal_init=1", img],
            timeout=120)
        shutil.rmtree(layer)
        os.mkdir(layer)
        self._mount_layer(cid)
        for path, st in [(layer, top)] + [(os.path.join(layer, d), st) for d, st in dirs.items()]:
            if path != layer:
                os.mkdir(path)
            os.chown(path, st.st_uid, st.st_gid)
            os.chmod(path, st.st_mode & 0o7777)
        os.rmdir(os.path.join(layer, "lost+found"))

    def _mount_layer(self, cid: str) -> None:
        layer, img = self._layer_dir(cid), self._layer_image(cid)
        if os.path.exists(img) and not os.path.ismount(layer):
            run(["mount", "-o", "loop", img, layer])  # a loop device of its own, freed at umount

    def _unmount_layer(self, cid: str) -> None:
        if os.path.ismount(self._layer_dir(cid)):
            run(["umount", self._layer_dir(cid)], timeout=60)

    def _ensure_bridge(self, plan: NetworkPlan) -> None:
        if plan.bridge != self.bridge.settings.name:
            raise FailedPrecondition(f"container is on bridge {plan.bridge}, this hostd runs "
                                     f"{self.bridge.settings.name}", field="container.network_mode")
        # Made once per hostd (and again when it went: a host reboot, or the last container's delete).
        if not self._bridge_ready or not os.path.exists(f"/sys/class/net/{plan.bridge}"):
            self.bridge.ensure()
            self.bridge.write_veth_script(os.path.join(self.path, VETH_SCRIPT))
            self._bridge_ready = True
            self._published.clear()

    def _reach(self, address: str) -> str:
        if "," in address:  # every server's endpoint (several servers): each made reachable
            return ",".join(self._reach(a.strip()) for a in address.split(",") if a.strip())
        if address not in self._published:
            self._published[address] = self.bridge.reach_host_service(address)
        return self._published[address]

    def _seed_volume(self, template_name: str, host_path: str, base: int) -> None:
        """A fresh volume gets the template's datadir seed (hostd/volume_seed.py), which its guest takes over
        instead of running mariadb-install-db; a volume with anything on it is left as it is."""
        if not os.path.isdir(host_path):
            return
        seed = volume_seed.seed_for(self.settings, template_name)
        if seed is not None and volume_seed.seed_volume(seed, host_path, base):
            log.info("volume seeded", extra={"path": host_path, "template": template_name})

    def _own_volume(self, host_path: str, base: int) -> None:
        """The data volume belongs to the container's mapped ids (once: a fresh, formerly privileged or
        other range's volume is shifted, one already in the range is left as it is)."""
        if os.path.isdir(host_path) and os.stat(host_path).st_uid != base:
            n = template.shift_tree(host_path, base)
            log.info("volume given to the container's mapped ids", extra={"path": host_path, "files": n})

    def _mount_source(self, cid: str) -> str:
        for ln in self._read_block(cid):
            if ln.startswith("lxc.mount.entry = "):
                return ln.split(" = ", 1)[1].split()[0]
        return ""

    def start(self, cid: str) -> ContainerStatus:
        self._require(cid)
        st = self.status(cid)
        if st.state == "RUNNING":
            return st
        self._mount_layer(cid)  # after a host reboot the writable layer's filesystem is not mounted
        plan = _network_from_block(self._read_block(cid))
        if plan.mode == "bridge":
            with self._net_lock:
                self._ensure_bridge(plan)  # after a host reboot (or the last neighbour's delete) it is gone
        if self._unprivileged(cid):
            base = self._idmap_base(cid)
            self._ensure_lower(cid)
            template.grant_search(self.path, base)  # again: someone may have chmod-ed an ancestor since
            source = self._mount_source(cid)
            if source:
                self._own_volume(source, base)
        logfile = os.path.join(self._dir(cid), "start.log")
        for attempt in range(3):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(logfile)
            res = self._lxc("lxc-start", cid, "-o", logfile, "-l", "ERROR", timeout=60, check=False)
            if res.returncode == 0:
                break
            try:
                with open(logfile) as f:
                    why = [ln for ln in f.read().splitlines() if " ERROR " in ln][:3]
            except OSError:
                why = []
            if attempt < 2 and any("print_top_failing_dir" in ln for ln in why):
                # An ancestor of the lxcpath lost the mapped root's search right between our grant and the
                # start (something chmod-ed it: pytest does so to its base dir): grant again, start again.
                template.grant_search(self.path, self._idmap_base(cid))
                continue
            raise CommandError(res.argv, res.returncode, res.stdout, "\n".join(why) or res.stderr)
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
        bridged = os.path.exists(self._config_path(cid)) and _network_from_block(self._read_block(cid)).mode \
            == "bridge"
        self._lxc("lxc-stop", cid, "-k", timeout=30, check=False)  # LXC removes the veth pair with it
        self._unmount_layer(cid)
        isolated = os.path.exists(os.path.join(self._dir(cid), LOWER_SOURCE))
        base = self._idmap_base(cid) if os.path.exists(self._config_path(cid)) else 0
        idmap.unmount(self._lower(cid))
        res = self._lxc("lxc-destroy", cid, "-f", timeout=60, check=False)
        if res.returncode != 0 and os.path.exists(self._config_path(cid)):
            raise CommandError(res.argv, res.returncode, res.stdout, res.stderr)
        if isolated or idmap.is_isolated(base):
            idmap.release(self._dir(cid))
            if base:
                template.revoke_search(self.path, base)
        log.info("container destroyed", extra={"container": self.container_name(cid)})
        if bridged:
            self._drop_bridge_if_unused()

    def _drop_bridge_if_unused(self) -> None:
        """The last container on the bridge is gone: so is the bridge, with its filter table. Under the network
        lock: a create writes its bridged config before it ensures the bridge, so a create in flight either
        is seen here (the bridge stays) or ensures the bridge again after this."""
        with self._net_lock:
            for other in self.list_names():
                try:
                    if _network_from_block(self._read_block(other)).mode == "bridge":
                        return
                except FileNotFoundError:
                    continue  # destroyed meanwhile
            self.bridge.destroy()
            self._bridge_ready = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, VETH_SCRIPT))

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


def network_veth(container_name: str) -> str:
    return network.veth_name(container_name)


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

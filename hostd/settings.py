"""hostd's one typed settings object: loaded once at start (JSON file, REDDWARF_HOSTD_* environment, flags;
see reddwarf.common.config), passed down everywhere."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reddwarf.common import config


@dataclass(frozen=True)
class BridgeSettings:
    """Bridge-mode networking: hostd owns one bridge and hands out addresses from a pool."""

    # "" = derived from the host id (one bridge per hostd: two hostds on one machine never share one).
    name: str = ""
    # CIDR of the bridge; the first host address is the bridge (gateway), containers get the rest.
    # "" = a /24 in 10.128.0.0/10 derived from the host id.
    cidr: str = ""
    # Network namespace the bridge lives in ("" = the host's); tests use a namespace of their own.
    netns: str = ""


@dataclass(frozen=True)
class Settings:
    host_id: str = "local"
    listen_address: str = "127.0.0.1:7443"
    # Everything hostd persists (JSON state, host-side volume mounts). Default derived from host_id.
    state_dir: str = ""
    # lxcpath of this hostd's containers: each hostd (and each test) its own container namespace.
    lxc_path: str = "/var/lib/reddwarf/lxc"
    # lxcpath where OS templates are built once and shared by every hostd on the machine.
    template_lxc_path: str = "/var/lib/reddwarf/templates"
    # Where loop volume files live (may be shared storage for migration between hosts).
    storage_path: str = "/var/lib/reddwarf/volumes"
    # Wheelhouse the template's agent venv is installed from (pip download on the host).
    wheelhouse: str = "/var/cache/reddwarf/wheelhouse"
    # Default template name; "" means the recipe-hash name from reddwarf.hostd.template.
    template: str = ""
    container_prefix: str = "rd-"
    # PID 1 of every container; "" = the guest agent (firstboot.INIT_CMD). Tests use a stand-in.
    agent_init_cmd: str = ""
    # Address reported for host-mode containers (where the instance's mysqld is reachable).
    advertise_address: str = "127.0.0.1"
    # "lxc" | "openvz" | "fake"; volumes "loop" | "fake". The fakes (reddwarf.hostd.fake) need no root: tests only.
    container_driver: str = "lxc"
    volume_driver: str = "loop"
    # Host-mode mysqld ports are allocated from [port_min, port_max].
    port_min: int = 33060
    port_max: int = 33999
    bridge: BridgeSettings = field(default_factory=BridgeSettings)
    # Network of a container created without one (NETWORK_MODE_UNSPECIFIED): "bridge" (its own network
    # namespace on this hostd's bridge) or "host".
    network_mode: str = "bridge"
    # mTLS: this hostd's certificate/key, the CA bundle and an optional CRL (PEM).
    cert_path: str = ""
    key_path: str = ""
    ca_path: str = ""
    crl_path: str = ""
    # "compute" (containers and their volumes) or "storage" (a SAN node: tgtd LUNs for other hosts' volumes,
    # no containers; see reddwarf.hostd.san).
    mode: str = "compute"
    # iSCSI: IQN prefix of targets (storage mode), the portal tgtd listens on (storage mode; the address other
    # hosts reach), and tgtd's management port (its socket /var/run/tgtd/socket.<port>; 0 = derived from the
    # host id, so two SAN hostds or a system tgtd on one machine never share a tgtd).
    iscsi_iqn_prefix: str = "iqn.2024-01.reddwarf"
    iscsi_portal: str = "127.0.0.1:3260"
    iscsi_control_port: int = 0
    # Compute hosts with volume_driver "iscsi": this host's initiator name ("" = derived from the host id), and
    # the initiator: "auto" (open-iscsi where the kernel has iscsi_tcp, else qemu-storage-daemon), "kernel",
    # "userspace".
    iscsi_initiator_iqn: str = ""
    iscsi_initiator: str = "auto"
    log_level: str = "INFO"
    # Containers run in a user namespace (root inside is an unprivileged id range outside, see
    # template.IDMAP_BASE); False keeps the old privileged containers.
    unprivileged: bool = True
    # Each unprivileged container in an id range of its own (hostd/idmap.py); False: all share one.
    idmap_isolated: bool = True
    # Size of each container's writable layer (its own ext4 image under the container's dir; 0 = on the
    # lxcpath's filesystem, unbounded).
    rootfs_quota_mb: int = 2048
    # The proof-restore sandbox's cgroup limits (agent/sandbox.py: Limits): memory (swap included), CPU
    # weight, CPU cap in % of one core, processes and threads.
    proof_memory_mb: int = 1024
    proof_cpu_shares: int = 256
    proof_cpu_quota_pct: int = 100
    proof_pids: int = 512
    # How often stopped containers that should run are looked for and started again (0 = never).
    revive_seconds: int = 2

    def __post_init__(self) -> None:
        if not self.state_dir:
            object.__setattr__(self, "state_dir", f"/var/lib/reddwarf/hostd/{self.host_id}")


    @property
    def host_bridge(self) -> BridgeSettings:
        """The bridge settings with what is left "" derived from the host id."""
        h = hashlib.sha256(self.host_id.encode()).digest()
        return replace(self.bridge, name=self.bridge.name or f"rdbr{h.hex()[:8]}",
                       cidr=self.bridge.cidr or f"10.{128 + h[0] % 64}.{h[1]}.0/24")

    @property
    def initiator_iqn(self) -> str:
        """This host's iSCSI initiator name: what a SAN node's ACL admits."""
        if self.iscsi_initiator_iqn:
            return self.iscsi_initiator_iqn
        name = "".join(c if c.isalnum() or c in ".-" else "-" for c in self.host_id.lower())
        return f"{self.iscsi_iqn_prefix}:host.{name}"

    @property
    def target_control_port(self) -> int:
        if self.iscsi_control_port:
            return self.iscsi_control_port
        return 20000 + int.from_bytes(hashlib.sha256(self.host_id.encode()).digest()[:4], "big") % 10000

    @property
    def volumes_mount_dir(self) -> str:
        """Host-side mount points of attached volumes (then bind-mounted into containers)."""
        return os.path.join(self.state_dir, "mnt")

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    @classmethod
    def load(cls, config_path: str | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """defaults < the JSON file (--config) < REDDWARF_HOSTD_<NAME> < overrides (flags; None = not given)."""
        return config.load(cls, path=config_path, fmt="json", env=os.environ if env is None else env,
                           env_prefix="REDDWARF_HOSTD_", overrides=overrides)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Settings:
        return config.build(cls, ("hostd settings", data))

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> Settings:
        return cls.load(path, env={}, overrides=overrides)

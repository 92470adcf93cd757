"""The container concept: flavor limits, the container spec/record, beancounters, and the driver interface.

Drivers (LXC default, OpenVZ) implement `ContainerDriver`; the service converts protos to these values at
the gRPC edge and back, so nothing below it sees a protobuf.
"""
from __future__ import annotations

import abc
import re
from dataclasses import dataclass

from reddwarf.common.errors import InvalidArgument

ID_RE = re.compile(r"^[a-z0-9-]{1,64}\Z")


def validate_id(value: str, field_name: str) -> str:
    if not ID_RE.match(value or ""):
        raise InvalidArgument(f"{field_name} must match [a-z0-9-]{{1,64}}, got {value!r}", field=field_name)
    return value


@dataclass(frozen=True)
class Limits:
    """A flavor's limits (see common.proto Limits): what every driver maps onto its mechanism."""

    memory_mb: int
    cpu_shares: int
    max_processes: int
    swap_mb: int = 0
    cpu_limit_millicores: int = 0
    max_open_files: int = 0
    io_weight: int = 0
    io_iops: int = 0
    io_bytes_per_sec: int = 0

    # (field, minimum, maximum, zero allowed as "unset")
    _RANGES = (
        ("memory_mb", 16, 4 * 1024 * 1024, False),
        ("cpu_shares", 2, 262144, False),
        ("max_processes", 8, 4194304, False),
        ("swap_mb", 0, 4 * 1024 * 1024, True),
        ("cpu_limit_millicores", 10, 1024 * 1000, True),
        ("max_open_files", 64, 1 << 20, True),
        ("io_weight", 10, 1000, True),
        ("io_iops", 1, 10**9, True),
        ("io_bytes_per_sec", 4096, 1 << 50, True),
    )

    def validate(self, prefix: str = "limits") -> Limits:
        violations: list[tuple[str, str]] = []
        for name, lo, hi, zero_ok in self._RANGES:
            value = getattr(self, name)
            if zero_ok and value == 0:
                continue
            if not lo <= value <= hi:
                what = f"between {lo} and {hi}" + (" (or 0 for unset)" if zero_ok else "")
                violations.append((f"{prefix}.{name}", f"must be {what}, got {value}"))
        if violations:
            raise InvalidArgument(f"invalid limits: {violations[0][0]} {violations[0][1]}",
                                  violations=violations)
        return self


@dataclass(frozen=True)
class Bootstrap:
    """FirstBoot payload (host.proto AgentBootstrap)."""

    server_address: str
    ca_pem: str
    enrollment_token: str
    instance_id: str
    heartbeat_seconds: int = 0
    enroll_address: str = ""

    def __repr__(self) -> str:  # never print the token
        return f"Bootstrap(server_address={self.server_address!r}, instance_id={self.instance_id!r})"


@dataclass(frozen=True)
class VolumeMount:
    """A host directory bind-mounted into the container (the data volume)."""

    host_path: str
    container_path: str
    # "major:minor" of the block device beneath it, for per-device IO throttles.
    device: str = ""


@dataclass(frozen=True)
class NetworkPlan:
    mode: str  # "host" | "bridge"
    address: str
    port: int
    bridge: str = ""
    prefix_len: int = 0
    gateway: str = ""


@dataclass(frozen=True)
class ContainerSpec:
    id: str
    limits: Limits
    bootstrap: Bootstrap
    network: NetworkPlan
    template: str
    datadir: str = "/var/lib/mysql"
    mount: VolumeMount | None = None


@dataclass(frozen=True)
class ContainerStatus:
    state: str  # "STOPPED" | "RUNNING" | "FROZEN" | "ABSENT"
    init_pid: int = 0


@dataclass(frozen=True)
class Beancounter:
    resource: str
    held: int
    maxheld: int
    barrier: int
    limit: int
    failcnt: int


@dataclass(frozen=True)
class Usage:
    id: str
    beancounters: tuple[Beancounter, ...] = ()
    cpu_usage_ns: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0

    def counter(self, resource: str) -> Beancounter:
        return next(b for b in self.beancounters if b.resource == resource)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


class ContainerDriver(abc.ABC):
    """What hostd needs of a container technology. Every method is idempotent where it can be."""

    name: str

    @abc.abstractmethod
    def create(self, spec: ContainerSpec) -> None: ...

    @abc.abstractmethod
    def start(self, cid: str) -> ContainerStatus: ...

    @abc.abstractmethod
    def stop(self, cid: str, timeout: int) -> ContainerStatus: ...

    @abc.abstractmethod
    def destroy(self, cid: str) -> None: ...

    @abc.abstractmethod
    def status(self, cid: str) -> ContainerStatus: ...

    @abc.abstractmethod
    def set_limits(self, cid: str, limits: Limits, mount: VolumeMount | None) -> None:
        """Persists the limits for the next start and applies them to a running container live."""

    @abc.abstractmethod
    def usage(self, cid: str, limits: Limits) -> Usage: ...

    @abc.abstractmethod
    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult: ...

    @abc.abstractmethod
    def set_mount(self, cid: str, mount: VolumeMount | None, limits: Limits | None = None) -> None:
        """Sets (or clears) the data volume's bind mount; takes effect at the next start."""

    @abc.abstractmethod
    def list_names(self) -> list[str]:
        """Ids of every container of ours (by prefix) present on the host, tracked or not."""

"""The agent's own values: what its datastore drivers and backup runner take and return. Protobufs stop at
the stream (agent/convert.py); nothing below it sees one."""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from reddwarf.common.states import ServiceState


@dataclass(frozen=True)
class Limits:
    """What the guest sizes itself by, of its flavor's limits (the host enforces them all)."""
    memory_mb: int = 0
    max_open_files: int = 0


@dataclass(frozen=True)
class Database:
    """A tenant's database; no character set or collation: utf8mb4 and utf8mb4_general_ci."""
    name: str
    character_set: str = ""
    collation: str = ""


@dataclass(frozen=True)
class User:
    """A tenant's user@host ("" host: any, "%"), with the databases it has all privileges on."""
    name: str
    host: str = ""
    password: str = field(default="", repr=False)
    databases: tuple[str, ...] = ()


@dataclass(frozen=True)
class UserUpdate:
    """A new password and/or a new name or host for user@host (empty: unchanged)."""
    user: str
    host: str
    password: str = field(default="", repr=False)
    new_user: str = ""
    new_host: str = ""


@dataclass(frozen=True)
class DatabasePage:
    databases: tuple[Database, ...]
    next_page_token: str = ""


@dataclass(frozen=True)
class UserPage:
    users: tuple[User, ...]
    next_page_token: str = ""


@dataclass(frozen=True)
class RootCredentials:
    user: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class RootStatus:
    enabled: bool


@dataclass(frozen=True)
class ServiceSpec:
    """A service to install and run ("mariadb", "mysql", "memcached")."""
    service: str
    version: str = ""
    packages: tuple[str, ...] = ()
    port: int = 0


@dataclass(frozen=True)
class Prepare:
    services: tuple[ServiceSpec, ...] = ()
    limits: Limits = Limits()
    datadir: str = ""
    databases: tuple[Database, ...] = ()
    users: tuple[User, ...] = ()
    bind_address: str = ""
    # Networks users may connect from (empty: any); mysqld refusing plain TCP; mysqld's TLS certificate
    # (on the key the agent made, MysqlTlsCsr) and the tenant-facing CA that signed it.
    allowed_cidrs: tuple[str, ...] = ()
    require_secure_transport: bool = False
    tls_cert_pem: str = ""
    tls_ca_pem: str = ""
    # The configuration group's values (canonical text), in effect from mysqld's first start.
    configuration: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ConfigurationApplied:
    """What applying configuration overrides did: the parameters set live, and whether a static one waits
    for a restart of mysqld."""
    restart_required: bool
    applied: tuple[str, ...] = ()


@dataclass(frozen=True)
class TlsCsr:
    """A CSR for mysqld's TLS key, which never leaves the guest ("": this datastore serves no TLS), and
    the certificate mysqld serves now ("" before the first): the server renews it when it is due."""
    csr_pem: str
    current_cert_pem: str = ""


@dataclass
class GuestHealth:
    """The datastore's health as the agent sees it, filled in as it is observed."""
    service_state: ServiceState
    observed: datetime
    accepting_connections: bool = False
    uptime_seconds: int = 0
    connections: int = 0
    threads_connected: int = 0
    queries: int = 0
    slow_queries: int = 0
    buffer_pool_bytes_total: int = 0
    buffer_pool_bytes_data: int = 0
    datadir_bytes_used: int = 0
    datadir_bytes_total: int = 0
    restarts: int = 0
    services: dict[str, ServiceState] = field(default_factory=dict)
    last_error: str = ""
    # Only on a replica (None otherwise): whether its replication threads run, and how far behind it is
    # (None while they are stopped).
    replication_running: bool | None = None
    replication_lag_seconds: int | None = None


@dataclass(frozen=True)
class TableChecksum:
    table: str  # "db.table"
    checksum: int  # CHECKSUM TABLE's value, as a signed 64-bit integer


@dataclass(frozen=True)
class BackupResult:
    size_bytes: int
    sha256: str
    to_lsn: str  # mariadb-backup's, for a later incremental
    datastore_version: str
    checksums: tuple[TableChecksum, ...] = ()


@dataclass(frozen=True)
class BackupChunk:
    """Backup bytes on their way to or from the server: the first carries the backup id, the last the
    SHA-256 of all the data (only when every byte was produced successfully)."""
    data: bytes = b""
    backup_id: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class StoredBackup:
    """What the server stored of an upload."""
    size_bytes: int
    sha256: str


# A command's progress: percent, message, bytes done.
Progress = Callable[[int, str, int], Awaitable[None]]
Upload = Callable[[AsyncIterator[BackupChunk]], Awaitable[StoredBackup]]
Download = Callable[[str], AsyncIterator[BackupChunk]]

"""my.cnf for a guest's mysqld, sized to its flavor's limits (re-rendered on resize), with its TLS files,
its transport rule and its tmpdir on the data volume (beside the datadir, never in it)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from reddwarf.common.datadir_seed import CHARACTER_SET_SERVER, COLLATION_SERVER

from .model import Limits

# mysqld's tmpdir and the agent's restore work directories live here, on the data volume (the container's
# root filesystem has no quota), at the volume's root beside the datadir (agent/mysqld.py: datadir_on_volume).
# On an older instance whose datadir is the volume's root this directory is inside it, where every directory
# is a schema: there it is hidden from mysqld by ignore-db-dirs, and no database maps to it (mysqld encodes
# '.' and '-' in a database's directory name, and the `#mysql50#` escape is refused by common/names.py).
VOLUME_WORK_DIR = ".reddwarf-tmp"


def volume_work_dir(volume: str) -> str:
    return os.path.join(volume, VOLUME_WORK_DIR)


def mysqld_tmpdir(volume: str) -> str:
    return os.path.join(volume_work_dir(volume), "mysqld")


def _inside(path: str, directory: str) -> bool:
    return os.path.commonpath([os.path.abspath(path), os.path.abspath(directory)]) == os.path.abspath(directory)


@dataclass(frozen=True)
class Tls:
    """mysqld's server certificate, its key and the CA a client verifies it with (paths)."""
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class MyCnf:
    datadir: str
    socket: str
    pid_file: str
    log_error: str
    port: int
    bind_address: str
    buffer_pool_mb: int
    max_connections: int
    open_files_limit: int
    tmpdir: str = ""
    tls: Tls | None = None
    require_secure_transport: bool = False
    # The configuration group's overrides (agent/configuration.py), read last so that its values win.
    include: str = ""
    # The logs' settings and files (agent/logs.py); empty: the error log at log_error, the slow log on.
    log_lines: tuple[str, ...] = ()
    # The instance's own server id (server_id_for); 0 leaves MariaDB's default (1), as on a bare host.
    server_id: int = 0


def server_id_for(instance_id: str) -> int:
    """A server id of the instance's own, the same at every render (1..2^32-1, MariaDB's range): instances
    made from one datadir seed, or restored from one another's backups, never share one."""
    digest = hashlib.sha256(instance_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 0xFFFFFFFF + 1


def size_for_limits(limits: Limits) -> tuple[int, int]:
    """(innodb_buffer_pool_size MiB, max_connections) for a flavor: half the memory for the buffer pool on
    flavors of 1 GiB or more, a quarter below (small guests need room for per-connection buffers)."""
    mem = max(int(limits.memory_mb), 128)
    pool = mem // 2 if mem >= 1024 else mem // 4
    pool = max(32, pool)
    max_conn = max(20, min(mem // 4, 2000))
    return pool, max_conn


def render_my_cnf(c: MyCnf) -> str:
    extra: list[str] = []
    if c.tmpdir:
        extra.append(f"tmpdir = {c.tmpdir}")
        if _inside(c.tmpdir, c.datadir):  # an older instance's datadir at the volume's root
            extra.append(f"ignore-db-dirs = {VOLUME_WORK_DIR}")
    if c.tls is not None:
        extra += [f"ssl_cert = {c.tls.cert}", f"ssl_key = {c.tls.key}", f"ssl_ca = {c.tls.ca}"]
    if c.require_secure_transport:
        # TCP clients must use TLS; the unix socket (the agent's own admin) is allowed by MariaDB.
        extra.append("require_secure_transport = ON")
    return "\n".join([
        "# Written by the Red Dwarf agent from the flavor's limits; re-rendered on resize.",
        "[mysqld]",
        f"datadir = {c.datadir}",
        f"socket = {c.socket}",
        f"pid-file = {c.pid_file}",
        *(c.log_lines or (f"log-error = {c.log_error}", "slow_query_log = 1", "long_query_time = 2")),
        f"port = {c.port}",
        f"bind-address = {c.bind_address}",
        # Host names in grants are matched as written; no DNS in the connection path.
        "skip-name-resolve",
        f"innodb_buffer_pool_size = {c.buffer_pool_mb}M",
        f"max_connections = {c.max_connections}",
        f"open_files_limit = {c.open_files_limit}",
        f"character-set-server = {CHARACTER_SET_SERVER}",
        f"collation-server = {COLLATION_SERVER}",
        "skip-log-bin",
        *([f"server-id = {c.server_id}"] if c.server_id else []),
        *extra,
        "",
        "[client]",
        f"socket = {c.socket}",
        "",
        *([f"!include {c.include}", ""] if c.include else []),
    ])

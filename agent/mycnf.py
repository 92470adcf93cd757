"""my.cnf for a guest's mysqld, sized to its flavor's limits (re-rendered on resize)."""
from __future__ import annotations

from dataclasses import dataclass

from .model import Limits


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


def size_for_limits(limits: Limits) -> tuple[int, int]:
    """(innodb_buffer_pool_size MiB, max_connections) for a flavor: half the memory for the buffer pool on
    flavors of 1 GiB or more, a quarter below (small guests need room for per-connection buffers)."""
    mem = max(int(limits.memory_mb), 128)
    pool = mem // 2 if mem >= 1024 else mem // 4
    pool = max(32, pool)
    max_conn = max(20, min(mem // 4, 2000))
    return pool, max_conn


def render_my_cnf(c: MyCnf) -> str:
    return "\n".join([
        "# Written by the Red Dwarf agent from the flavor's limits; re-rendered on resize.",
        "[mysqld]",
        f"datadir = {c.datadir}",
        f"socket = {c.socket}",
        f"pid-file = {c.pid_file}",
        f"log-error = {c.log_error}",
        f"port = {c.port}",
        f"bind-address = {c.bind_address}",
        # Host names in grants are matched as written; no DNS in the connection path.
        "skip-name-resolve",
        f"innodb_buffer_pool_size = {c.buffer_pool_mb}M",
        f"max_connections = {c.max_connections}",
        f"open_files_limit = {c.open_files_limit}",
        "character-set-server = utf8mb4",
        "collation-server = utf8mb4_general_ci",
        "slow_query_log = 1",
        "long_query_time = 2",
        "skip-log-bin",
        "",
        "[client]",
        f"socket = {c.socket}",
        "",
    ])

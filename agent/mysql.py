"""The MySQL/MariaDB datastore driver: composes my.cnf sized to the flavor (agent/mycnf.py), the mysqld
lifecycle (agent/mysqld.py), the SQL administration (agent/mysql_admin.py), memcached beside it
(agent/services.py) and backups (agent/backup.py), and keeps the agent's private records: the internal
admin's password and the shape of the last prepare (never a tenant's password)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pymysql
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from reddwarf.common import cidrs, datadir_seed, names, parameters, pki
from reddwarf.common.errors import InvalidArgument, RedDwarfError
from reddwarf.common.states import ServiceState

from . import convert, services
from .configuration import ConfigurationOverrides
from .datastore import Backups, DatastoreDriver, ProgressFn, no_progress
from .logs import GuestLogs, MysqlLogs
from .model import (
    BackupResult,
    ConfigurationApplied,
    Database,
    DatabasePage,
    Download,
    GuestHealth,
    Limits,
    Prepare,
    Progress,
    RootCredentials,
    RootStatus,
    TableChecksum,
    TlsCsr,
    Upload,
    User,
    UserPage,
    UserUpdate,
)
from .mycnf import MyCnf, size_for_limits, volume_work_dir
from .mysql_admin import MysqlAdmin, create_internal_admin
from .mysqld import INIT_MARKER, Mysqld, datadir_on_volume

if TYPE_CHECKING:
    from .backup import BackupRunner

log = logging.getLogger("reddwarf.agent.mysql")

__all__ = ["INIT_MARKER", "MysqlBackups", "MysqlDriver", "MysqlSettings"]

KNOWN_SERVICES = frozenset({"mariadb", "mysql", "memcached"})


@dataclass(frozen=True)
class MysqlSettings:
    state_dir: str
    # Where the data volume is mounted; mysqld's datadir is a directory on it (mysqld.datadir_on_volume).
    datadir: str
    port: int = 3306
    bind_address: str = "0.0.0.0"
    # The OS user mysqld runs as ("mysql" in a guest; root in host tests that own a temp datadir).
    run_as: str = "mysql"
    mysqld: str = ""
    install_db: str = ""
    # mysqld's TLS key and certificates; default /etc/mysql/reddwarf-tls (run_as root: <state_dir>/mysql-tls).
    tls_dir: str = ""
    # mysqld's server_id (mycnf.server_id_for(instance id) in a guest); 0: MariaDB's default.
    server_id: int = 0


_NOT_RUNNING = (2002, 2003, 2006, 2013)  # CR_CONNECTION_ERROR, CR_CONN_HOST_ERROR, gone away, lost


class MysqlDriver(DatastoreDriver):
    name = "mariadb"
    capabilities = ("mariadb", "mysql", "memcached")

    def __init__(self, settings: MysqlSettings) -> None:
        self.settings = settings
        self.volume = settings.datadir
        self.datadir = datadir_on_volume(self.volume)
        self._port = settings.port
        self._bind = settings.bind_address
        self._limits = Limits(memory_mb=512)
        self._extra: dict[str, services.Memcached] = {}
        self._wants_memcached = False
        self._preparing = False
        self._require_secure_transport = False
        self._lock = asyncio.Lock()
        os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
        self.mysqld = Mysqld(settings.state_dir, settings.run_as, settings.mysqld, settings.install_db,
                             settings.tls_dir, settings.server_id)
        self.admin = MysqlAdmin(self._admin_connect)
        self.config = ConfigurationOverrides(settings.state_dir, self._admin_connect)
        self._logs = MysqlLogs(settings.state_dir, lambda: os.path.join(volume_work_dir(self.volume), "logs"),
                               settings.run_as, self.admin.cursor, self._mysqld_running, self._write_my_cnf)

    # private records -----------------------------------------------------

    def _path(self, name: str) -> str:
        return os.path.join(self.settings.state_dir, name)

    def admin_password(self) -> str:
        with open(self._path("admin.json")) as f:
            return str(json.load(f)["password"])

    def _admin_connect(self) -> Any:
        # The unix socket needs no TLS; without ssl_disabled pymysql builds a default SSL context for every
        # connection, loading the system CAs (about 140 ms here, most of a configuration change; twice that
        # under a small flavor's CPU cap), and once mysqld has a certificate, does a TLS handshake over the socket.
        return pymysql.connect(unix_socket=self.mysqld.socket, user=names.ADMIN_USER, password=self.admin_password(),
                               autocommit=True, connect_timeout=5, ssl_disabled=True)

    def _write_private(self, name: str, data: dict[str, Any]) -> None:
        path = self._path(name)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def _read_private(self, name: str) -> dict[str, Any] | None:
        try:
            with open(self._path(name)) as f:
                data = json.load(f)
                return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    # prepare -------------------------------------------------------------

    def _mysqld_limits(self) -> Limits:
        """The flavor's limits less what memcached beside mysqld is given: both live in one memory cgroup."""
        if not self._wants_memcached:
            return self._limits
        mem = int(self._limits.memory_mb)
        return dataclasses.replace(self._limits, memory_mb=max(128, mem - services.memcached_memory_mb(mem)))

    def my_cnf(self) -> MyCnf:
        pool, conns = size_for_limits(self._mysqld_limits())
        cnf = self.mysqld.my_cnf(self.volume, self.datadir, self._port, self._bind, pool, conns,
                                 int(self._limits.max_open_files) or 65535, self._require_secure_transport)
        return replace(cnf, include=self.config.include_path, log_lines=tuple(self._logs.my_cnf_lines()))

    def configuration_defaults(self) -> dict[str, int | float | str]:
        """What the main my.cnf gives the parameters it sets: a parameter leaving the configuration group
        goes back to these (any other to MariaDB's DEFAULT)."""
        pool, conns = size_for_limits(self._mysqld_limits())
        return {"innodb_buffer_pool_size": pool * 1024 * 1024, "max_connections": conns,
                "character_set_server": "utf8mb4", "collation_server": "utf8mb4_general_ci",
                "slow_query_log": "ON", "long_query_time": 2.0,
                # SET GLOBAL time_zone = DEFAULT means the zone mysqld started with, which may be the group's.
                "time_zone": "SYSTEM"}

    def logs(self) -> GuestLogs:
        return self._logs

    def _mysqld_running(self) -> bool:
        sup = self.mysqld.supervisor
        return sup is not None and sup.state == ServiceState.RUNNING

    # TLS -----------------------------------------------------------------

    def _tls_dir(self) -> str:
        d = self.mysqld.tls_dir
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
        if self.settings.run_as != "root":
            shutil.chown(d, self.settings.run_as, self.settings.run_as)
        return d

    def _write_tls_file(self, path: str, data: bytes, mode: int) -> None:
        pki.write_atomic(Path(path), data, mode)
        if self.settings.run_as != "root":
            shutil.chown(path, self.settings.run_as, self.settings.run_as)

    def _tls_request(self) -> TlsCsr:
        """mysqld's key, made once in the guest (a replayed request reuses it), and a CSR for it."""
        self._tls_dir()
        key_path = self.mysqld.tls_files.key
        if not os.path.exists(key_path):
            key_pem, _ = pki.make_key_and_csr("mysqld")
            self._write_tls_file(key_path, key_pem, 0o600)
        with open(key_path, "rb") as f:
            csr = pki.csr_for_key(f.read(), "mysqld").decode()
        current = ""
        with contextlib.suppress(FileNotFoundError), open(self.mysqld.tls_files.cert) as f:
            current = f.read()
        return TlsCsr(csr_pem=csr, current_cert_pem=current)

    async def mysql_tls_request(self) -> TlsCsr:
        return await asyncio.to_thread(self._tls_request)

    async def install_mysql_tls(self, cert_pem: str, ca_pem: str) -> None:
        """A renewed certificate (same key): written in place, then FLUSH SSL has a running mysqld load it
        for new connections without a restart (open sessions keep theirs)."""
        if not cert_pem or not ca_pem:
            raise InvalidArgument("tls_cert_pem and tls_ca_pem are required",
                                  field="tls_ca_pem" if cert_pem else "tls_cert_pem")
        async with self._lock:
            await asyncio.to_thread(self._install_tls, cert_pem, ca_pem)
            try:
                await asyncio.to_thread(self.admin.reload_tls)
            except pymysql.err.OperationalError as exc:
                if exc.args[0] not in _NOT_RUNNING:
                    raise
                # mysqld is stopped: it reads the new files when it starts.
                log.info("mysqld is not running; the renewed certificate loads at its start")

    def _install_tls(self, cert_pem: str, ca_pem: str) -> None:
        """The server's certificate for our key, and the CA clients verify it with."""
        key_path = self.mysqld.tls_files.key
        if not os.path.exists(key_path):
            raise InvalidArgument("no TLS key in this guest: ask for a CSR first (mysql_tls_request)",
                                  field="tls_cert_pem")
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode())
            x509.load_pem_x509_certificate(ca_pem.encode())
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except ValueError as exc:
            raise InvalidArgument(f"not a PEM certificate: {exc}", field="tls_cert_pem") from None
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if cert.public_key().public_bytes(serialization.Encoding.DER, pub) \
                != key.public_key().public_bytes(serialization.Encoding.DER, pub):
            raise InvalidArgument("the certificate is not for this guest's TLS key", field="tls_cert_pem")
        files = self.mysqld.tls_files
        self._tls_dir()
        self._write_tls_file(files.ca, ca_pem.encode(), 0o644)
        self._write_tls_file(files.cert, cert_pem.encode(), 0o644)

    def _write_my_cnf(self) -> None:
        self.config.ensure_include()
        self.mysqld.write_my_cnf(self.my_cnf())

    def ensure_admin(self) -> None:
        """The internal admin exists with the password on record, root is reachable only locally, and every
        account lies inside access.allowed_cidrs (blocking; also after a restore, whose mysql.user is the
        source's)."""
        self._create_admin()
        self.admin.remove_remote_root()
        moved = self.admin.enforce_access()
        if moved:
            log.warning("accounts outside access.allowed_cidrs moved inside", extra={"accounts": ",".join(moved)})

    def _create_admin(self) -> None:
        """Creates os_admin@localhost with a random password kept 0600 in the state dir (idempotent)."""
        existing = self._read_private("admin.json")
        if existing:
            try:
                self._admin_connect().close()
                return
            except pymysql.err.MySQLError:
                pass
        password = existing["password"] if existing else secrets.token_urlsafe(32)
        create_internal_admin(self.mysqld.connect_root(), password)
        self._write_private("admin.json", {"user": names.ADMIN_USER, "password": password})

    async def prepare(self, spec: Prepare, progress: ProgressFn = no_progress) -> None:
        async with self._lock:
            self._preparing = True
            try:
                await self._prepare(spec, progress)
            finally:
                self._preparing = False

    async def _prepare(self, spec: Prepare, progress: ProgressFn) -> None:
        if spec.limits.memory_mb < 0:
            raise InvalidArgument("memory_mb may not be negative", field="limits.memory_mb")
        for i, s in enumerate(spec.services):
            if s.service not in KNOWN_SERVICES:
                raise InvalidArgument(f"unknown service {s.service!r}", field=f"services[{i}].service")
            if not 0 <= s.port <= 65535:
                raise InvalidArgument("port must be 0..65535", field=f"services[{i}].port")
        # Validate tenant input before touching anything.
        for i, d in enumerate(spec.databases):
            names.validate_database(d.name, f"databases[{i}].database")
        for i, u in enumerate(spec.users):
            names.validate_user(u.name, f"users[{i}].user")
            names.validate_password(u.password, f"users[{i}].password")
        allowed = cidrs.parse_cidrs(spec.allowed_cidrs, "allowed_cidrs")
        for s in spec.services:
            if s.service in ("mariadb", "mysql") and s.version:
                self.config.version = s.version
        if spec.configuration:
            parameters.validate(self.config.datastore, self.config.version, spec.configuration,
                                spec.limits.memory_mb or None, "configuration")
        if bool(spec.tls_cert_pem) != bool(spec.tls_ca_pem):
            raise InvalidArgument("tls_cert_pem and tls_ca_pem go together", field="tls_ca_pem")
        if spec.tls_cert_pem:
            await asyncio.to_thread(self._install_tls, spec.tls_cert_pem, spec.tls_ca_pem)
        if spec.require_secure_transport and not self.mysqld.tls_ready():
            raise InvalidArgument("require_secure_transport needs a TLS certificate (tls_cert_pem)",
                                  field="require_secure_transport")
        self.admin.allowed = allowed
        self._require_secure_transport = spec.require_secure_transport
        if spec.limits.memory_mb:
            self._limits = spec.limits
        if spec.datadir:  # the volume's mount point (Prepare.datadir)
            self.volume = spec.datadir
        self.datadir = datadir_on_volume(self.volume)
        if spec.bind_address:
            self._bind = spec.bind_address
        await progress(5, "installing packages")
        for i, s in enumerate(spec.services):
            await services.ensure_packages(list(s.packages), f"services[{i}].packages")
            if s.service in ("mariadb", "mysql") and s.port:
                self._port = s.port
        self._wants_memcached = any(s.service == "memcached" for s in spec.services)
        await progress(30, "writing my.cnf")
        if spec.configuration and not self.config.values():
            # Before mysqld's first start: static values too are in effect without a restart. (A replayed
            # prepare keeps what a later apply_configuration made.)
            self.config.write_initial(spec.configuration, self._limits.memory_mb or None)
        self._write_my_cnf()
        self._logs.ensure_dir()
        await progress(40, "initialising the datadir")
        # The template's datadir seed on a fresh volume (hostd/volume_seed.py) unless the configuration group
        # sets something that shapes what mariadb-install-db writes: then the guest makes its own, as before.
        shaped = set(spec.configuration) & datadir_seed.SHAPING_PARAMETERS
        seed = "" if shaped else os.path.join(self.volume, datadir_seed.VOLUME_SEED_DIR)
        if shaped:
            await asyncio.to_thread(shutil.rmtree, os.path.join(self.volume, datadir_seed.VOLUME_SEED_DIR), True)
        if await self.mysqld.init_datadir(self.datadir, seed):
            self.mysqld.mark_system_tables(self.datadir, self.config.version)
        else:
            await asyncio.to_thread(self.mysqld.adopt_datadir, self.datadir)
        await progress(60, "starting mysqld")
        await self.start()
        await progress(70, "checking the system tables")
        await self.mysqld.upgrade_system_tables(self.datadir, self.config.version)
        await asyncio.to_thread(self.ensure_admin)
        await progress(80, "creating databases and users")
        # A replayed prepare (agent restarted mid-way) must converge, not fail on what it made already.
        if spec.databases:
            await asyncio.to_thread(self.admin.create_databases, spec.databases, True)
        if spec.users:
            await asyncio.to_thread(self.admin.create_users, spec.users, True)
        for s in spec.services:
            if s.service == "memcached":
                await self._start_memcached(s.port or 11211)
        # Remember the shape (never the users' passwords) so a restarted agent brings mysqld back.
        kept = Prepare(services=spec.services, limits=self._limits, datadir=self.volume,
                       bind_address=self._bind, allowed_cidrs=spec.allowed_cidrs,
                       require_secure_transport=spec.require_secure_transport)
        self._write_private("prepared.json", {"prepare": convert.prepare_to_json(kept), "port": self._port})
        await progress(100, "prepared")

    async def _start_memcached(self, port: int) -> None:
        """memcached on the instance's own address (mysqld's bind address: in bridge mode the container's
        address, reachable where mysqld is and nowhere else), sized to the flavor; a new size restarts it."""
        mem = services.memcached_memory_mb(int(self._limits.memory_mb))
        running = self._extra.get("memcached")
        if running is not None and (running.memory_mb != mem or running.port != port):
            await running.stop()  # a cache: emptied by a resize, like a reboot
            running = None
        if running is None:
            # Debian's memcached package runs it as "memcache"; host tests run everything as root.
            user = self.settings.run_as if self.settings.run_as != "mysql" else "memcache"
            self._extra["memcached"] = services.Memcached(port, self._bind, mem, user)
        await self._extra["memcached"].start()

    async def resume(self) -> None:
        saved = self._read_private("prepared.json")
        if not saved:
            return
        spec = convert.prepare_from_json(saved["prepare"])
        for s in spec.services:
            if s.service in ("mariadb", "mysql") and s.version:
                self.config.version = s.version
        self._limits = spec.limits
        # An older agent kept the datadir here, which was then the volume's root: the same path either way.
        self.volume = spec.datadir or self.volume
        self.datadir = datadir_on_volume(self.volume)
        self._bind = spec.bind_address or self._bind
        self._port = int(saved.get("port", self._port))
        self.admin.allowed = cidrs.parse_cidrs(spec.allowed_cidrs, "allowed_cidrs")
        self._require_secure_transport = spec.require_secure_transport
        self._wants_memcached = any(s.service == "memcached" for s in spec.services)
        self._write_my_cnf()
        await self.start()
        for s in spec.services:
            if s.service == "memcached":
                await self._start_memcached(s.port or 11211)

    # lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._logs.ensure_dir)  # a restore swapped the datadir, or a first start
        await self.mysqld.start()

    async def stop(self) -> None:
        await self.mysqld.stop()

    async def apply_limits(self, limits: Limits) -> None:
        if limits.memory_mb <= 0:
            raise InvalidArgument("memory_mb is required", field="limits.memory_mb")
        self._limits = limits
        self.mysqld.require_configured()
        self._write_my_cnf()
        pool, conns = size_for_limits(self._mysqld_limits())
        await asyncio.to_thread(self.admin.apply_sizes, pool, conns)
        # The configuration group's own sizes, if it sets them, win over the flavor's.
        await asyncio.to_thread(self.config.reapply, ("innodb_buffer_pool_size", "max_connections"))
        saved = self._read_private("prepared.json")
        if saved:
            saved["prepare"]["limits"] = convert.limits_to_json(limits)
            self._write_private("prepared.json", saved)
        if "memcached" in self._extra:
            await self._start_memcached(self._extra["memcached"].port)

    async def apply_configuration(self, values: Mapping[str, str]) -> ConfigurationApplied:
        async with self._lock:
            self.mysqld.require_configured()
            sup = self.mysqld.supervisor
            return await asyncio.to_thread(self.config.apply, values, self._limits.memory_mb or None,
                                           self.configuration_defaults(), sup.pid if sup else None)

    async def close(self) -> None:
        for svc in self._extra.values():
            await svc.stop()
        await self.stop()

    def backups(self) -> Backups:
        return MysqlBackups(self)

    # tenant operations ---------------------------------------------------

    async def create_databases(self, databases: Sequence[Database]) -> None:
        await asyncio.to_thread(self.admin.create_databases, databases)

    async def delete_database(self, database: str) -> None:
        await asyncio.to_thread(self.admin.delete_database, database)

    async def list_databases(self, page_size: int, page_token: str) -> DatabasePage:
        return await asyncio.to_thread(self.admin.list_databases, page_size, page_token)

    async def create_users(self, users: Sequence[User]) -> None:
        await asyncio.to_thread(self.admin.create_users, users)

    async def delete_user(self, user: str, host: str) -> None:
        await asyncio.to_thread(self.admin.delete_user, user, host)

    async def get_user(self, user: str, host: str) -> User:
        return await asyncio.to_thread(self.admin.get_user, user, host)

    async def update_user(self, update: UserUpdate) -> None:
        await asyncio.to_thread(self.admin.update_user, update)

    async def grant_access(self, user: str, host: str, databases: Sequence[str]) -> None:
        await asyncio.to_thread(self.admin.grant_access, user, host, databases)

    async def revoke_access(self, user: str, host: str, database: str) -> None:
        await asyncio.to_thread(self.admin.revoke_access, user, host, database)

    async def list_users(self, page_size: int, page_token: str) -> UserPage:
        return await asyncio.to_thread(self.admin.list_users, page_size, page_token)

    async def enable_root(self) -> RootCredentials:
        password = await asyncio.to_thread(self.admin.enable_root)
        # Trove's "rootEnabled" means "was ever enabled": remembered, unlike the password.
        self._write_private("root.json", {"ever_enabled": True})
        return RootCredentials(user="root", password=password)

    async def disable_root(self) -> None:
        await asyncio.to_thread(self.admin.disable_root)

    async def root_status(self) -> RootStatus:
        return RootStatus(enabled=await asyncio.to_thread(self.admin.root_enabled_now))

    # health --------------------------------------------------------------

    async def health(self) -> GuestHealth:
        h = GuestHealth(service_state=ServiceState.NEW, observed=datetime.now(UTC))
        sup = self.mysqld.supervisor
        if self._preparing:
            h.service_state = ServiceState.BUILDING
        elif sup is not None:
            h.service_state = sup.state
            h.restarts = sup.restarts
            h.last_error = sup.last_error
        if sup is not None and sup.state == ServiceState.RUNNING:
            try:
                st = await asyncio.to_thread(self.admin.status)
                h.accepting_connections = True
                h.uptime_seconds = st.get("Uptime", 0)
                h.connections = st.get("Connections", 0)
                h.threads_connected = st.get("Threads_connected", 0)
                h.queries = st.get("Queries", 0)
                h.slow_queries = st.get("Slow_queries", 0)
                page = st.get("Innodb_page_size", 16384)
                h.buffer_pool_bytes_total = st.get("Innodb_buffer_pool_pages_total", 0) * page
                h.buffer_pool_bytes_data = st.get("Innodb_buffer_pool_pages_data", 0) * page
                repl = await asyncio.to_thread(self.admin.replication)
                if repl is not None:
                    h.replication_running, h.replication_lag_seconds = repl
            except (RedDwarfError, OSError) as exc:
                h.accepting_connections = False
                h.last_error = str(exc)[:300]
        if os.path.isdir(self.datadir):
            du = shutil.disk_usage(self.datadir)
            h.datadir_bytes_used = du.used
            h.datadir_bytes_total = du.total
        for name, svc in self._extra.items():
            h.services[name] = svc.supervisor.state
        return h


class MysqlBackups:
    """Backups of the driver's mysqld through the internal admin, whose password exists only after
    prepare: each command reads it afresh."""

    def __init__(self, driver: MysqlDriver) -> None:
        self.driver = driver

    def _runner(self) -> BackupRunner:
        # Imported on the first backup or restore, not at the agent's start (a create waits on that start).
        from .backup import BackupRunner, BackupSettings, MysqlAccess

        d = self.driver
        access = MysqlAccess(socket=d.mysqld.socket, user=names.ADMIN_USER, password=d.admin_password(),
                             datadir=d.datadir, defaults_file=d.mysqld.my_cnf_path)
        # Backup and restore work on the data volume, never on the container's root filesystem.
        work = volume_work_dir(d.volume)
        os.makedirs(work, mode=0o700, exist_ok=True)
        return BackupRunner(access, d.stop, d.start, BackupSettings(work_dir=work))

    async def backup(self, backup_id: str, incremental_from_lsn: str, upload: Upload,
                     progress: Progress) -> BackupResult:
        return await self._runner().backup(backup_id, incremental_from_lsn, upload, progress)

    async def restore(self, backup_ids: Sequence[str], sha256s: Sequence[str], download: Download,
                      progress: Progress) -> None:
        await self._runner().restore(backup_ids, sha256s, download, progress)
        # The restored mysql.user is the source's: re-assert this guest's own internal admin (root
        # authenticates by unix socket inside the guest) before anything else talks to mysqld.
        await asyncio.to_thread(self.driver.ensure_admin)

    async def table_checksums(self) -> list[TableChecksum]:
        return await self._runner().table_checksums()

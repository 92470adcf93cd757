"""The lifecycle of a guest's mysqld: its my.cnf on disk, the datadir made by mariadb-install-db, and the
server itself started, watched and restarted by a Supervisor."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
from typing import Any

import pymysql

from reddwarf.common import datadir_seed, runner
from reddwarf.common.errors import FailedPrecondition, Unavailable

from .mycnf import VOLUME_WORK_DIR, MyCnf, Tls, mysqld_tmpdir, render_my_cnf
from .supervisor import Supervisor

log = logging.getLogger("reddwarf.agent.mysqld")

INIT_MARKER = ".reddwarf-initialising"
# In the datadir: the datastore version whose mysqld last upgraded (or made) its system tables. A prepare
# with another version (an upgrade: the same volume in a container of the new version) runs mariadb-upgrade.
VERSION_MARKER = "reddwarf_datastore_version"
# The datadir's directory on the data volume. Not the volume's root: there ext4's lost+found would be a
# schema ("#mysql50#lost+found") and the agent's work directory would need hiding.
DATADIR_ON_VOLUME = "data"
# How often a starting mysqld is checked for readiness: a look for its socket file, cheap enough to do often
# (a create waits on it; the check used to run every 0.2 s).
READY_POLL_SECONDS = 0.02


def datadir_on_volume(volume: str) -> str:
    """mysqld's datadir on the volume mounted at `volume`: `<volume>/data`, except on a volume an older
    agent initialised, whose system schema (or cut-off initialisation) is at the root: that datadir stays
    where it is (moving a tenant's live files buys nothing but risk; the listings hide lost+found there)."""
    sub = os.path.join(volume, DATADIR_ON_VOLUME)
    if os.path.isdir(os.path.join(sub, "mysql")):
        return sub
    if os.path.isdir(os.path.join(volume, "mysql")) or os.path.exists(os.path.join(volume, INIT_MARKER)):
        return volume
    return sub


def find_binary(configured: str, *candidates: str) -> str:
    if configured:
        return configured
    for c in candidates:
        found = shutil.which(c) or (f"/usr/sbin/{c}" if os.path.exists(f"/usr/sbin/{c}") else None)
        if found:
            return found
    raise FailedPrecondition(f"{candidates[0]} is not installed", field="services")


class Mysqld:
    """One local mysqld, configured by the my.cnf in `state_dir`, running as the OS user `run_as`."""

    def __init__(self, state_dir: str, run_as: str = "mysql", mysqld: str = "", install_db: str = "",
                 tls_dir: str = "", server_id: int = 0) -> None:
        self.state_dir = state_dir
        self.server_id = server_id
        self.run_as = run_as
        self._mysqld_binary = mysqld
        self._install_db_binary = install_db
        self._tls_dir = tls_dir
        self._cnf: MyCnf | None = None
        self.supervisor: Supervisor | None = None

    # paths ---------------------------------------------------------------

    @property
    def my_cnf_path(self) -> str:
        return os.path.join(self.state_dir, "my.cnf")

    @property
    def run_dir(self) -> str:
        """Where mysqld writes its socket, pid and error log: it runs as run_as and must not need to
        enter the agent's private (0700, root) state dir, which holds the internal admin's password."""
        if self.run_as == "root":
            return self.state_dir
        path = "/run/mysqld"
        os.makedirs(path, mode=0o755, exist_ok=True)
        shutil.chown(path, self.run_as, self.run_as)
        return path

    @property
    def socket(self) -> str:
        return os.path.join(self.run_dir, "mysqld.sock")

    @property
    def tls_dir(self) -> str:
        """mysqld's TLS key and certificates: outside the private state dir, which mysqld (running as
        run_as) cannot enter, yet readable by run_as only."""
        if self._tls_dir:
            return self._tls_dir
        return os.path.join(self.state_dir, "mysql-tls") if self.run_as == "root" else "/etc/mysql/reddwarf-tls"

    @property
    def tls_files(self) -> Tls:
        d = self.tls_dir
        return Tls(cert=os.path.join(d, "server-cert.pem"), key=os.path.join(d, "server-key.pem"),
                   ca=os.path.join(d, "ca.pem"))

    def tls_ready(self) -> bool:
        t = self.tls_files
        return all(os.path.exists(p) for p in (t.cert, t.key, t.ca))

    def my_cnf(self, volume: str, datadir: str, port: int, bind_address: str, buffer_pool_mb: int,
               max_connections: int, open_files_limit: int, require_secure_transport: bool = False) -> MyCnf:
        run_dir = self.run_dir
        return MyCnf(datadir=datadir, socket=os.path.join(run_dir, "mysqld.sock"),
                     pid_file=os.path.join(run_dir, "mysqld.pid"), log_error=os.path.join(run_dir, "mysqld.err"),
                     port=port, bind_address=bind_address, buffer_pool_mb=buffer_pool_mb,
                     max_connections=max_connections, open_files_limit=open_files_limit,
                     tmpdir=mysqld_tmpdir(volume), tls=self.tls_files if self.tls_ready() else None,
                     require_secure_transport=require_secure_transport, server_id=self.server_id)

    def write_my_cnf(self, cnf: MyCnf) -> None:
        with open(self.my_cnf_path, "w") as f:
            f.write(render_my_cnf(cnf))
        self._cnf = cnf

    def ensure_tmpdir(self) -> None:
        """mysqld's tmpdir on the volume, owned by run_as (made again after a restore swapped the datadir)."""
        if self._cnf is None or not self._cnf.tmpdir:
            return
        os.makedirs(self._cnf.tmpdir, mode=0o700, exist_ok=True)
        if self.run_as != "root":
            shutil.chown(os.path.dirname(self._cnf.tmpdir), self.run_as, self.run_as)
            shutil.chown(self._cnf.tmpdir, self.run_as, self.run_as)

    def require_configured(self) -> None:
        if not os.path.exists(self.my_cnf_path):
            raise FailedPrecondition("the datastore is not prepared yet", field="prepare")

    # the datadir ---------------------------------------------------------

    async def init_datadir(self, datadir: str, seed: str = "") -> bool:
        """Makes the system tables in an empty datadir; False if it holds them already. `seed`: a directory
        holding a datadir seed (common/datadir_seed.py) that hostd copied onto this volume: taken over (one
        rename) instead of running mariadb-install-db when it is whole; removed either way."""
        if seed and os.path.isdir(seed):
            taken = await asyncio.to_thread(self._take_seed, seed, datadir)
            shutil.rmtree(seed, ignore_errors=True)
            if taken:
                return True
        # A marker on the volume spans mariadb-install-db: if the agent died inside it, the half-made
        # datadir (which cannot hold user data yet) is cleared and made again.
        marker = os.path.join(datadir, INIT_MARKER)
        if os.path.exists(marker):
            log.warning("clearing a datadir whose initialisation was cut off", extra={"datadir": datadir})
            for name in os.listdir(datadir):
                path = os.path.join(datadir, name)
                if name in ("lost+found", INIT_MARKER, VOLUME_WORK_DIR):
                    continue
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
        elif os.path.isdir(os.path.join(datadir, "mysql")):
            return False
        os.makedirs(datadir, mode=0o750, exist_ok=True)
        if any(n not in ("lost+found", INIT_MARKER, VOLUME_WORK_DIR) for n in os.listdir(datadir)):
            raise FailedPrecondition(f"datadir {datadir} holds files but no MySQL data", field="datadir")
        with open(marker, "w"):
            pass
        if self.run_as != "root":
            shutil.chown(datadir, self.run_as, self.run_as)
        self.ensure_tmpdir()
        install_db = find_binary(self._install_db_binary, "mariadb-install-db", "mysql_install_db")
        await runner.run_async([install_db, f"--defaults-file={self.my_cnf_path}", f"--datadir={datadir}",
                                f"--user={self.run_as}", *datadir_seed.INSTALL_DB_OPTIONS], timeout=300)
        os.unlink(marker)
        return True

    def _take_seed(self, seed: str, datadir: str) -> bool:
        """The seed's datadir becomes `datadir` when the seed is whole and `datadir` holds nothing yet."""
        if datadir_seed.read_manifest(seed) is None:
            log.warning("ignoring an incomplete datadir seed", extra={"seed": seed})
            return False
        if os.path.isdir(datadir) and os.listdir(datadir):
            return False  # made already (or holding something): never replaced
        source = os.path.join(seed, datadir_seed.SEED_DATA)
        # The seed was scrubbed when made; scrubbed again here, so no instance ever starts with a server's run-time
        # files (pid, logs, TLS files...) whoever made the seed.
        removed = datadir_seed.scrub(source)
        if removed:
            log.warning("removed identity files from a datadir seed", extra={"files": ",".join(removed)})
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(datadir)
        os.rename(source, datadir)
        os.chmod(datadir, 0o750)
        self.adopt_datadir(datadir)
        if self.run_as != "root":
            shutil.chown(datadir, self.run_as, self.run_as)
        log.info("datadir taken over from the template's seed", extra={"datadir": datadir})
        return True

    def adopt_datadir(self, datadir: str) -> int:
        """Gives the datadir's files to run_as where another owns them: a volume made in another template's
        container (an upgrade: Debian 12's mysql user is uid 101, Debian 13's is 100). Returns the count."""
        if self.run_as == "root" or not os.path.isdir(datadir):
            return 0
        pw = pwd.getpwnam(self.run_as)
        changed = 0
        for top, dirs, files in os.walk(datadir):
            for path in [top, *(os.path.join(top, n) for n in dirs + files)]:
                st = os.lstat(path)
                if os.path.basename(path) == "lost+found" or st.st_uid == 0:
                    continue  # root's files (the version marker, mariadb-upgrade's info) stay root's
                if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
                    os.lchown(path, pw.pw_uid, pw.pw_gid)
                    changed += 1
        if changed:
            log.info("datadir given to the mysql user", extra={"datadir": datadir, "files": changed})
        return changed

    def system_tables_version(self, datadir: str) -> str | None:
        try:
            with open(os.path.join(datadir, VERSION_MARKER)) as f:
                return f.read().strip()
        except FileNotFoundError:
            return None

    def mark_system_tables(self, datadir: str, version: str) -> None:
        tmp = os.path.join(datadir, VERSION_MARKER + ".tmp")
        with open(tmp, "w") as f:
            f.write(version + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(datadir, VERSION_MARKER))

    async def upgrade_system_tables(self, datadir: str, version: str) -> bool:
        """mariadb-upgrade on the running mysqld when the datadir's system tables were last made or upgraded
        by another datastore version (or it is not known: a datadir older than the marker); True if it ran.
        mariadb-upgrade skips what its own info file says is done, so a replay costs a second."""
        if self.system_tables_version(datadir) == version:
            return False
        binary = find_binary("", "mariadb-upgrade", "mysql_upgrade")
        # root@localhost by unix_socket, as the agent is root in the guest.
        await runner.run_async([binary, f"--socket={self.socket}", "--user=root", "--silent"], timeout=1800)
        self.mark_system_tables(datadir, version)
        return True

    # the server ----------------------------------------------------------

    def connect_root(self) -> pymysql.connections.Connection[Any]:
        # The agent is root in the guest: root@localhost authenticates by unix_socket.
        return pymysql.connect(unix_socket=self.socket, user="root", autocommit=True, connect_timeout=5,
                               ssl_disabled=True)

    async def accepting(self) -> bool:
        if not os.path.exists(self.socket):
            return False  # mariadbd makes its socket as it becomes ready: no connection attempt before that
        def ping() -> bool:
            try:
                pymysql.connect(unix_socket=self.socket, user="root", connect_timeout=1, ssl_disabled=True).close()
                return True
            except pymysql.err.MySQLError as exc:
                # "Access denied" still proves the server is up and accepting connections.
                return bool(exc.args) and exc.args[0] in (1045, 1698)
        return await asyncio.to_thread(ping)

    async def start(self) -> None:
        """Starts mysqld under supervision (no-op if running) and waits until it accepts connections."""
        self.require_configured()
        self.ensure_tmpdir()
        if self.supervisor is None:
            binary = find_binary(self._mysqld_binary, "mariadbd", "mysqld")
            self.supervisor = Supervisor("mysqld", [binary, f"--defaults-file={self.my_cnf_path}",
                                                    f"--user={self.run_as}"], ready=self.accepting,
                                         ready_poll=READY_POLL_SECONDS)
            running = self.running_pid()
            if running is not None:  # started by this agent before it exec'd into a new build
                self.supervisor.adopt(running)
        try:
            await self.supervisor.start(ready_timeout=120)
        except TimeoutError as exc:
            raise Unavailable(str(exc)) from None

    def running_pid(self) -> int | None:
        """The pid of a mysqld already running with our my.cnf (its pid file, checked against the process's
        command line: after a container restart the file is stale and its pid may be anyone's)."""
        try:
            with open(os.path.join(self.run_dir, "mysqld.pid")) as f:
                pid = int(f.read().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        return pid if f"--defaults-file={self.my_cnf_path}".encode() in argv else None

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()

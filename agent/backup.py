"""Backups and restores of the local mysqld: mariadb-backup's xbstream, compressed by zstd, hashed, streamed.

The bytes never rest in the guest on the way out (mariadb-backup | zstd | SHA-256 | upload), and on the way
back every stream is hashed and compared with the digest the server recorded BEFORE anything touches the
datadir. A failed restore puts the previous datadir back and starts mysqld on it again.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pymysql

from reddwarf.common import runner
from reddwarf.common.errors import FailedPrecondition, Internal, InvalidArgument, RedDwarfError, Unavailable
from reddwarf.common.log import bind
from reddwarf.common.names import quote_ident

from . import xbstream
from .model import BackupChunk, BackupResult, Download, Progress, TableChecksum, Upload

log = logging.getLogger("reddwarf.agent.backup")

# gRPC's default message limit is 4 MiB; 1 MiB chunks keep the stream responsive and the overhead small.
CHUNK_BYTES = 1 << 20
PIPE_BYTES = 1 << 20
T = TypeVar("T")
SYSTEM_DATABASES = ("mysql", "information_schema", "performance_schema", "sys")
_LSN_RE = re.compile(r"^[0-9]{1,20}\Z")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_SHA_RE = re.compile(r"^[0-9a-f]{64}\Z")


class BackupIntegrityError(FailedPrecondition):
    """A stored backup's bytes are not the bytes that were backed up (Trove's silent bad restore)."""


@dataclass(frozen=True)
class MysqlAccess:
    """How to reach the local mysqld. The password is passed to tools only in a 0600 option file."""
    socket: str
    user: str
    password: str
    datadir: str
    defaults_file: str = ""

    def __repr__(self) -> str:  # never print the password
        return f"MysqlAccess(socket={self.socket!r}, user={self.user!r}, datadir={self.datadir!r})"


@dataclass(frozen=True)
class BackupSettings:
    """Tuning knobs; the agent's settings object fills them."""
    zstd_level: int = 1  # below 1: zstd's --fast=N levels (N = -level): less CPU, a larger stream
    zstd_threads: int = 0  # 0 = one per core
    backup_timeout: float = 6 * 3600.0
    prepare_timeout: float = 6 * 3600.0
    # Where backups keep their small files and restores download and prepare; default: beside the datadir
    # (same filesystem: moves are renames). A guest passes a directory on its data volume, beside the datadir
    # (or inside it, on an older instance whose datadir is the volume's root: the restore then leaves that
    # directory where it is).
    work_dir: str = ""
    progress_interval: float = 1.0
    # Bytes one stream may unpack to (0: no cap): a small upload must not decompress into a full disk.
    max_extract_bytes: int = 0
    # Extra `mariadb-backup --prepare` options (the proof sandbox points --plugin-dir at an empty dir).
    prepare_options: tuple[str, ...] = ()


@dataclass
class _Pipeline:
    """The children of one backup, the reader of zstd's output and the side tasks; `kill` ends them all."""
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    reader: io.FileIO | None = None
    pending: asyncio.Future[bytes] | None = None  # the read running ahead in a thread
    tasks: list[asyncio.Future[Any]] = field(default_factory=list)

    def start_reader(self, fd: int) -> io.FileIO:
        self.reader = io.FileIO(fd, "rb")
        return self.reader

    def task(self, aw: Awaitable[T]) -> asyncio.Future[T]:
        fut = asyncio.ensure_future(aw)
        self.tasks.append(fut)
        return fut

    async def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                # Bounded: a child reaped elsewhere must not hang the command that is cleaning up.
                await asyncio.wait_for(proc.wait(), 10)
        # zstd is gone, so a read still running in its thread sees EOF and returns: only then is the pipe
        # closed (closing an fd under a blocked read could hand the number to someone else's open).
        if self.pending is not None:
            await asyncio.wait([self.pending], timeout=10)
        if self.reader is not None and (self.pending is None or self.pending.done()):
            self.reader.close()
        for fut in self.tasks:
            fut.cancel()  # a no-op when it is done
        if self.tasks:
            await asyncio.wait(self.tasks)
        for fut in [*self.tasks, *([self.pending] if self.pending else [])]:
            if fut.done() and not fut.cancelled():
                fut.exception()  # retrieved: a side failure after the one reported is not logged as lost


def _read_chunk(f: io.FileIO, digest: Any) -> bytes:
    """The next CHUNK_BYTES of the stream (less only at its end, b"" after it), hashed; runs in a thread.

    readinto fills one buffer straight from the pipe, and hashlib drops the GIL for large updates, so this
    overlaps with the upload on the event loop instead of taking turns with it."""
    buf = bytearray(CHUNK_BYTES)
    got = 0
    with memoryview(buf) as view:
        while got < CHUNK_BYTES:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    if got < CHUNK_BYTES:
        del buf[got:]
    digest.update(buf)
    return bytes(buf)


def _zstd_level_flag(level: int) -> str:
    return f"-{min(level, 19)}" if level >= 1 else f"--fast={max(1, -level)}"


def _grow_pipe(fd: int) -> None:
    """A 1 MiB pipe instead of 64 KiB: a stage that is briefly descheduled (2 busy cores) no longer stops
    the one before it at once. Best effort: a smaller pipe-max-size just keeps the default."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def _validate_backup_id(backup_id: str, field_name: str = "backup_id") -> str:
    if not isinstance(backup_id, str) or not _ID_RE.match(backup_id):
        raise InvalidArgument("backup id must be 1..64 letters, digits, '-' or '_'", field=field_name)
    return backup_id


def _dir_size(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _proc_read_bytes(pid: int) -> int:
    """Bytes a child has read so far (/proc/<pid>/io rchar): zstd's input, i.e. the raw xbstream size."""
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class BackupRunner:
    """Makes and restores backups of one local mysqld."""

    def __init__(self, access: MysqlAccess, stop_mysqld: Callable[[], Awaitable[None]],
                 start_mysqld: Callable[[], Awaitable[None]], settings: BackupSettings | None = None) -> None:
        self.access = access
        self.stop_mysqld = stop_mysqld
        self.start_mysqld = start_mysqld
        self.settings = settings or BackupSettings()

    # ------------------------------------------------------------------ helpers

    def _work_parent(self) -> str:
        return self.settings.work_dir or os.path.dirname(os.path.abspath(self.access.datadir))

    def _write_option_file(self, tmp: str) -> str:
        """A 0600 option file with the credentials (never argv): includes the instance's my.cnf if any."""
        path = os.path.join(tmp, "client.cnf")
        lines = []
        if self.access.defaults_file:
            lines.append(f"!include {self.access.defaults_file}")
        for group in ("client", "mariadb-backup"):
            lines += [f"[{group}]", f"user={self.access.user}", f"socket={self.access.socket}"]
            if self.access.password:
                lines.append(f"password={self.access.password}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def _connect(self) -> pymysql.connections.Connection:
        # A unix socket never needs TLS; pymysql would otherwise build a default SSL context (loading the
        # system CA store, ~0.1 s of CPU) for every connection.
        return pymysql.connect(unix_socket=self.access.socket, user=self.access.user,
                               password=self.access.password, autocommit=True, connect_timeout=10,
                               ssl_disabled=True)

    # ------------------------------------------------------------------ checksums

    def _table_checksums_sync(self) -> list[TableChecksum]:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT TABLE_SCHEMA, TABLE_NAME FROM information_schema.TABLES "
                    "WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN (%s, %s, %s, %s) "
                    "ORDER BY TABLE_SCHEMA, TABLE_NAME", SYSTEM_DATABASES)
                tables = [(str(s), str(t)) for s, t in cur.fetchall()]
                out = []
                for schema, table in tables:
                    # Identifiers come from the server's own catalog; quoted all the same.
                    cur.execute(f"CHECKSUM TABLE {quote_ident(schema)}.{quote_ident(table)}")
                    row = cur.fetchone()
                    if not row or row[1] is None:  # the table could not be read (mysqld recovering it)
                        raise Unavailable(f"CHECKSUM TABLE {schema}.{table} gave no value", field="table")
                    value = int(row[1])
                    # CHECKSUM TABLE is unsigned 64-bit; the proto field is int64.
                    if value >= 1 << 63:
                        value -= 1 << 64
                    out.append(TableChecksum(table=f"{schema}.{table}", checksum=value))
                return out
        finally:
            conn.close()

    async def table_checksums(self) -> list[TableChecksum]:
        """CHECKSUM TABLE of every non-system base table, sorted by "db.table"."""
        try:
            return await asyncio.to_thread(self._table_checksums_sync)
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError) as exc:
            # mysqld went away or is restarting (the agent brings it back): worth asking again.
            raise Unavailable(f"cannot take table checksums now: {exc}") from exc
        except pymysql.MySQLError as exc:
            raise FailedPrecondition(f"cannot take table checksums: {exc}") from exc

    def _version_sync(self) -> str:
        conn = self._connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT VERSION()")
                row = cur.fetchone()
                return str(row[0]).split("-")[0] if row else ""
        finally:
            conn.close()

    # ------------------------------------------------------------------ backup

    async def _spawn_pipeline(self, argv: list[str], pipeline: _Pipeline, err_path: str, zerr_path: str) -> int:
        """mariadb-backup | zstd, both pipes grown; returns the read end of zstd's output (ours to close)."""
        read_fd, write_fd = os.pipe()
        out_r, out_w = os.pipe()
        for fd in (read_fd, out_r):
            _grow_pipe(fd)
        try:
            with open(err_path, "wb") as err_f, open(zerr_path, "wb") as zerr_f:
                pipeline.procs.append(await runner.spawn(argv, stdout=write_fd, stderr=err_f.fileno()))
                pipeline.procs.append(await runner.spawn(
                    ["zstd", "-q", "-c", _zstd_level_flag(self.settings.zstd_level), f"-T{self.settings.zstd_threads}"],
                    stdin=read_fd, stdout=out_w, stderr=zerr_f.fileno()))
        except BaseException:
            os.close(out_r)
            raise
        finally:
            os.close(read_fd)
            os.close(write_fd)
            os.close(out_w)
        return out_r

    async def backup(self, backup_id: str, incremental_from_lsn: str, upload: Upload,
                     progress: Progress) -> BackupResult:
        """Streams a full (or, given the parent's to_lsn, incremental) backup to `upload`.

        The last chunk carries the SHA-256 only when both mariadb-backup and zstd succeeded, so a failed
        or cut-off backup can never be committed by the server."""
        _validate_backup_id(backup_id)
        if incremental_from_lsn and not _LSN_RE.match(incremental_from_lsn):
            raise InvalidArgument("incremental_from_lsn must be a decimal LSN", field="incremental_from_lsn")
        blog = bind(log, {"backup": backup_id})
        tmp = tempfile.mkdtemp(prefix=f"reddwarf-backup-{backup_id}-", dir=self.settings.work_dir or None)
        pipeline = _Pipeline()
        digest = hashlib.sha256()
        sent = 0
        started = time.monotonic()
        try:
            option_file = self._write_option_file(tmp)
            lsn_dir = os.path.join(tmp, "lsn")
            os.mkdir(lsn_dir)
            argv = ["mariadb-backup", f"--defaults-file={option_file}", "--backup", "--stream=xbstream",
                    f"--datadir={self.access.datadir}", f"--target-dir={os.path.join(tmp, 'target')}",
                    f"--extra-lsndir={lsn_dir}", f"--tmpdir={tmp}"]
            if incremental_from_lsn:
                argv.append(f"--incremental-lsn={incremental_from_lsn}")
            err_path = os.path.join(tmp, "mariadb-backup.log")
            zerr_path = os.path.join(tmp, "zstd.log")
            zout = pipeline.start_reader(await self._spawn_pipeline(argv, pipeline, err_path, zerr_path))
            mb, zstd = pipeline.procs
            # Neither the version nor the progress estimate is needed to start: both are asked for while
            # the stream already runs (each used to cost its own serial round before mariadb-backup began).
            version_task = pipeline.task(asyncio.to_thread(self._version_sync))
            estimate_task = pipeline.task(asyncio.to_thread(_dir_size, self.access.datadir))
            await progress(0, "backup started", 0)

            failure: list[Exception] = []

            async def chunks() -> AsyncGenerator[BackupChunk, None]:
                # gRPC turns an exception raised by a request iterator into a cancelled call: keep the
                # real cause (mariadb-backup failed, mysqld went away) to report it instead.
                try:
                    async for chunk in produce():
                        yield chunk
                except Exception as exc:
                    failure.append(exc)
                    raise

            async def produce() -> AsyncGenerator[BackupChunk, None]:
                nonlocal sent
                first = True
                last_report = time.monotonic()
                loop = asyncio.get_running_loop()
                # One chunk is read (and hashed) ahead in a thread while the previous one is uploaded.
                pending = pipeline.pending = loop.run_in_executor(None, _read_chunk, zout, digest)
                while True:
                    payload = await pending
                    if not payload:
                        break
                    pending = pipeline.pending = loop.run_in_executor(None, _read_chunk, zout, digest)
                    sent += len(payload)
                    yield BackupChunk(backup_id=backup_id if first else "", data=payload)
                    first = False
                    now = time.monotonic()
                    if now - last_report >= self.settings.progress_interval:
                        last_report = now
                        raw = _proc_read_bytes(zstd.pid)
                        total = estimate_task.result() if estimate_task.done() else 0
                        await progress(min(99, int(raw * 100 / total)) if total > 0 else 0, "backing up", raw)
                rc_mb = await asyncio.wait_for(mb.wait(), self.settings.backup_timeout)
                rc_z = await zstd.wait()
                if rc_mb != 0:
                    raise Internal(f"mariadb-backup exited {rc_mb}: {_tail(err_path)}")
                if rc_z != 0:
                    raise Internal(f"zstd exited {rc_z}: {_tail(zerr_path)}")
                # Only now, with every byte produced successfully, does the stream say it is complete.
                yield BackupChunk(backup_id=backup_id if first else "", data=b"", sha256=digest.hexdigest())

            gen = chunks()
            try:
                response = await asyncio.wait_for(upload(gen), self.settings.backup_timeout)
            except (asyncio.CancelledError, grpc.RpcError):
                task = asyncio.current_task()
                if failure and not (task is not None and task.cancelling()):
                    raise failure[0] from None
                raise
            finally:
                await gen.aclose()
            sha = digest.hexdigest()
            version = await version_task
            if response.sha256 != sha or response.size_bytes != sent:
                raise Internal(f"the server stored {response.size_bytes} bytes with SHA-256 {response.sha256}, "
                               f"the agent sent {sent} bytes with SHA-256 {sha}")
            to_lsn = _parse_checkpoints(os.path.join(lsn_dir, "xtrabackup_checkpoints")).get("to_lsn", "")
            if not to_lsn:
                raise Internal("mariadb-backup wrote no to_lsn in xtrabackup_checkpoints")
            await progress(100, "backup complete", sent)
            blog.info("backup done size=%s sha256=%s seconds=%.1f incremental=%s", sent, sha,
                      time.monotonic() - started, bool(incremental_from_lsn))
            # No checksum pass on the live guest: under concurrent writes it could not match the backup's
            # point in time. The server restores the stream in a scratch mariadbd and checksums that.
            return BackupResult(size_bytes=sent, sha256=sha, to_lsn=to_lsn, datastore_version=version)
        except RedDwarfError:
            raise
        except TimeoutError as exc:
            raise Internal(f"backup {backup_id} timed out") from exc
        except (OSError, pymysql.MySQLError) as exc:
            raise Internal(f"backup {backup_id} failed: {exc}") from exc
        finally:
            await pipeline.kill()
            shutil.rmtree(tmp, ignore_errors=True)

    # ------------------------------------------------------------------ restore

    async def _download_verified(self, backup_id: str, expected: str, path: str, download: Download) -> int:
        digest = hashlib.sha256()
        size = 0
        with open(path, "wb") as f:
            async for chunk in download(backup_id):
                if chunk.data:
                    digest.update(chunk.data)
                    size += len(chunk.data)
                    await asyncio.to_thread(f.write, chunk.data)
        actual = digest.hexdigest()
        if actual != expected:
            raise BackupIntegrityError(
                f"backup {backup_id} is corrupt: expected SHA-256 {expected}, the stored stream has {actual}; "
                "nothing was restored", field="sha256")
        return size

    async def _extract(self, archive: str, dest: str, tmp: str) -> None:
        """zstd -d | (the allowlist filter) | mbstream -x into a new, empty `dest`; then the tree is checked
        again and backup-my.cnf rebuilt from its allowlist (agent/xbstream.py)."""
        os.makedirs(dest)  # must not exist yet: mbstream writes into an empty directory of our own
        procs: list[subprocess.Popen[bytes]] = []
        try:
            await asyncio.wait_for(asyncio.to_thread(self._extract_sync, archive, dest, tmp, procs),
                                   self.settings.prepare_timeout)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        xbstream.check_tree(dest)
        xbstream.rebuild_cnf(dest)

    def _extract_sync(self, archive: str, dest: str, tmp: str, procs: list[subprocess.Popen[bytes]]) -> None:
        zerr, xerr = os.path.join(tmp, "unzstd.log"), os.path.join(tmp, "mbstream.log")
        with open(zerr, "wb") as zf, open(xerr, "wb") as xf, open(archive, "rb") as src:
            zstd = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=src, stdout=subprocess.PIPE, stderr=zf)
            procs.append(zstd)
            mbstream = subprocess.Popen(["mbstream", "-x", "-C", dest], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=xf, cwd=dest)
            procs.append(mbstream)
            assert zstd.stdout is not None and mbstream.stdin is not None
            try:
                xbstream.filter_stream(zstd.stdout, mbstream.stdin, self.settings.max_extract_bytes)
            except BrokenPipeError:
                pass  # mbstream gave up: its exit status and log say why
            except BaseException:
                mbstream.kill()  # nothing after a refused chunk reaches the disk
                raise
            finally:
                with contextlib.suppress(BrokenPipeError):
                    mbstream.stdin.close()
                zstd.stdout.close()
            rc_z, rc_x = zstd.wait(self.settings.prepare_timeout), mbstream.wait(self.settings.prepare_timeout)
        if rc_z != 0:
            raise Internal(f"zstd -d exited {rc_z}: {_tail(zerr)}")
        if rc_x != 0:
            raise Internal(f"mbstream -x exited {rc_x}: {_tail(xerr)}")

    async def restore(self, backup_ids: Sequence[str], sha256s: Sequence[str], download: Download,
                      progress: Progress) -> None:
        """Replaces the datadir with the given chain (full first, then incrementals in order)."""
        if not backup_ids:
            raise InvalidArgument("at least one backup id is required", field="backup_ids")
        if len(backup_ids) != len(sha256s):
            raise InvalidArgument("one sha256 per backup id is required", field="sha256")
        for i, (bid, sha) in enumerate(zip(backup_ids, sha256s, strict=True)):
            _validate_backup_id(bid, f"backup_ids[{i}]")
            if not _SHA_RE.match(sha or ""):
                raise InvalidArgument("sha256 must be 64 lowercase hex digits", field=f"sha256[{i}]")
        rlog = bind(log, {"backup": backup_ids[-1]})
        work_parent = self._work_parent()
        tmp = tempfile.mkdtemp(prefix="reddwarf-restore-", dir=work_parent)
        datadir = os.path.abspath(self.access.datadir)
        try:
            # 1. Download and verify every stream first: a corrupt one stops us before any change.
            archives = []
            n = len(backup_ids)
            for i, (bid, sha) in enumerate(zip(backup_ids, sha256s, strict=True)):
                path = os.path.join(tmp, f"{i:03d}-{bid}.xbstream.zst")
                size = await self._download_verified(bid, sha, path, download)
                archives.append(path)
                await progress(int(30 * (i + 1) / n), f"downloaded and verified {bid}", size)
            # 2. Extract and prepare outside the datadir.
            dirs = []
            for i, path in enumerate(archives):
                dest = os.path.join(tmp, f"x{i:03d}")
                await self._extract(path, dest, tmp)
                os.unlink(path)  # keep disk use to one copy of the data
                dirs.append(dest)
            await progress(45, "extracted", 0)
            full = dirs[0]
            prepare = ["mariadb-backup", "--prepare", *self.settings.prepare_options, f"--target-dir={full}"]
            await runner.run_async(prepare, timeout=self.settings.prepare_timeout)
            for inc in dirs[1:]:
                await runner.run_async([*prepare, f"--incremental-dir={inc}"], timeout=self.settings.prepare_timeout)
                shutil.rmtree(inc, ignore_errors=True)
            await progress(70, "prepared", 0)
            # 3. Swap the datadir, keeping the old one until mysqld runs on the new.
            await self._swap_datadir(full, datadir, tmp, rlog)
            await progress(100, "restore complete", 0)
        except RedDwarfError:
            raise
        except runner.CommandError as exc:
            raise Internal(f"restore failed: {exc}") from exc
        except TimeoutError as exc:
            raise Internal("restore timed out") from exc
        except OSError as exc:
            raise Internal(f"restore failed: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _kept_entry(self, datadir: str) -> str:
        """The datadir entry holding the work directory when that lies inside the datadir ("" if not)."""
        rel = os.path.relpath(os.path.abspath(self._work_parent()), datadir)
        return "" if rel.startswith("..") or rel == "." else rel.split(os.sep)[0]

    async def _swap_datadir(self, prepared: str, datadir: str, tmp: str, rlog: logging.LoggerAdapter[logging.Logger]) -> None:
        st = os.stat(datadir)
        aside = os.path.join(tmp, "previous-datadir")
        os.mkdir(aside)
        kept = self._kept_entry(datadir)
        await self.stop_mysqld()
        moved: list[str] = []
        try:
            # Entry by entry, so a datadir that is a volume's mount point works too.
            for name in os.listdir(datadir):
                if name == kept:
                    continue
                shutil.move(os.path.join(datadir, name), os.path.join(aside, name))
                moved.append(name)
            same_fs = os.stat(prepared).st_dev == st.st_dev
            await runner.run_async(["mariadb-backup", "--move-back" if same_fs else "--copy-back",
                                    *(["--force-non-empty-directories"] if kept else []),
                                    f"--target-dir={prepared}", f"--datadir={datadir}"],
                                   timeout=self.settings.prepare_timeout)
            await asyncio.to_thread(_chown_tree, datadir, st.st_uid, st.st_gid)
            await self.start_mysqld()
        except BaseException:
            rlog.warning("restore failed; putting the previous datadir back")
            for name in os.listdir(datadir):
                if name == kept:
                    continue
                p = os.path.join(datadir, name)
                if os.path.isdir(p) and not os.path.islink(p):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(p)
            for name in moved:
                shutil.move(os.path.join(aside, name), os.path.join(datadir, name))
            with contextlib.suppress(Exception):
                await self.start_mysqld()
            raise


def _chown_tree(path: str, uid: int, gid: int) -> None:
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), uid, gid)


def _parse_checkpoints(path: str) -> dict[str, str]:
    """xtrabackup_checkpoints: `backup_type = full-backuped`, `from_lsn = 0`, `to_lsn = 123`, ..."""
    out: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                key, sep, value = line.partition("=")
                if sep:
                    out[key.strip()] = value.strip()
    except OSError:
        pass
    return out

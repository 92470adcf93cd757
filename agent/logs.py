"""Guest logs: the datastore's error, slow-query and general logs, kept on the data volume, bounded in size by
rotation, and read in pieces for the server (list, enable/disable, tail, save).

A log is named from a fixed set; the name maps to a file in the agent's own logs directory and nothing the
server sends is ever used as a path. Each log is at most `max_bytes` in its current file plus `keep` rotated
generations (`<log>.log.1` the newest); rotation renames, then asks the datastore to reopen its file
(MariaDB's FLUSH ... LOGS), so nothing written is lost and nothing grows without bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, RedDwarfError

log = logging.getLogger("reddwarf.agent.logs")

# Name → Trove's type. SYS logs cannot be turned off.
LOG_TYPES = {"error": "SYS", "slow_query": "USER", "general": "USER"}
# What mysqld is told to reopen after a rotation; fixed statements, never built from input.
FLUSH_STATEMENTS = {"error": "FLUSH ERROR LOGS", "slow_query": "FLUSH SLOW LOGS", "general": "FLUSH GENERAL LOGS"}
READ_MAX_BYTES = 256 * 1024
MAX_TAIL_LINES = 10000
MAX_LONG_QUERY_TIME = 3600.0
DEFAULT_MAX_BYTES = 16 << 20
DEFAULT_KEEP = 2


def check_log_name(name: str, field: str = "log") -> str:
    if name not in LOG_TYPES:
        raise InvalidArgument(f"{field} must be one of {', '.join(LOG_TYPES)}; got {name[:64]!r}", field=field)
    return name


@dataclass(frozen=True)
class LogInfo:
    log: str
    type: str
    enabled: bool
    size_bytes: int
    max_bytes: int
    long_query_time: float = 0.0


@dataclass(frozen=True)
class LogList:
    logs: tuple[LogInfo, ...]


@dataclass(frozen=True)
class LogRead:
    """A piece of a log: its bytes, the file they came from and where the next read of it starts."""
    data: bytes
    file_id: str = ""
    next_offset: int = 0
    eof: bool = True
    generations: int = 0


@dataclass(frozen=True)
class ReadSpec:
    log: str
    tail_lines: int = 0
    file_id: str = ""
    offset: int = 0
    generation: int = 0
    max_bytes: int = 0


@dataclass(frozen=True)
class LogSwitches:
    """Which logs are on, kept in the agent's state dir and rendered into my.cnf (survives restarts)."""
    slow_query: bool = True
    general: bool = False
    long_query_time: float = 2.0

    def enabled(self, name: str) -> bool:
        return name == "error" or bool(getattr(self, name))


class GuestLogs(Protocol):
    """What the command table asks of a datastore's logs."""

    async def list_logs(self) -> list[LogInfo]: ...

    async def set_log(self, name: str, enabled: bool, long_query_time: float) -> LogInfo: ...

    async def read_log(self, spec: ReadSpec) -> LogRead: ...

    def rotate_due(self) -> list[str]: ...


def _file_id(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}"


class LogFiles:
    """The files of the logs in one directory: `<log>.log`, rotated to `<log>.log.1` .. `<log>.log.<keep>`."""

    def __init__(self, directory: str, max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep

    def path(self, name: str, generation: int = 0) -> str:
        base = os.path.join(self.directory, f"{check_log_name(name)}.log")
        return base if generation == 0 else f"{base}.{generation}"

    def generations(self, name: str) -> int:
        n = 0
        while n < self.keep and os.path.exists(self.path(name, n + 1)):
            n += 1
        return n

    def size(self, name: str) -> int:
        total = 0
        for g in range(self.generations(name) + 1):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(self.path(name, g)).st_size
        return total

    def needs_rotation(self, name: str) -> bool:
        try:
            return os.stat(self.path(name)).st_size >= self.max_bytes
        except FileNotFoundError:
            return False

    def rotate(self, name: str) -> None:
        """Shifts the generations up one (the oldest falls off) and moves the current file to `.1`; the
        writer keeps writing into `.1` until it reopens its file."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(name, self.keep))
        for g in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.rename(self.path(name, g), self.path(name, g + 1))
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(name), self.path(name, 1))

    def _find(self, name: str, file_id: str) -> int | None:
        for g in range(self.generations(name) + 1):
            with contextlib.suppress(FileNotFoundError):
                if _file_id(os.stat(self.path(name, g))) == file_id:
                    return g
        return None

    def read(self, spec: ReadSpec) -> LogRead:
        name = check_log_name(spec.log)
        if spec.max_bytes < 0 or spec.offset < 0 or spec.tail_lines < 0 or spec.generation < 0:
            raise InvalidArgument("max_bytes, offset, tail_lines and generation must not be negative",
                                  field="read_log")
        if spec.tail_lines > MAX_TAIL_LINES:
            raise InvalidArgument(f"tail_lines must be at most {MAX_TAIL_LINES}", field="tail_lines")
        limit = min(spec.max_bytes or READ_MAX_BYTES, READ_MAX_BYTES)
        gens = self.generations(name)
        generation, offset = spec.generation, spec.offset
        if spec.file_id:
            found = self._find(name, spec.file_id)
            if found is None:  # rotated out of reach meanwhile: go on from the start of the current file
                generation, offset = 0, 0
            else:
                generation = found
                if found > 0 and offset >= os.stat(self.path(name, found)).st_size:
                    # Finished the rotated file we were following: go on with the next newer one.
                    generation, offset = found - 1, 0
        elif spec.generation > gens:
            raise InvalidArgument(f"log {name} has {gens} rotated generations", field="generation")
        path = self.path(name, generation)
        try:
            # Never through a link: the logs directory is mysqld's to write, and the agent reads as root.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return LogRead(b"", "", 0, True, gens)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FailedPrecondition(f"the {name} log is a symbolic link; it is not read", field="log") from None
            raise
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise FailedPrecondition(f"the {name} log is not a regular file; it is not read", field="log")
            st = os.fstat(f.fileno())
            if spec.tail_lines and not spec.file_id:
                offset = _tail_offset(f, st.st_size, spec.tail_lines, limit)
            offset = min(offset, st.st_size)
            f.seek(offset)
            data = f.read(limit)
        end = offset + len(data)
        return LogRead(data, _file_id(st), end, end >= st.st_size, gens)


def _tail_offset(f: Any, size: int, lines: int, limit: int) -> int:
    """Where the last `lines` lines start, looking back at most `limit` bytes."""
    start = max(0, size - limit)
    f.seek(start)
    block = f.read(size - start)
    # A final newline ends the last line; it does not start another.
    pos = len(block) - 1 if block.endswith(b"\n") else len(block)
    for _ in range(lines):
        pos = block.rfind(b"\n", 0, pos)
        if pos < 0:
            return start
    return start + pos + 1


Cursor = Callable[[], contextlib.AbstractContextManager[Any]]


class MysqlLogs:
    """MariaDB's logs: files under `<volume>/.reddwarf-tmp/logs` (on the volume, kept through restores),
    switched with SET GLOBAL while mysqld runs and through my.cnf for its next start."""

    def __init__(self, state_dir: str, directory: Callable[[], str], run_as: str, cursor: Cursor,
                 running: Callable[[], bool], rerender: Callable[[], None],
                 max_bytes: int = DEFAULT_MAX_BYTES, keep: int = DEFAULT_KEEP) -> None:
        self._state = os.path.join(state_dir, "logs.json")
        self._directory = directory
        self.run_as = run_as
        self._cursor = cursor
        self._running = running
        self._rerender = rerender
        self.max_bytes, self.keep = max_bytes, keep
        self._lock = asyncio.Lock()

    @property
    def files(self) -> LogFiles:
        return LogFiles(self._directory(), self.max_bytes, self.keep)

    def switches(self) -> LogSwitches:
        try:
            with open(self._state) as f:
                data = json.load(f)
            return LogSwitches(slow_query=bool(data["slow_query"]), general=bool(data["general"]),
                               long_query_time=float(data["long_query_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return LogSwitches()

    def _save(self, sw: LogSwitches) -> None:
        tmp = self._state + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(sw), f)
        os.replace(tmp, self._state)

    def ensure_dir(self) -> None:
        """The logs directory on the volume, writable by mysqld's user (made again after a restore)."""
        d = self._directory()
        os.makedirs(d, mode=0o750, exist_ok=True)
        if self.run_as != "root":
            shutil.chown(os.path.dirname(d), self.run_as, self.run_as)
            shutil.chown(d, self.run_as, self.run_as)

    def my_cnf_lines(self) -> list[str]:
        sw = self.switches()
        files = self.files
        return [f"log-error = {files.path('error')}", "log_output = FILE",
                f"slow_query_log = {int(sw.slow_query)}", f"slow_query_log_file = {files.path('slow_query')}",
                f"long_query_time = {sw.long_query_time:g}",
                f"general_log = {int(sw.general)}", f"general_log_file = {files.path('general')}"]

    def _info(self, name: str, sw: LogSwitches) -> LogInfo:
        return LogInfo(log=name, type=LOG_TYPES[name], enabled=sw.enabled(name), size_bytes=self.files.size(name),
                       max_bytes=self.max_bytes * (self.keep + 1),
                       long_query_time=sw.long_query_time if name == "slow_query" else 0.0)

    async def list_logs(self) -> list[LogInfo]:
        sw = self.switches()
        return await asyncio.to_thread(lambda: [self._info(n, sw) for n in LOG_TYPES])

    async def set_log(self, name: str, enabled: bool, long_query_time: float) -> LogInfo:
        check_log_name(name)
        if name == "error":
            if not enabled:
                raise InvalidArgument("the error log is a SYS log and cannot be disabled", field="log")
            return self._info(name, self.switches())
        if long_query_time and name != "slow_query":
            raise InvalidArgument("long_query_time applies to the slow_query log only", field="long_query_time")
        if long_query_time and not 0 < long_query_time <= MAX_LONG_QUERY_TIME:
            raise InvalidArgument(f"long_query_time must be more than 0 and at most {MAX_LONG_QUERY_TIME:g}",
                                  field="long_query_time")
        async with self._lock:
            sw = replace(self.switches(), **{name: enabled})
            if long_query_time:
                sw = replace(sw, long_query_time=long_query_time)
            await asyncio.to_thread(self._apply, name, sw)
            return self._info(name, sw)

    def _apply(self, name: str, sw: LogSwitches) -> None:
        # Live first, so a refused statement changes nothing on disk either.
        if self._running():
            with self._cursor() as cur:
                if name == "slow_query":
                    cur.execute("SET GLOBAL long_query_time = %s", (sw.long_query_time,))
                    cur.execute("SET GLOBAL slow_query_log = %s", (int(sw.slow_query),))
                else:
                    cur.execute("SET GLOBAL general_log = %s", (int(sw.general),))
        self._save(sw)
        self._rerender()
        log.info("log switched", extra={"log": name, "enabled": sw.enabled(name)})

    async def read_log(self, spec: ReadSpec) -> LogRead:
        return await asyncio.to_thread(self.files.read, spec)

    def rotate_due(self) -> list[str]:
        """Rotates every log over its size and has mysqld reopen it; the names rotated."""
        files, done = self.files, []
        for name in LOG_TYPES:
            if files.needs_rotation(name):
                files.rotate(name)
                done.append(name)
                if self._running():
                    try:
                        with self._cursor() as cur:
                            cur.execute(FLUSH_STATEMENTS[name])
                    except RedDwarfError as exc:  # reopened at the next start at the latest
                        log.warning("flushing a rotated log failed", extra={"log": name, "error": exc.message})
        return done


async def rotate_loop(logs: GuestLogs, every: float = 30.0) -> None:
    """Keeps each log within its bound for as long as the agent runs."""
    while True:
        await asyncio.sleep(every)
        try:
            rotated = await asyncio.to_thread(logs.rotate_due)
            if rotated:
                log.info("logs rotated", extra={"logs": ",".join(rotated)})
        except Exception:  # noqa: BLE001 - tried again next round
            log.exception("log rotation failed")


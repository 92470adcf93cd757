"""The one way Red Dwarf runs a subprocess: logged, bounded by a timeout, failing loudly with stderr.

Every lxc-*, losetup, mkfs, mariadb-*, apt-get call in hostd and the agent goes through `run` (or
`run_async`), so a hung tool cannot hang a daemon and a failure always says what was run and why it
failed. Secrets never reach the log: pass them through `env` or `input`, never in argv.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger("reddwarf.runner")

DEFAULT_TIMEOUT = 120.0


class CommandError(RuntimeError):
    """A command exited non-zero or timed out."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str,
                 timed_out: bool = False) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.timed_out = timed_out
        what = "timed out" if timed_out else f"exited {returncode}"
        tail = (stderr or stdout).strip()[-2000:]
        super().__init__(f"{shlex.join(self.argv)} {what}: {tail}")


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
        input: str | bytes | None = None, env: Mapping[str, str] | None = None,
        cwd: str | None = None) -> Result:
    """Runs argv (never through a shell), returns its output as text; raises CommandError on failure."""
    full_env = None if env is None else {**os.environ, **env}
    started = time.monotonic()
    data = input.encode() if isinstance(input, str) else input
    try:
        proc = subprocess.run(list(argv), input=data, capture_output=True, timeout=timeout, env=full_env,
                              cwd=cwd, check=False)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace")
        err = (exc.stderr or b"").decode(errors="replace")
        log.warning("command timed out argv=%s timeout=%s", shlex.join(argv), timeout)
        raise CommandError(argv, None, out, err, timed_out=True) from None
    seconds = time.monotonic() - started
    out = proc.stdout.decode(errors="replace")
    err = proc.stderr.decode(errors="replace")
    log.debug("command argv=%s rc=%s seconds=%.3f", shlex.join(argv), proc.returncode, seconds)
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, out, err)
    return Result(tuple(argv), proc.returncode, out, err, seconds)


async def run_async(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
                    input: str | bytes | None = None, env: Mapping[str, str] | None = None,
                    cwd: str | None = None) -> Result:
    """`run` for asyncio code: the event loop keeps serving while the command runs."""
    full_env = None if env is None else {**os.environ, **env}
    started = time.monotonic()
    data = input.encode() if isinstance(input, str) else input
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.PIPE if data is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full_env, cwd=cwd)
    try:
        out_b, err_b = await asyncio.wait_for(proc.communicate(data), timeout)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        log.warning("command timed out argv=%s timeout=%s", shlex.join(argv), timeout)
        raise CommandError(argv, None, "", "", timed_out=True) from None
    seconds = time.monotonic() - started
    out = out_b.decode(errors="replace")
    err = err_b.decode(errors="replace")
    rc = proc.returncode if proc.returncode is not None else -1
    log.debug("command argv=%s rc=%s seconds=%.3f", shlex.join(argv), rc, seconds)
    if check and rc != 0:
        raise CommandError(argv, rc, out, err)
    return Result(tuple(argv), rc, out, err, seconds)


async def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None,
                stdout: int | None = subprocess.DEVNULL,
                stderr: int | None = subprocess.DEVNULL,
                stdin: int | None = subprocess.DEVNULL) -> asyncio.subprocess.Process:
    """Starts a long-running child (a daemon an agent supervises): logged like `run`, but not awaited.
    The caller owns the process: it must wait for it, and kill it on shutdown. stdin/stdout may be pipe
    fds, so streaming pipelines (mariadb-backup | zstd) are built from spawned children."""
    full_env = None if env is None else {**os.environ, **env}
    proc = await asyncio.create_subprocess_exec(*argv, stdin=stdin, stdout=stdout,
                                                stderr=stderr, env=full_env, cwd=cwd)
    log.info("spawned argv=%s pid=%s", shlex.join(argv), proc.pid)
    return proc

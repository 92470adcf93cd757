"""Keeps one long-running child (mysqld, memcached) alive: notices within a moment when it dies, restarts
it with exponential backoff, and counts the restarts for the health report.

A child started by the agent's previous process image (an agent upgrade execs in place: the child stays) is
adopted by its pid: watched by polling waitpid (it is still our child) until it ends, then restarted as usual."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence

from reddwarf.common import runner
from reddwarf.common.states import ServiceState

log = logging.getLogger("reddwarf.agent.supervisor")


class Supervisor:
    """Runs argv as a child; `ready` (optional) says when it is serving. Not thread-safe: asyncio only."""

    def __init__(self, name: str, argv: Sequence[str], *, ready: Callable[[], Awaitable[bool]] | None = None,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, stable_after: float = 60.0,
                 stop_timeout: float = 60.0, ready_poll: float = 0.2) -> None:
        self.name = name
        self._ready_poll = ready_poll
        self.argv = list(argv)
        self._ready = ready
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self._stop_timeout = stop_timeout
        self.state = ServiceState.NEW
        self.restarts = 0
        self.last_error = ""
        self.started_at = 0.0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._ready_event = asyncio.Event()
        self._adopted: int | None = None

    @property
    def pid(self) -> int | None:
        if self._adopted is not None:
            return self._adopted
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    def adopt(self, pid: int) -> None:
        """The next start watches this running child instead of spawning one."""
        self._adopted = pid
        log.info("service adopted", extra={"service": self.name, "pid": pid})

    async def _wait_adopted(self, pid: int) -> int:
        while True:
            rc = child_exit(pid)
            if rc is not None:
                return rc
            await asyncio.sleep(0.2)

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Starts the child (no-op if running) and waits until it is ready."""
        if self._task is None or self._task.done():
            if self._proc is None and self._adopted is None:
                # Never started by this process image: after an agent upgrade's exec our child may be running.
                self._adopted = own_child(self.argv)
            self._stopping = False
            self._ready_event = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name=f"supervise-{self.name}")
        try:
            await asyncio.wait_for(self._ready_event.wait(), ready_timeout)
        except TimeoutError:
            raise TimeoutError(f"{self.name} did not become ready in {ready_timeout:.0f}s: {self.last_error}") \
                from None

    async def stop(self) -> None:
        self._stopping = True
        adopted = self._adopted
        if adopted is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(adopted, signal.SIGTERM)
            deadline = time.monotonic() + self._stop_timeout
            while child_exit(adopted) is None:
                if time.monotonic() > deadline:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(adopted, signal.SIGKILL)
                await asyncio.sleep(0.2)
            self._adopted = None
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._stop_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            # The loop task only ends by this cancel; its outcome carries nothing to report.
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        self.state = ServiceState.SHUTDOWN

    async def _loop(self) -> None:
        backoff = self._min_backoff
        while not self._stopping:
            self.state = ServiceState.BUILDING if self.restarts == 0 else ServiceState.CRASHED
            adopted = self._adopted
            try:
                if adopted is None:
                    self._proc = await runner.spawn(self.argv)
            except OSError as exc:
                self.state = ServiceState.FAILED
                self.last_error = f"{self.name} could not start: {exc}"
                log.error("service start failed", extra={"service": self.name, "error": str(exc)})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            self.started_at = time.monotonic()
            waiter = asyncio.create_task(self._wait_ready())
            if adopted is not None:
                rc = await self._wait_adopted(adopted)
                self._adopted = None
            else:
                assert self._proc is not None
                rc = await self._proc.wait()
            waiter.cancel()
            if self._stop_requested():  # stop() ran while we waited for the child
                return
            self.restarts += 1
            self.state = ServiceState.CRASHED
            self.last_error = f"{self.name} exited with {rc}"
            log.warning("service died; restarting", extra={"service": self.name, "rc": rc,
                                                             "restarts": self.restarts, "backoff": backoff})
            # A child that ran long enough counts as healthy again: the next crash restarts quickly.
            if time.monotonic() - self.started_at > self._stable_after:
                backoff = self._min_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    def _stop_requested(self) -> bool:
        return self._stopping

    async def _wait_ready(self) -> None:
        while True:
            ok = True if self._ready is None else await self._ready()
            if ok:
                self.state = ServiceState.RUNNING
                self._ready_event.set()
                log.info("service ready", extra={"service": self.name, "pid": self.pid})
                return
            await asyncio.sleep(self._ready_poll)

    def uptime(self) -> int:
        if self.state != ServiceState.RUNNING:
            return 0
        return int(time.monotonic() - self.started_at)


def own_child(argv: Sequence[str]) -> int | None:
    """A running child of this process with exactly this command line (started before an exec), if any."""
    want = [a.encode() for a in argv]
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[1] != me or fields[0] in ("Z", "X"):
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().split(b"\0")[:-1] == want:
                    return int(entry)
        except (OSError, IndexError):
            continue
    return None


def child_exit(pid: int) -> int | None:
    """None while `pid` runs; else its exit code (reaped here when it is our child; -1 when another reaped
    it or it is not ours)."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None if _running(pid) else -1
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

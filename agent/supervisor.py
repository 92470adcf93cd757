"""Keeps one long-running child (mysqld, memcached) alive: notices within a moment when it dies, restarts
it with exponential backoff, and counts the restarts for the health report."""
from __future__ import annotations

import asyncio
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
                 stop_timeout: float = 60.0) -> None:
        self.name = name
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

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Starts the child (no-op if running) and waits until it is ready."""
        if self._task is None or self._task.done():
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
            try:
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
            await asyncio.sleep(0.2)

    def uptime(self) -> int:
        if self.state != ServiceState.RUNNING:
            return 0
        return int(time.monotonic() - self.started_at)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False

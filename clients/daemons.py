"""The demos' background processes (clients/demo.py, demo_fleet.py, demo_ha.py): each started in a session of
its own with its log and pid file in the demo's directory, checked and stopped by that pid file."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pymysql


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


class Daemons:
    def __init__(self, root: Path, name: str, stop_hint: str = "", wait_seconds: float = 900) -> None:
        self.root, self.name, self.stop_hint, self.wait_seconds = root, name, stop_hint, wait_seconds

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        with open(self.root / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd)
        (self.root / f"{name}.pid").write_text(str(proc.pid))
        return proc.pid

    def pid(self, name: str) -> int | None:
        try:
            return int((self.root / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def alive(self, name: str) -> bool:
        pid = self.pid(name)
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self, name: str, grace_seconds: float = 15.0) -> None:
        """SIGTERM to its whole session, SIGKILL after the grace period; the pid file goes."""
        pid = self.pid(name)
        if pid is None:
            return
        try:
            os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_seconds
            while time.monotonic() < deadline:
                os.kill(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        (self.root / f"{name}.pid").unlink(missing_ok=True)

    def wait_for(self, what: str, check: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = time.monotonic() + (self.wait_seconds if timeout is None else timeout)
        while True:
            try:
                if check():
                    return
            except (grpc.RpcError, OSError, pymysql.err.MySQLError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.name}: {what} did not come up; see the logs in {self.root}"
                                 + (f" ({self.stop_hint} removes it)" if self.stop_hint else ""))
            time.sleep(0.5)

"""hostd's own supervisor, for hosts without systemd: `reddwarf-hostd supervise` detaches (double fork,
new session, output to a log file), records its pid, and restarts `serve` with backoff whenever it exits;
`reddwarf-hostd stop` ends the supervisor and its hostd. Enrollment over SSH (server/host_enrollment.py)
starts hostd this way when the host has no systemd."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MAX_BACKOFF = 30.0
# A hostd that ran this long before it exited was healthy: the next restart starts again at 1 s.
HEALTHY_RUN = 60.0


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_our_supervisor(pid: int, pid_file: Path) -> bool:
    """The pid is alive and is a supervisor of this pid file (not a recycled pid of something else)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"supervise" in argv and str(pid_file).encode() in argv


def running(pid_file: Path) -> int | None:
    pid = _read_pid(pid_file)
    return pid if pid is not None and _is_our_supervisor(pid, pid_file) else None


def stop(pid_file: Path, timeout: float = 30) -> bool:
    """Stops the supervisor of `pid_file` and its hostd (SIGTERM, SIGKILL after `timeout`). True if one ran."""
    pid = running(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _is_our_supervisor(pid, pid_file):
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)  # the supervisor leads its session's group: hostd goes too
            break
        time.sleep(0.1)
    pid_file.unlink(missing_ok=True)
    return True


def start(child: list[str], pid_file: Path, log_file: Path, timeout: float = 15) -> int:
    """(Re)starts a detached supervisor of `child`; returns its pid once the pid file names it."""
    stop(pid_file)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    first = os.fork()
    if first == 0:  # pragma: no cover - runs in the detached processes
        try:
            os.setsid()
            if os.fork() != 0:
                os._exit(0)
            _detach(log_file)
            pid_file.write_text(f"{os.getpid()}\n")
            code = _loop(child, pid_file)
        except BaseException:  # noqa: BLE001 - a detached process has nobody to raise to
            code = 1
        os._exit(code)
    os.waitpid(first, 0)
    deadline = time.monotonic() + timeout
    while (pid := running(pid_file)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the supervisor did not start; see {log_file}")
        time.sleep(0.05)
    return pid


def _detach(log_file: Path) -> None:
    os.chdir("/")
    os.umask(0o022)
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)


class _Flag:
    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


def _loop(child: list[str], pid_file: Path) -> int:
    # A plain flag (not a threading.Event): a signal handler must not take locks the main thread may hold.
    stopping = _Flag()
    proc: subprocess.Popen[bytes] | None = None

    def on_term(signum: int, frame: object) -> None:
        stopping.set()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    backoff = 1.0
    while not stopping.is_set():
        started = time.monotonic()
        proc = subprocess.Popen(child)
        rc = proc.wait()
        if stopping.is_set():
            break
        backoff = 1.0 if time.monotonic() - started > HEALTHY_RUN else backoff
        print(f"reddwarf-hostd supervise: hostd exited with {rc}; restarting in {backoff:.0f}s", flush=True)
        deadline = time.monotonic() + backoff
        while not stopping.is_set() and time.monotonic() < deadline:
            time.sleep(0.1)
        backoff = min(backoff * 2, MAX_BACKOFF)
    if proc is not None and proc.poll() is None:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if _read_pid(pid_file) == os.getpid():
        pid_file.unlink(missing_ok=True)
    return 0

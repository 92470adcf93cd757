"""`python -m reddwarf.agent.verify`: proves a backup chain restores, away from any tenant's instance.

hostd (ProveBackup: the control server streams the chain to a host and never restores it itself) runs
this inside the sandbox of agent/sandbox.py (an unprivileged uid of a user namespace of its own, in its
own mount, network, pid, ipc, uts and cgroup namespaces and memory, cpu and pids cgroups) with the chain's files and their digests: the chain is restored by the same BackupRunner the guests use (stream allowlist, backup-my.cnf
rebuilt, --prepare with an empty plugin dir) into an empty datadir, a scratch mariadbd is started on it as
that uid with --skip-grant-tables (no mysql.user/mysql.plugin/mysql.servers/events read from the tenant's
tables, no plugin dir, no network), the tables are checksummed and (when given) compared with the
checksums recorded when the backup was proven at creation. It refuses to run as root. Prints one JSON
object: {"ok": bool, "detail": str, "checksums": {...}}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator

import pymysql

from .backup import BackupRunner, BackupSettings, MysqlAccess
from .model import BackupChunk
from .xbstream import BackupRefused


class Scratch:
    """A throwaway mariadbd on its own datadir under `base` (root by password, empty), reached by its unix
    socket and, given a port, on 127.0.0.1. `start`/`stop` are what BackupRunner takes as callables."""

    def __init__(self, base: str, socket_dir: str = "", port: int = 0, untrusted: bool = False) -> None:
        """`untrusted`: the datadir will hold a tenant's restored data: no mariadb-install-db (the restore
        brings its own), never root, no grant/plugin tables read, no plugin dir, no network."""
        self.base = base
        self.untrusted = untrusted
        self.datadir = os.path.join(base, "data")
        self.port = port
        # A unix socket path must stay under ~100 bytes; a deep state dir would not: short dir on request.
        if socket_dir:
            os.makedirs(socket_dir, mode=0o700, exist_ok=True)
        self.socket_dir = tempfile.mkdtemp(prefix="v", dir=socket_dir) if socket_dir else ""
        self.socket = os.path.join(self.socket_dir or base, "mysqld.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        os.makedirs(self.datadir)
        if untrusted:
            if os.geteuid() == 0:
                raise RuntimeError("refusing to start a scratch mariadbd on a tenant's data as root")
            for d in ("tmp", "noplugins"):
                os.makedirs(os.path.join(base, d), mode=0o700)
            return
        done = subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={self.datadir}", "--user=root",
                               "--auth-root-authentication-method=normal", "--skip-test-db"],
                              capture_output=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError("mariadb-install-db failed: " + (done.stderr + done.stdout).decode()[-3000:])

    def start_sync(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        net = [f"--port={self.port}", "--bind-address=127.0.0.1"] if self.port else ["--skip-networking"]
        if self.untrusted:
            # Checksums need no grants; --skip-grant-tables also skips mysql.plugin, mysql.servers and the
            # event scheduler, so nothing the tenant wrote into mysql.* runs. We are not root: no --user.
            extra = ["--skip-networking", "--skip-grant-tables", f"--plugin-dir={self.base}/noplugins",
                     "--event-scheduler=DISABLED", "--skip-slave-start", "--local-infile=0",
                     f"--secure-file-priv={self.base}/noplugins", f"--tmpdir={self.base}/tmp"]
        else:
            extra = [*net, "--user=root"]
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}", *extra,
             f"--pid-file={self.base}/mysqld.pid", f"--log-error={self.base}/error.log",
             "--innodb-buffer-pool-size=64M", "--skip-log-bin"],
            # In the caller's process group: a server killed with its group takes the scratch copy down too.
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                pymysql.connect(unix_socket=self.socket, user="root", password="").close()
                return
            except pymysql.err.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("scratch mariadbd did not start: " + self.error_log()[-2000:]) from None
                time.sleep(0.1)

    def error_log(self) -> str:
        path = os.path.join(self.base, "error.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()

    def stop_sync(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    async def start(self) -> None:
        await asyncio.to_thread(self.start_sync)

    async def stop(self) -> None:
        await asyncio.to_thread(self.stop_sync)


async def verify(files: list[str], ids: list[str], sha256s: list[str], expected: dict[str, int] | None,
                 scratch_dir: str = "/var/tmp", socket_dir: str = "", max_extract_bytes: int = 0) -> dict[str, object]:
    """Restores the chain; ok when it restored and (given `expected`) its table checksums equal them."""
    if os.geteuid() == 0:
        return {"ok": False, "detail": "refused: a scratch restore never runs as root", "checksums": {}}
    base = tempfile.mkdtemp(prefix="reddwarf-verify-", dir=scratch_dir)
    scratch: Scratch | None = None
    try:
        scratch = Scratch(base, socket_dir, untrusted=True)
        paths = dict(zip(ids, files, strict=True))

        async def download(backup_id: str) -> AsyncIterator[BackupChunk]:
            with open(paths[backup_id], "rb") as f:
                while chunk := f.read(1 << 20):
                    yield BackupChunk(data=chunk)

        async def progress(percent: int, message: str, done: int) -> None:
            return None

        settings = BackupSettings(work_dir=base, max_extract_bytes=max_extract_bytes,
                                  prepare_options=(f"--plugin-dir={base}/noplugins",))
        runner = BackupRunner(MysqlAccess(socket=scratch.socket, user="root", password="", datadir=scratch.datadir),
                              scratch.stop, scratch.start, settings)
        await runner.restore(ids, sha256s, download, progress)
        got = {c.table: c.checksum for c in await runner.table_checksums()}
        if expected is not None and got != expected:
            differ = sorted(set(got) ^ set(expected) | {t for t in got if t in expected and got[t] != expected[t]})
            return {"ok": False, "detail": f"table checksums differ after restore: {', '.join(differ)[:500]}",
                    "checksums": got}
        return {"ok": True, "detail": f"restored and checked {len(got)} tables", "checksums": got}
    except BackupRefused as exc:
        return {"ok": False, "detail": f"restore refused: {exc.message[:500]}", "checksums": {}}
    except Exception as exc:  # noqa: BLE001 - reported as the verification's outcome
        return {"ok": False, "detail": f"restore failed: {type(exc).__name__}: {str(exc)[:500]}", "checksums": {}}
    finally:
        if scratch is not None:
            scratch.stop_sync()
        shutil.rmtree(base, ignore_errors=True)
        if scratch is not None and scratch.socket_dir:
            shutil.rmtree(scratch.socket_dir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(prog="reddwarf-verify")
    p.add_argument("--spec", required=True, help="JSON: {files, ids, sha256s, checksums, max_extract_bytes}")
    p.add_argument("--origin", default="", help="the host directory the sandbox was made from (for cleanup)")
    args = p.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    result = asyncio.run(verify(spec["files"], spec["ids"], spec["sha256s"], spec["checksums"],
                                spec.get("scratch_dir") or "/var/tmp", spec.get("socket_dir") or "",
                                int(spec.get("max_extract_bytes") or 0)))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

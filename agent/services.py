"""Distribution packages and the extra services of a guest (memcached, the blueprint's second service):
install what the template lacks with apt-get, then supervise the daemon like mysqld."""
from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass

from reddwarf.agent.supervisor import Supervisor
from reddwarf.common import runner
from reddwarf.common.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger("reddwarf.agent.services")

_PKG_OK = frozenset("abcdefghijklmnopqrstuvwxyz0123456789+-.")


@dataclass(frozen=True)
class PackageReport:
    installed: tuple[str, ...]
    skipped: tuple[str, ...]


async def installed_of(packages: Sequence[str]) -> set[str]:
    """Which of `packages` are installed: one dpkg-query for all of them (a process each cost a prepare about
    20 ms per package under a small flavor's CPU cap). dpkg-query exits 1 when it knows one of them not at all,
    and still lists the others."""
    if not packages:
        return set()
    res = await runner.run_async(["dpkg-query", "-W", "-f=${Package}\t${Status}\n", "--", *packages],
                                 check=False, timeout=30)
    found = set()
    for line in res.stdout.splitlines():
        name, _, status = line.partition("\t")
        if status.endswith("install ok installed"):
            found.add(name.split(":", 1)[0])  # "name:arch" for a multi-arch package
    return found


async def ensure_packages(packages: Sequence[str], field: str = "services.packages") -> PackageReport:
    """apt-get installs the packages the template does not have yet; a template that has them all skips."""
    for i, p in enumerate(packages):
        if not p or len(p) > 128 or p[0] == "-" or any(c not in _PKG_OK for c in p):
            raise InvalidArgument(f"not a Debian package name: {p!r}", field=f"{field}[{i}]")
    present = await installed_of(packages)
    missing = [p for p in packages if p not in present]
    skipped = tuple(p for p in packages if p not in missing)
    if missing:
        log.info("installing packages", extra={"packages": ",".join(missing)})
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        try:
            await runner.run_async(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                                   env=env, timeout=900)
        except runner.CommandError:
            # Stale package lists in an old template: refresh once and try again.
            await runner.run_async(["apt-get", "update", "-q"], env=env, timeout=600)
            try:
                await runner.run_async(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
                                       env=env, timeout=900)
            except runner.CommandError as exc:
                raise FailedPrecondition(f"could not install {', '.join(missing)}: {exc.stderr[-500:]}",
                                         field=field) from None
    return PackageReport(installed=tuple(missing), skipped=skipped)


def memcached_memory_mb(flavor_memory_mb: int) -> int:
    """memcached's share of a flavor's memory: an eighth, at least 16 MB (mysqld is sized to the rest)."""
    return max(16, int(flavor_memory_mb) // 8)


class Memcached:
    """memcached on the given port, bound to bind_address only (no UDP), its cache capped at memory_mb."""

    def __init__(self, port: int, bind_address: str = "127.0.0.1", memory_mb: int = 64,
                 run_as: str = "root") -> None:
        binary = shutil.which("memcached") or "/usr/bin/memcached"
        self.port = port
        self.bind_address = bind_address
        self.memory_mb = memory_mb
        self.supervisor = Supervisor("memcached", [binary, "-p", str(port), "-l", bind_address,
                                                   "-m", str(memory_mb), "-U", "0", "-u", run_as],
                                     ready=self._ready)

    async def _ready(self) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.bind_address, self.port), 1)
        except (TimeoutError, OSError):
            return False
        try:
            writer.write(b"version\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 1)
            return line.startswith(b"VERSION")
        except (TimeoutError, OSError):
            return False
        finally:
            writer.close()

    async def start(self) -> None:
        await self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()

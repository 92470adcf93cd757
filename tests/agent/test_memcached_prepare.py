"""memcached requested at prepare runs beside a real mysqld: on the instance's address only, its cache an
eighth of the flavor's memory (mysqld sized to the rest), reported by health, resized with the flavor, and
brought back by a restarted agent."""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from reddwarf.agent.model import Limits, Prepare, ServiceSpec
from reddwarf.agent.mysql import MysqlDriver, MysqlSettings
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.states import ServiceState
from tests.fixtures.mariadb import free_port

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="mariadb-install-db --user needs root"),
              pytest.mark.skipif(not shutil.which("mariadb-install-db"), reason="MariaDB server package missing"),
              pytest.mark.skipif(not shutil.which("memcached"), reason="memcached package missing"),
              pytest.mark.slow]

# Not 127.0.0.1: proves memcached answers on the instance's address and not on every address of the guest.
ADDRESS = "127.0.0.3"


async def memcached(port: int, host: str, request: bytes, end: bytes = b"END\r\n") -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
    try:
        writer.write(request)
        await writer.drain()
        data = b""
        while not data.endswith(end):
            chunk = await asyncio.wait_for(reader.read(4096), 5)
            if not chunk:
                break
            data += chunk
        return data
    finally:
        writer.close()


async def maxbytes(port: int) -> int:
    out = await memcached(port, ADDRESS, b"stats settings\r\n")
    for line in out.decode().splitlines():
        if line.startswith("STAT maxbytes "):
            return int(line.split()[2])
    raise AssertionError(out)


def make_driver(base: Path) -> MysqlDriver:
    return MysqlDriver(MysqlSettings(state_dir=str(base / "state"), datadir=str(base / "vol"), run_as="root",
                                     port=free_port(), bind_address=ADDRESS))


async def test_memcached_beside_mysqld_is_bounded_by_the_flavor_and_survives_resize_and_restart(
        tmp_path: Path, drivers: list[MysqlDriver]) -> None:
    port = free_port()
    d = make_driver(tmp_path)
    drivers.append(d)
    await d.prepare(Prepare(services=(ServiceSpec(service="mariadb"),
                                      ServiceSpec(service="memcached", packages=("memcached",), port=port)),
                            limits=Limits(memory_mb=1024), bind_address=ADDRESS))
    assert b"STORED" in await memcached(port, ADDRESS, b"set greeting 0 0 5\r\nhello\r\n", b"\r\n")
    assert b"VALUE greeting 0 5\r\nhello" in await memcached(port, ADDRESS, b"get greeting\r\n")
    with pytest.raises(OSError):  # nothing listens on the guest's other addresses
        await memcached(port, "127.0.0.1", b"version\r\n", b"\r\n")
    assert await maxbytes(port) == 128 * 2**20  # 1024 MB / 8
    # mysqld is sized to the flavor less memcached's share (896 MB: a quarter below 1 GB for the pool).
    with d._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@innodb_buffer_pool_size")
        assert cur.fetchone()[0] == 224 * 2**20
    h = await d.health()
    assert h.services == {"memcached": ServiceState.RUNNING} and h.accepting_connections

    # A resize to 2 GB gives memcached 256 MB (a cache: it starts empty) and mysqld half the rest.
    await d.apply_limits(Limits(memory_mb=2048))
    assert await maxbytes(port) == 256 * 2**20
    assert await memcached(port, ADDRESS, b"get greeting\r\n") == b"END\r\n"
    with d._admin_connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT @@innodb_buffer_pool_size")
        assert cur.fetchone()[0] == 896 * 2**20

    # A restarted agent (resume from its private record) brings memcached back at the resized size.
    await d.close()
    again = make_driver(tmp_path)
    drivers.append(again)
    await again.resume()
    assert await maxbytes(port) == 256 * 2**20
    assert (await again.health()).services == {"memcached": ServiceState.RUNNING}


async def test_an_unknown_service_or_port_is_refused_before_anything_runs(
        tmp_path: Path, drivers: list[MysqlDriver]) -> None:
    d = make_driver(tmp_path)
    drivers.append(d)
    with pytest.raises(InvalidArgument) as e:
        await d.prepare(Prepare(services=(ServiceSpec(service="mariadb"), ServiceSpec(service="redis"))))
    assert e.value.violations[0][0] == "services[1].service"
    with pytest.raises(InvalidArgument) as e:
        await d.prepare(Prepare(services=(ServiceSpec(service="memcached", port=70000),)))
    assert e.value.violations[0][0] == "services[0].port"
    assert not os.path.exists(d.mysqld.my_cnf_path) and d.mysqld.supervisor is None

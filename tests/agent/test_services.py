"""A second service in the guest through the same mechanism as mysqld (the blueprint's memcached): its
package is installed only when missing, it runs supervised, and a crash is noticed and restarted."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from reddwarf.agent import services
from reddwarf.common.errors import InvalidArgument
from tests.fixtures.mariadb import free_port


async def test_installed_packages_are_skipped_and_hostile_names_refused():
    report = await services.ensure_packages(["memcached"])
    assert report.skipped == ("memcached",) and report.installed == ()
    for bad in ["-oAPT::Foo=1", "mem cached", "x;rm -rf /", ""]:
        with pytest.raises(InvalidArgument) as e:
            await services.ensure_packages(["memcached", bad])
        assert e.value.violations[0][0] == "services.packages[1]"


async def memcached_roundtrip(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"set k 0 0 2\r\nhi\r\nget k\r\n")
    await writer.drain()
    data = b""
    while b"END" not in data:
        data += await asyncio.wait_for(reader.read(100), 5)
    writer.close()
    return data


async def test_memcached_runs_supervised_and_comes_back_after_a_kill():
    port = free_port()
    mc = services.Memcached(port, "127.0.0.1", 16, "root")
    await mc.start()
    try:
        assert b"VALUE k 0 2\r\nhi" in await memcached_roundtrip(port)
        pid = mc.supervisor.pid
        os.kill(pid, signal.SIGKILL)
        for _ in range(100):
            await asyncio.sleep(0.1)
            if mc.supervisor.restarts >= 1 and mc.supervisor.pid not in (None, pid) and await mc._ready():
                break
        assert mc.supervisor.restarts >= 1
        assert b"END" in await memcached_roundtrip(port)  # a fresh, empty cache on the same port
    finally:
        await mc.stop()

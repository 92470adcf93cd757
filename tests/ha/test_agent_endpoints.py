"""A guest agent given several server endpoints (agent/stream.py): it reaches a live server when the first one
it tries is dead, and moves to another live server when its own stops; one dead endpoint does not make it
wait out the exponential backoff. Real AgentGateway servers over mTLS, the real agent stream code."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from reddwarf.agent.commands import CommandRunner
from reddwarf.agent.fake import FakeDriver
from reddwarf.agent.stream import AgentStream, StreamSettings, endpoints
from reddwarf.common import tls
from reddwarf.common.pki import CertificateAuthority
from reddwarf.server.agents import AgentGatewayServicer, AgentRegistry
from reddwarf.v1 import agent_pb2_grpc
from tests.fixtures.mariadb import free_port


def test_endpoints_parse_in_order_without_blanks_or_repeats() -> None:
    assert endpoints(" a:1, b:2,,a:1 ,c:3") == ["a:1", "b:2", "c:3"]
    assert endpoints("a:1") == ["a:1"]


async def _server(ca: CertificateAuthority, tmp: Path, port: int) -> tuple[grpc.aio.Server, AgentRegistry]:
    files = ca.write_identity(tmp / f"srv{port}", "server", "server", f"s{port}")
    registry = AgentRegistry(heartbeat_seconds=5, heartbeat_expiry=20)
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(AgentGatewayServicer(registry), server)
    cert, key, cap = files.read()
    server.add_secure_port(f"127.0.0.1:{port}", tls.server_credentials(cert, key, cap))
    await server.start()
    return server, registry


async def _until(pred: object, timeout: float) -> float:
    t0 = time.monotonic()
    while not pred():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, "not within the time"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_an_agent_skips_a_dead_endpoint_and_moves_when_its_server_stops(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    files = ca.write_identity(tmp_path / "guest", "guest", "instance", "i-1")
    dead, p1, p2 = free_port(), free_port(), free_port()
    s1, r1 = await _server(ca, tmp_path, p1)
    driver = FakeDriver(str(tmp_path / "guest"))
    stream = AgentStream(StreamSettings(server_address=f"127.0.0.1:{dead},127.0.0.1:{p1},127.0.0.1:{p2}",
                                        instance_id="i-1", tls=files, state_dir=str(tmp_path / "guest"),
                                        backoff_initial=0.5, backoff_max=30),
                         CommandRunner(driver), driver.health)
    stream._at = 0  # start at the dead endpoint
    runner = asyncio.create_task(stream.run_forever())
    s2: grpc.aio.Server | None = None
    try:
        # Dead, then s1 (p2 may be tried first after p1 fails only if s1 is down: it is not).
        took = await _until(lambda: r1.is_connected("i-1"), 10)
        assert took < 3, took  # one jittered pause (< 0.5 s) plus handshakes, not a backoff round
        s2, r2 = await _server(ca, tmp_path, p2)
        await s1.stop(None)
        moved = await _until(lambda: r2.is_connected("i-1"), 10)
        assert moved < 3, moved
        assert stream.server == f"127.0.0.1:{p2}"
    finally:
        stream.stop()
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        await s1.stop(None)
        if s2 is not None:
            await s2.stop(None)

"""One control-server process holding N guest-agent streams (the real agent stream code, a fake datastore
driver, no mysqld), heartbeating: the server's CPU while idle-but-connected, and command round trips.

Run: `.venv/bin/python -m bench.agent_streams [--agents 1000] [--seconds 20]`. The agents run in a second
process (`--role agents`), so the CPU figure is the server's alone.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reddwarf.common import tls
from reddwarf.common.pki import CertificateAuthority, TlsFiles
from reddwarf.v1 import agent_pb2, agent_pb2_grpc


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_agents(work: Path, port: int, n: int, heartbeat: int) -> None:
    from reddwarf.agent.commands import CommandRunner
    from reddwarf.agent.fake import FakeDriver
    from reddwarf.agent.stream import AgentStream, StreamSettings
    streams = []
    for i in range(n):
        d = work / f"a{i}"
        files = TlsFiles(d / "c.pem", d / "c.key", work / "ca" / "ca.pem")
        driver = FakeDriver(str(d))
        streams.append(AgentStream(StreamSettings(server_address=f"127.0.0.1:{port}", instance_id=f"inst-{i}",
                                                  tls=files, state_dir=str(d), heartbeat_seconds=heartbeat),
                                   CommandRunner(driver), driver.health))
    await asyncio.gather(*(s.run_forever() for s in streams))


async def serve(work: Path, n: int, seconds: float, heartbeat: int) -> str:
    from reddwarf.server.agents import AgentGatewayServicer, AgentRegistry
    ca = CertificateAuthority.init(work / "ca")
    for i in range(n):
        ca.write_identity(work / f"a{i}", "c", "instance", f"inst-{i}")
    srv = ca.write_identity(work / "srv", "server", "server", "control")
    registry = AgentRegistry(heartbeat_seconds=heartbeat, heartbeat_expiry=heartbeat * 4)
    server = __import__("grpc").aio.server()
    agent_pb2_grpc.add_AgentGatewayServicer_to_server(AgentGatewayServicer(registry), server)
    cert, key, cap = srv.read()
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(cert, key, cap))
    await server.start()
    watchdog = asyncio.create_task(registry.run())
    agents = subprocess.Popen([sys.executable, "-m", "bench.agent_streams", "--role", "agents", "--work", str(work),
                               "--port", str(port), "--agents", str(n), "--heartbeat", str(heartbeat)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        t0 = time.monotonic()
        while sum(registry.is_connected(f"inst-{i}") for i in range(n)) < n:
            if time.monotonic() - t0 > 600:
                raise RuntimeError("agents did not all connect")
            await asyncio.sleep(0.5)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(heartbeat)
        c0, w0 = cpu_seconds(), time.monotonic()
        await asyncio.sleep(seconds)
        idle_cpu = (cpu_seconds() - c0) / (time.monotonic() - w0)
        lat = []
        for _ in range(min(n, 1000)):
            i = random.randrange(n)
            t = time.monotonic()
            await registry.call(f"inst-{i}", agent_pb2.Command(get_health=agent_pb2.GetHealth()), timeout=30)
            lat.append(time.monotonic() - t)
        lat.sort()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    finally:
        agents.kill()
        agents.wait()
        watchdog.cancel()
        await server.stop(None)
    return (f"## {n:,} agent streams on one server\n\n"
            f"{n:,} real agent streams (agent/stream.py, fake datastore driver) over mTLS to one server process, "
            f"heartbeat every {heartbeat} s; the agents run in a separate process.\n\n"
            "| measure | value |\n|---|---|\n"
            f"| all connected (mTLS handshakes + Hello) | {connect_s:.1f} s |\n"
            f"| server CPU while holding them (heartbeats only) | {100 * idle_cpu:.1f}% of one core |\n"
            f"| server peak RSS | {rss:,.0f} MB |\n"
            f"| command round trip p50 (GetHealth to a random agent) | {lat[len(lat) // 2] * 1000:.1f} ms |\n"
            f"| command round trip p99 | {lat[int(len(lat) * 0.99) - 1] * 1000:.1f} ms |\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--heartbeat", type=int, default=5)
    ap.add_argument("--role", default="server")
    ap.add_argument("--work", default="")
    ap.add_argument("--port", type=int, default=0)
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one socket per stream
    if a.role == "agents":
        asyncio.run(run_agents(Path(a.work), a.port, a.agents, a.heartbeat))
        return 0
    work = Path(tempfile.mkdtemp(prefix="reddwarf-streams-", dir="/var/tmp"))
    try:
        print(asyncio.run(serve(work, a.agents, a.seconds, a.heartbeat)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

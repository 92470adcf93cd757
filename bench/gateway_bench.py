"""The REST gateway's overhead: the same GetFlavor through the Trove REST gateway (HTTP → gRPC) and straight
through gRPC, requests per second side by side, both against the same real server in this run, in
interleaved rounds.

The clients: gRPC through the SDK's AsyncClient (grpc.aio, the stack the gateway itself calls with); REST
through a minimal asyncio HTTP/1.1 client on keep-alive connections (one per caller: write the request,
read the head, read Content-Length bytes), so that each side's client costs about what grpc.aio's does and the
figure measures the gateway, not the client. httpx, a full client, is shown beside it for reference: on a
shared 2-core machine its own CPU (≈ 1-2 ms a request here) comes out of what the gateway and server get.

Beside requests per second, each path's CPU per request: the server's, the gateway's and the bench's own
(client) process, read from /proc around each round. On a shared machine throughput moves with the load; CPU per
request moves much less, and says where the REST path's extra cost is.

Run: `.venv/bin/python -m bench.gateway_bench [--seconds 5] [--rounds 3] [--concurrency 8]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx

from reddwarf.client import AsyncClient, ClientConfig
from reddwarf.common.tls import aio_channel
from reddwarf.v1 import admin_pb2, admin_pb2_grpc
from tests.fixtures.gateway import start_gateway
from tests.fixtures.server import start_server

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """user + system CPU of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def gateway_pid() -> int:
    """The gateway started by start_gateway: this process's child running reddwarf.client.gateway."""
    me = str(os.getpid())
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == me \
                    and b"reddwarf.client.gateway" in (d / "cmdline").read_bytes():
                return int(d.name)
        except OSError:
            continue
    raise RuntimeError("the gateway process was not found")


Sample = tuple[float, list[float], dict[str, float]]  # requests/s, latencies, CPU ms per request by process


async def measured(fn: Callable[[], Awaitable[object]], seconds: float, concurrency: int,
                   pids: dict[str, int]) -> Sample:
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    rps, lat = await drive(fn, seconds, concurrency)
    return rps, lat, {k: 1000 * (cpu_seconds(p) - before[k]) / max(1, len(lat)) for k, p in pids.items()}


async def drive(fn: Callable[[], Awaitable[object]], seconds: float, concurrency: int) -> tuple[float, list[float]]:
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            t = time.monotonic()
            await fn()
            lat.append(time.monotonic() - t)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(lat) / (time.monotonic() - t0), sorted(lat)


class KeepAliveHttp:
    """GET over HTTP/1.1 keep-alive connections, one request at a time per connection, as lean as a client can
    be: the bench's REST client. A connection the server closed (idle keep-alive timeout) is reopened."""

    def __init__(self, host: str, port: int, headers: dict[str, str]) -> None:
        self.host, self.port = host, port
        self.headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self, path: str) -> bytes:
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}\r\n".encode()
        for attempt in (0, 1):
            r, w = self.idle.pop() if self.idle and not attempt else \
                await asyncio.open_connection(self.host, self.port)
            w.write(request)
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                w.close()
                if attempt:
                    raise
                continue
            lower = head.lower()
            at = lower.index(b"content-length:") + 15
            body = await r.readexactly(int(lower[at:lower.index(b"\r\n", at)]))
            self.idle.append((r, w))
            if head[9:12] != b"200":
                raise RuntimeError(f"{path}: {head[:12]!r} {body[:200]!r}")
            return body
        raise AssertionError("unreachable")

    def close(self) -> None:
        for _, w in self.idle:
            w.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three paths")
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-gwbench-", dir="/var/tmp") as tmp, \
            start_server(Path(tmp)) as server:
        admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
        tid = f"b{uuid.uuid4().hex[:6]}"
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
        token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}")).secret
        with start_gateway(server.api, server.gateway_files) as base:
            host, _, port = base.removeprefix("http://").rpartition(":")

            pids = {"server": server.proc.pid, "gateway": gateway_pid(), "client": os.getpid()}

            async def run() -> dict[str, list[Sample]]:
                raw = KeepAliveHttp(host, int(port), {"X-Auth-Token": token})
                # The SDK's AsyncClient on the gRPC side: the same client the gateway is built on.
                async with aio_channel(server.api, server.client_files) as ch, \
                        httpx.AsyncClient(base_url=base, headers={"X-Auth-Token": token}) as http:
                    rd = AsyncClient(ClientConfig(endpoint=server.api, token=token), channel=ch)

                    async def httpx_call() -> None:
                        (await http.get(f"/v1.0/{tid}/flavors/small")).raise_for_status()

                    paths: dict[str, Callable[[], Awaitable[object]]] = {
                        "gRPC through the SDK's AsyncClient (mTLS, bearer token; baseline)":
                            lambda: rd.get_flavor("small"),
                        "REST gateway, lean keep-alive HTTP/1.1 client":
                            lambda: raw.get(f"/v1.0/{tid}/flavors/small"),
                        "REST gateway, httpx client (reference)": httpx_call,
                    }
                    results: dict[str, list[Sample]] = {k: [] for k in paths}
                    for fn in paths.values():
                        await drive(fn, 1, a.concurrency)  # warm every path
                    for _ in range(a.rounds):
                        for name, fn in paths.items():
                            results[name].append(await measured(fn, a.seconds, a.concurrency, pids))
                    raw.close()
                    return results

            results = asyncio.run(run())

    def p(lat: list[float], q: float) -> str:
        return f"{lat[int(q * (len(lat) - 1))] * 1000:.1f} ms"

    print("## REST gateway overhead\n")
    print(f"GetFlavor, {a.concurrency} concurrent callers, {a.rounds} interleaved rounds of {a.seconds:.0f} s per "
          "path, same server, same run. The REST path also checks the path's tenant (GetCaller, remembered per "
          f"token) on every request, as Trove does. Machine: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at the end (shared).\n")
    print("| path | requests/s (median of rounds) | rounds | p50 | p99 | share of gRPC (median of per-round ratios) |")
    print("|---|---|---|---|---|---|")
    base_runs = next(iter(results.values()))
    for name, runs in results.items():
        rps = statistics.median(r for r, _, _ in runs)
        lat = sorted(x for _, ls, _ in runs for x in ls)
        ratios = [r / b for (r, _, _), (b, _, _) in zip(runs, base_runs, strict=True)]
        spread = " / ".join(f"{r:,.0f}" for r, _, _ in runs)
        share = " / ".join(f"{100 * x:.0f}%" for x in ratios)
        print(f"| {name} | {rps:,.0f} | {spread} | {p(lat, .5)} | {p(lat, .99)} | "
              f"{100 * statistics.median(ratios):.0f}% ({share}) |")
    print("\nCPU per request (median of rounds, ms; the gateway is idle on the gRPC path):\n")
    print("| path | server | gateway | client (the bench) | total |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        cpu = {k: statistics.median(c[k] for _, _, c in runs) for k in ("server", "gateway", "client")}
        print(f"| {name} | {cpu['server']:.2f} | {cpu['gateway']:.2f} | {cpu['client']:.2f} | "
              f"{sum(cpu.values()):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The REST gateway's overhead: the same GetFlavor through the Trove REST gateway (HTTP → gRPC) and
straight through gRPC, requests per second side by side, both against the same real server in this run.

Run: `.venv/bin/python -m bench.gateway_bench [--seconds 10] [--concurrency 8]`.
"""
from __future__ import annotations

import argparse
import asyncio
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


async def drive(fn: Callable[[], Awaitable[None]], seconds: float, concurrency: int) -> tuple[float, list[float]]:
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-gwbench-", dir="/var/tmp") as tmp, \
            start_server(Path(tmp)) as server:
        admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
        tid = f"b{uuid.uuid4().hex[:6]}"
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
        token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}")).secret
        with start_gateway(server.api, server.gateway_files) as base:

            async def run() -> tuple[tuple[float, list[float]], tuple[float, list[float]]]:
                # The SDK's AsyncClient on the gRPC side: the same client the gateway is built on.
                async with aio_channel(server.api, server.client_files) as ch, \
                        httpx.AsyncClient(base_url=base, headers={"X-Auth-Token": token}) as http:
                    rd = AsyncClient(ClientConfig(endpoint=server.api, token=token), channel=ch)

                    async def grpc_call() -> None:
                        await rd.get_flavor("small")

                    async def rest_call() -> None:
                        r = await http.get(f"/v1.0/{tid}/flavors/small")
                        r.raise_for_status()

                    await drive(grpc_call, 1, a.concurrency)  # warm both paths
                    await drive(rest_call, 1, a.concurrency)
                    return (await drive(grpc_call, a.seconds, a.concurrency),
                            await drive(rest_call, a.seconds, a.concurrency))

            (g_rps, g_lat), (r_rps, r_lat) = asyncio.run(run())

    def p(lat: list[float], q: float) -> str:
        return f"{lat[int(q * (len(lat) - 1))] * 1000:.1f} ms"

    print("## REST gateway overhead\n")
    print(f"GetFlavor, {a.concurrency} concurrent clients for {a.seconds:.0f} s each, same server, same run. "
          "The REST path also checks the path's tenant (GetCaller) on every request, as Trove does.\n")
    print("| path | requests/s | p50 | p99 |")
    print("|---|---|---|---|")
    print(f"| gRPC through the SDK's AsyncClient (mTLS, bearer token) | {g_rps:,.0f} | {p(g_lat, .5)} | {p(g_lat, .99)} |")
    print(f"| REST gateway (Trove JSON → gRPC) | {r_rps:,.0f} | {p(r_lat, .5)} | {p(r_lat, .99)} |")
    print(f"\nREST reaches {100 * r_rps / g_rps:.0f}% of the gRPC throughput.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

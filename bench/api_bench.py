"""The unary API's hot path against a bare gRPC server: GetFlavor and GetInstance through the real control
server (mTLS, bearer token, authentication, rate limit, the state database) beside a bare grpc.aio server
in its own process on the same TLS files answering GetFlavor with a constant. Same client, same
concurrency, same run.

Run: `.venv/bin/python -m bench.api_bench [--seconds 8] [--concurrency 8]`.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from bench.gateway_bench import drive
from reddwarf.common import tls
from reddwarf.server import models
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import start_server, stop_process

# The baseline: what gRPC itself costs on these TLS files, with nothing of ours in the path.
BARE_SERVER = """
import asyncio, sys
import grpc
from reddwarf.common import tls
from reddwarf.common.pki import TlsFiles
from reddwarf.v1 import database_pb2, database_pb2_grpc

FLAVOR = database_pb2.Flavor(name="flavors/small", id="small", display_name="small", default_volume_gb=2)

class Catalog(database_pb2_grpc.CatalogServicer):
    async def GetFlavor(self, request, context):
        return FLAVOR

async def main():
    from pathlib import Path
    files = TlsFiles(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    cert, key, ca = files.read()
    server = grpc.aio.server(options=tls.SERVER_OPTIONS)
    database_pb2_grpc.add_CatalogServicer_to_server(Catalog(), server)
    server.add_secure_port(sys.argv[1], tls.server_credentials(cert, key, ca, require_client_auth=True))
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def pct(lat: list[float], q: float) -> str:
    return f"{lat[int(q * (len(lat) - 1))] * 1000:.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the three paths")
    ap.add_argument("--profile", default="", help="write a py-spy profile (raw, collapsed stacks) of the "
                    "server under GetFlavor load to this file, instead of measuring")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-apibench-", dir="/var/tmp") as tmp, \
            start_server(Path(tmp)) as server:
        admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
        tid = f"b{uuid.uuid4().hex[:6]}"
        admin.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
        token = admin.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}")).secret
        iid = str(uuid.uuid4())
        engine = sa.create_engine(server.db_url)
        with Session(engine) as s, s.begin():
            s.add(models.Instance(id=iid, tenant_id=tid, display_name="bench", status="ACTIVE", flavor_id="small",
                                  volume_size_gb=1, datastore="mariadb", datastore_version="10.11",
                                  created_at=dt.datetime.now(dt.UTC).replace(tzinfo=None)))
        engine.dispose()
        bare_addr = f"127.0.0.1:{free_port()}"
        f = server.server_files
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, bare_addr, str(f.cert), str(f.key), str(f.ca)],
                                stdout=subprocess.PIPE, start_new_session=True)  # stop_process kills its group
        try:
            assert bare.stdout is not None and bare.stdout.readline().strip() == b"ready"
            md = (("authorization", f"Bearer {token}"),)

            async def run() -> dict[str, list[tuple[float, list[float]]]]:
                async with tls.aio_channel(server.api, server.client_files) as ch, \
                        tls.aio_channel(bare_addr, server.client_files) as bare_ch:
                    catalog = database_pb2_grpc.CatalogStub(ch)
                    instances = database_pb2_grpc.InstancesStub(ch)
                    bare_catalog = database_pb2_grpc.CatalogStub(bare_ch)
                    paths: dict[str, Callable[[], Awaitable[object]]] = {
                        "bare grpc.aio server, constant GetFlavor (baseline)":
                            lambda: bare_catalog.GetFlavor(database_pb2.GetFlavorRequest(name="small"), metadata=md),
                        "Red Dwarf GetFlavor":
                            lambda: catalog.GetFlavor(database_pb2.GetFlavorRequest(name="small"), metadata=md),
                        "Red Dwarf GetInstance":
                            lambda: instances.GetInstance(database_pb2.GetInstanceRequest(name=iid), metadata=md),
                    }
                    results: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in paths}
                    if a.profile:
                        for name in ("GetFlavor", "GetInstance"):
                            spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "-f",
                                                    "raw", "-d", str(int(a.seconds)), "-o", f"{a.profile}.{name}",
                                                    "-p", str(server.proc.pid)])
                            await drive(paths[f"Red Dwarf {name}"], a.seconds + 2, a.concurrency)
                            spy.wait()
                        return results
                    for fn in paths.values():
                        await drive(fn, 1, a.concurrency)  # warm every path
                    for _ in range(a.rounds):
                        for name, fn in paths.items():
                            results[name].append(await drive(fn, a.seconds, a.concurrency))
                    return results

            results = asyncio.run(run())
        finally:
            stop_process(bare)
    if a.profile:
        print(f"profile written to {a.profile}")
        return 0

    print("## Unary API against a bare gRPC server\n")
    print(f"{a.concurrency} concurrent callers on one mTLS channel (the SDK's grpc.aio stubs, a bearer token on "
          f"every call), {a.rounds} interleaved rounds of {a.seconds:.0f} s per path, the same run. The baseline "
          "is a bare grpc.aio server in its own process on the same TLS files answering GetFlavor with a "
          "constant.\n")
    print("| path | requests/s (mean of rounds) | rounds | p50 | p99 | share of baseline (mean) | per round |")
    print("|---|---|---|---|---|---|---|")
    base_runs = next(iter(results.values()))
    base = sum(r for r, _ in base_runs) / a.rounds
    for name, runs in results.items():
        rps = sum(r for r, _ in runs) / len(runs)
        lat = sorted(x for _, ls in runs for x in ls)
        spread = " / ".join(f"{r:,.0f}" for r, _ in runs)
        # Each round's path against the same round's baseline: the machine's load moves between rounds.
        per_round = " / ".join(f"{100 * r / b:.0f}%" for (r, _), (b, _) in zip(runs, base_runs, strict=True))
        print(f"| {name} | {rps:,.0f} | {spread} | {pct(lat, .5)} | {pct(lat, .99)} | {100 * rps / base:.0f}% "
              f"| {per_round} |")
    print(f"\nMachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (shared).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

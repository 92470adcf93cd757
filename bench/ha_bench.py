"""API throughput with one control server vs two on this machine: the SDK's AsyncClient given one endpoint,
then both (its channel balances round-robin over them, clients/endpoints.py), against the same two servers on
the same PostgreSQL state DB, in interleaved rounds of the same run. The calls are reads (GetInstance and
ListFlavors alternately) as a tenant, through mTLS and the bearer token.

Run: `.venv/bin/python -m bench.ha_bench [--seconds 8] [--concurrency 16] [--rounds 2]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

from bench.gateway_bench import drive
from reddwarf.client import AsyncClient, ClientConfig
from tests.ha.servers import Pair, two_servers


def pct(lat: list[float], q: float) -> str:
    return f"{lat[int(q * (len(lat) - 1))] * 1000:.1f} ms"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-habench-", dir="/var/tmp") as tmp, \
            two_servers(Path(tmp)) as pair:

        def config(endpoint: str) -> ClientConfig:
            f = pair.first.client_files
            return ClientConfig(endpoint=endpoint, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                                token=pair.token, timeout=30)

        async def run(p: Pair) -> dict[str, list[tuple[float, list[float]]]]:
            async with AsyncClient(config(p.apis[0])) as one, AsyncClient(config(p.endpoint)) as both:
                iid = (await one.create_instance("ha-bench", "tiny", 1)).id  # no host: it stays a row to read
                results: dict[str, list[tuple[float, list[float]]]] = {"one server (baseline)": [],
                                                                       "two servers, round-robin": []}
                clients = {"one server (baseline)": one, "two servers, round-robin": both}
                for rd in clients.values():
                    await drive(lambda rd=rd: rd.get_instance(iid), 1, a.concurrency)  # warm every path
                for _ in range(a.rounds):
                    for name, rd in clients.items():
                        async def call(rd: AsyncClient = rd, flip: list[int] = [0]) -> None:  # noqa: B006
                            flip[0] ^= 1  # the default list is this path's own toggle
                            if flip[0]:
                                await rd.get_instance(iid)
                            else:
                                await rd.list_flavors()
                        results[name].append(await drive(call, a.seconds, a.concurrency))
                return results

        results = asyncio.run(run(pair))
    print("## API throughput: one control server vs two\n")
    print(f"{a.concurrency} concurrent callers in one process (the SDK's AsyncClient), GetInstance and ListFlavors "
          f"alternately, {a.rounds} interleaved rounds of {a.seconds:.0f} s per path, the same run; both servers on "
          f"one PostgreSQL. This machine has {os.cpu_count()} CPUs shared by the client, both servers and the "
          "database (and, while this ran, other engineers' work), so a second server adds little CPU to share: "
          "the figure shows the cost or gain of spreading over processes here, not a cluster's scaling.\n")
    print("| path | requests/s (mean of rounds) | rounds | p50 | p99 | share of baseline |")
    print("|---|---|---|---|---|---|")
    base = sum(r for r, _ in next(iter(results.values()))) / a.rounds
    for name, runs in results.items():
        rps = sum(r for r, _ in runs) / len(runs)
        lat = sorted(x for _, ls in runs for x in ls)
        spread = " / ".join(f"{r:,.0f}" for r, _ in runs)
        print(f"| {name} | {rps:,.0f} | {spread} | {pct(lat, .5)} | {pct(lat, .99)} | {100 * rps / base:.0f}% |")
    print("\ncreate→ACTIVE with one server vs two is not measured here (it needs a hostd and real instances).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

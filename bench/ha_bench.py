"""One control server vs two on this machine, the SDK's AsyncClient given one endpoint, then both (its channel
balances round-robin over them, clients/endpoints.py), against the same two servers on the same PostgreSQL
state DB, in interleaved rounds of the same run:

- API throughput: reads (GetInstance and ListFlavors alternately) as a tenant, through mTLS and the bearer token;
- create→ACTIVE: N instances created at once (flavor tiny) on one hostd with the fake container driver (its
  guest agents are real agent processes with the fake datastore, given both servers' agent and enrollment
  endpoints, tests/ha/twoservers.py), each timed from its CreateInstance call to ACTIVE (WatchInstance), and the
  round's makespan; they are deleted, and gone, before the next round.

Run: `.venv/bin/python -m bench.ha_bench [--seconds 8] [--concurrency 16] [--rounds 2] [--creates 4]
[--create-rounds 3]`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

from bench.gateway_bench import drive
from reddwarf.client import AsyncClient, ClientConfig
from tests.fixtures.postgres import postgres_server
from tests.ha.twoservers import TwoServers, two_servers

ONE, BOTH = "one server (baseline)", "two servers, round-robin"


def pct(lat: list[float], q: float, unit: float = 1000, fmt: str = "{:.1f} ms") -> str:
    return fmt.format(lat[int(q * (len(lat) - 1))] * unit)


async def create_round(rd: AsyncClient, n: int) -> tuple[list[float], float]:
    """n creates at once through rd: each one's create→ACTIVE, and the round's makespan; then deletes them and
    waits until they are gone, so every round starts from an empty host."""
    tag = uuid.uuid4().hex[:6]
    t0 = time.monotonic()

    async def one(i: int) -> tuple[str, float]:
        start = time.monotonic()
        iid = (await rd.create_instance(f"hab-{tag}-{i}", "tiny", 1)).id
        await rd.wait_for(iid, "ACTIVE", timeout=180)
        return iid, time.monotonic() - start

    done = await asyncio.gather(*(one(i) for i in range(n)))
    makespan = time.monotonic() - t0
    ids = {iid for iid, _ in done}
    for iid in ids:
        await rd.delete_instance(iid)
    deadline = time.monotonic() + 180
    while ids & {i.id async for i in rd.list_instances()}:
        if time.monotonic() > deadline:
            raise RuntimeError(f"instances {sorted(ids)} not deleted within 180 s")
        await asyncio.sleep(0.2)
    return [s for _, s in done], makespan


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--creates", type=int, default=4, help="instances created at once per create round")
    ap.add_argument("--create-rounds", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-habench-", dir="/var/tmp") as tmp, \
            postgres_server() as pg, two_servers(Path(tmp), pg, "fake") as ha:

        def config(endpoint: str) -> ClientConfig:
            f = ha.c.server.client_files
            return ClientConfig(endpoint=endpoint, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                                token=ha.c.token, timeout=30)

        async def run(ha: TwoServers) -> tuple[dict[str, list[tuple[float, list[float]]]],
                                               dict[str, list[tuple[list[float], float]]]]:
            async with AsyncClient(config(ha.c.server.api)) as one, \
                    AsyncClient(config(f"{ha.c.server.api},{ha.api2}")) as both:
                clients = {ONE: one, BOTH: both}
                # A row to read; placed and made ACTIVE on the hostd, it is deleted before the create rounds.
                iid = (await one.create_instance("ha-bench", "tiny", 1)).id
                await one.wait_for(iid, "ACTIVE", timeout=180)
                reads: dict[str, list[tuple[float, list[float]]]] = {ONE: [], BOTH: []}
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
                        reads[name].append(await drive(call, a.seconds, a.concurrency))
                await one.delete_instance(iid)
                while iid in {i.id async for i in one.list_instances()}:
                    await asyncio.sleep(0.2)
                creates: dict[str, list[tuple[list[float], float]]] = {ONE: [], BOTH: []}
                for rd in clients.values():
                    await create_round(rd, 1)  # warm: the first agent start on this host pays imports
                for _ in range(a.create_rounds):
                    for name, rd in clients.items():
                        creates[name].append(await create_round(rd, a.creates))
                return reads, creates

        reads, creates = asyncio.run(run(ha))
    print("## API throughput and create→ACTIVE: one control server vs two\n")
    print(f"This machine has {os.cpu_count()} CPUs shared by the client, both servers, the database and the hostd "
          "with its guest agents (and, while this ran, other engineers' work), so a second server adds little "
          "CPU to share: the figures show the cost or gain of spreading over processes here, not a cluster's "
          "scaling. Both servers run on one PostgreSQL; one path gives the SDK one endpoint, the other both.\n")
    print(f"**API throughput.** {a.concurrency} concurrent callers in one process (the SDK's AsyncClient), "
          f"GetInstance and ListFlavors alternately, {a.rounds} interleaved rounds of {a.seconds:.0f} s per path.\n")
    print("| path | requests/s (mean of rounds) | rounds | p50 | p99 | share of baseline |")
    print("|---|---|---|---|---|---|")
    base = sum(r for r, _ in reads[ONE]) / len(reads[ONE])
    for name, runs in reads.items():
        rps = sum(r for r, _ in runs) / len(runs)
        lat = sorted(x for _, ls in runs for x in ls)
        spread = " / ".join(f"{r:,.0f}" for r, _ in runs)
        print(f"| {name} | {rps:,.0f} | {spread} | {pct(lat, .5)} | {pct(lat, .99)} | {100 * rps / base:.0f}% |")
    print(f"\n**create→ACTIVE.** {a.creates} instances (flavor tiny) created at once per round, "
          f"{a.create_rounds} interleaved rounds per path after one warm-up create each; one hostd with the fake "
          "container driver (real hostd and agent processes, no LXC or MariaDB: the control plane's share of a "
          "create), its agents given both servers' endpoints. Each instance is timed from its CreateInstance call "
          "to ACTIVE seen on WatchInstance; makespan is the round's first create to its last ACTIVE. All are "
          "deleted, and gone, between rounds.\n")
    print("| path | create→ACTIVE p50 | p90 | makespan (mean of rounds) | rounds | share of baseline makespan |")
    print("|---|---|---|---|---|---|")
    base_span = sum(m for _, m in creates[ONE]) / len(creates[ONE])
    for name, rounds in creates.items():
        lat = sorted(x for ls, _ in rounds for x in ls)
        span = sum(m for _, m in rounds) / len(rounds)
        spread = " / ".join(f"{m:.2f}" for _, m in rounds)
        print(f"| {name} | {pct(lat, .5, 1, '{:.2f} s')} | {pct(lat, .9, 1, '{:.2f} s')} | {span:.2f} s | "
              f"{spread} | {100 * span / base_span:.0f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

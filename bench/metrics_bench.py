"""How long a /metrics scrape takes with 1,000 instances' worth of series, next to prometheus_client
rendering the same number of samples from plain labelled Gauges in the same run (the floor of any exporter
built on it).

The server's state is made as the real loops leave it: a state DB (SQLite) with the instances, their
stored health, a backup and its task each, read by the real snapshot (`read_snapshot`, timed too: it runs
every metrics_refresh_seconds, off the scrape path); every guest connected with a live heartbeat; each
container's five beancounters as hostd's ListUsage returns them; API and task series. Then the scrape:
rendering alone, and whole HTTP GETs through the real listener, plain on loopback and over TLS with a
monitor certificate.

Run: `.venv/bin/python -m bench.metrics_bench [--instances 1000] [--rounds 30]`.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import socket
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import grpc
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from reddwarf.common.clock import now as utcnow
from reddwarf.common.pki import CertificateAuthority, TlsFiles
from reddwarf.server import models
from reddwarf.server.api_metrics import ApiMetricsInterceptor
from reddwarf.server.metrics import ServerMetrics, read_snapshot
from reddwarf.server.metrics_http import MetricsListener
from reddwarf.v1 import common_pb2, host_pb2
from tests.fixtures.mariadb import free_port

RESOURCES = ("memory", "swap", "numproc", "cpu", "blkio")


def health(i: int) -> common_pb2.GuestHealth:
    h = common_pb2.GuestHealth(service_state=common_pb2.SERVICE_STATE_RUNNING, accepting_connections=True,
                               uptime_seconds=3600 + i, connections=1000 + i, threads_connected=i % 50,
                               queries=10**6 + i, slow_queries=i % 7, buffer_pool_bytes_total=128 << 20,
                               buffer_pool_bytes_data=(64 << 20) + i, datadir_bytes_used=(1 << 30) + i,
                               datadir_bytes_total=10 << 30, restarts=i % 3)
    h.observed.GetCurrentTime()
    return h


class Agents:
    def __init__(self, live: dict[str, common_pb2.GuestHealth]) -> None:
        self.live = live

    def is_connected(self, instance_id: str) -> bool:
        return instance_id in self.live

    def last_health(self, instance_id: str) -> common_pb2.GuestHealth | None:
        return self.live.get(instance_id)

    def stream_count(self) -> int:
        return len(self.live)


def seed(sessions: sessionmaker, n: int) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    now = utcnow()
    ids = [(f"t{i % 50}", str(uuid.uuid4())) for i in range(n)]
    with sessions() as s, s.begin():
        s.add_all(models.Tenant(id=f"t{t}") for t in range(50))
        for i, (tenant, iid) in enumerate(ids):
            s.add(models.Instance(id=iid, tenant_id=tenant, display_name=f"db{i}", status="ACTIVE", host_id="h1",
                                  flavor_id="small", volume_size_gb=10, datastore="mariadb", datastore_version="10.11",
                                  health=json_format.MessageToDict(health(i)), health_at=now))
            bid = str(uuid.uuid4())
            s.add(models.Backup(id=bid, tenant_id=tenant, instance_id=iid, display_name="nightly", status="COMPLETED",
                                size_bytes=(100 << 20) + i, created_at=now - dt.timedelta(hours=3)))
            s.add(models.Task(id=str(uuid.uuid4()), kind="create_backup", resource=f"backups/{bid}",
                              state="succeeded", tenant_id=tenant, created_at=now - dt.timedelta(hours=3),
                              updated_at=now - dt.timedelta(hours=3) + dt.timedelta(seconds=90 + i % 60)))
    return ids


def usage(iid: str, i: int) -> host_pb2.ContainerUsage:
    return host_pb2.ContainerUsage(
        id=iid, cpu_usage_ns=10**12 + i, io_read_bytes=10**9 + i, io_write_bytes=10**9 + 2 * i,
        beancounters=[host_pb2.Beancounter(resource=r, held=1000 + i, maxheld=2000 + i, barrier=4096, limit=4096,
                                           failcnt=i % 5) for r in RESOURCES])


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    return paired([fn], rounds)[0]


def paired(fns: list[Callable[[], object]], rounds: int) -> list[list[float]]:
    """Each function's times, sorted; the functions take turns round by round, so ours and the baseline see
    the same machine (a shared 2-CPU one: its load moves within seconds)."""
    for fn in fns:
        fn()  # warm
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            out[i].append(time.perf_counter() - t)
    return [sorted(x) for x in out]


def baseline_registry(samples: int) -> CollectorRegistry:
    """prometheus_client's plain Gauges: 26 labelled metrics (as many names as our per-instance ones) with
    children enough for `samples` samples in all."""
    reg = CollectorRegistry()
    names = 26
    per = samples // names
    for k in range(names):
        g = Gauge(f"baseline_metric_{k}", "plain labelled gauge", ["tenant", "instance"], registry=reg)
        for i in range(per):
            g.labels(f"t{i % 50}", f"{i:08d}-0000-4000-8000-000000000000").set(i)
    return reg


def https_get(port: int, files: TlsFiles) -> bytes:
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="server.reddwarf") as tls:
        tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := tls.recv(1 << 20):
            data += chunk
    return data


async def interceptor_cost(n: int) -> tuple[float, float]:
    """Seconds per call of a unary method through the API metrics interceptor and without it, the handler
    looked up per call as grpc.aio does (the servicer itself does nothing)."""
    m = ServerMetrics()
    interceptor = ApiMetricsInterceptor(m.api_calls, m.api_seconds)

    async def behavior(request: int, context: object) -> int:
        return request

    handler = grpc.unary_unary_rpc_method_handler(behavior)

    async def continuation(details: object) -> grpc.RpcMethodHandler[int, int]:
        return handler

    details = SimpleNamespace(method="/reddwarf.v1.Instances/GetInstance", invocation_metadata=())
    context = SimpleNamespace(code=lambda: None)

    async def loop(wrapped: bool) -> float:
        t = time.perf_counter()
        for i in range(n):
            h = await (interceptor.intercept_service(continuation, details) if wrapped  # type: ignore[arg-type]
                       else continuation(details))
            await h.unary_unary(i, context)
        return (time.perf_counter() - t) / n
    await loop(True)
    bare, ours = [], []
    for _ in range(5):  # interleaved, so both see the same machine
        bare.append(await loop(False))
        ours.append(await loop(True))
    return statistics.median(ours), statistics.median(bare)


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.1f} ms (p90 {xs[int(len(xs) * 0.9) - 1] * 1000:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--instances", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reddwarf-metricsbench-", dir="/var/tmp") as tmp:
        engine = create_engine(f"sqlite:///{tmp}/state.db")
        models.Base.metadata.create_all(engine)
        sessions = sessionmaker(bind=engine, expire_on_commit=False)
        ids = seed(sessions, a.instances)

        m = ServerMetrics(heartbeat_expiry=20)
        m.agents = Agents({iid: health(i) for i, (_, iid) in enumerate(ids)})
        m.usage.by_container = {iid: usage(iid, i) for i, (_, iid) in enumerate(ids)}
        for k in range(40):
            for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT"):
                m.api_calls.labels(f"/reddwarf.v1.Service/Method{k}", code).inc(k + 1)
            m.api_seconds.labels(f"/reddwarf.v1.Service/Method{k}").observe(0.002)
        for kind in ("create_instance", "delete_instance", "create_backup", "verify_backup", "resize_instance"):
            for outcome in ("succeeded", "failed"):
                m.task_ended(kind, outcome, 12.0)
        refresh = timed(lambda: read_snapshot(sessions, 20), max(5, a.rounds // 3))
        asyncio.run(m.refresh(sessions))

        text = generate_latest(m.registry).decode()
        samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        per_instance = sum(1 for line in text.splitlines() if ids[0][1] in line)
        base_reg = baseline_registry(samples)
        base_text = generate_latest(base_reg).decode()
        base_samples = sum(1 for line in base_text.splitlines() if line and not line.startswith("#"))
        ours, base = paired([lambda: generate_latest(m.registry), lambda: generate_latest(base_reg)], a.rounds)

        ca = CertificateAuthority.init(Path(tmp) / "pki")
        server_files = ca.write_identity(Path(tmp) / "tls", "server", "server", "control")
        monitor = ca.write_identity(Path(tmp) / "monitor", "monitor", "monitor", "prometheus")
        plain = MetricsListener(f"127.0.0.1:{free_port()}", m.registry)
        tls = MetricsListener(f"127.0.0.1:{free_port()}", m.registry, tls=server_files)
        base_listener = MetricsListener(f"127.0.0.1:{free_port()}", base_reg)
        for listener in (plain, tls, base_listener):
            listener.start()
        try:
            url = f"http://127.0.0.1:{plain.port}/metrics"
            burl = f"http://127.0.0.1:{base_listener.port}/metrics"
            http, https, base_http = paired([lambda: urllib.request.urlopen(url, timeout=30).read(),
                                             lambda: https_get(tls.port, monitor),
                                             lambda: urllib.request.urlopen(burl, timeout=30).read()], a.rounds)
        finally:
            for listener in (plain, tls, base_listener):
                listener.stop()
        engine.dispose()

    per_call, bare_call = asyncio.run(interceptor_cost(20000))
    ratio = statistics.median(ours) / statistics.median(base)
    print(f"## /metrics scrape with {a.instances:,} instances\n")
    print(f"{a.instances:,} instances of 50 tenants, each with live guest health, five beancounters and a "
          f"backup; {samples:,} samples in all ({per_instance} for one instance), {len(text) / 1024:.0f} KiB. "
          f"Median of {a.rounds} scrapes, ours and the baseline taking turns.\n")
    print("| what | time | baseline (plain Gauges, same run) |")
    print("|---|---|---|")
    print(f"| render (`generate_latest`), our collector | {ms(ours)} | {ms(base)} for {base_samples:,} samples "
          f"({ratio:.2f}x) |")
    print(f"| whole HTTP GET /metrics, loopback | {ms(http)} | {ms(base_http)} |")
    print(f"| whole HTTPS GET /metrics, monitor certificate | {ms(https)} | — |")
    print(f"| state DB snapshot (SQLite; every metrics_refresh_seconds, never per scrape) | {ms(refresh)} | — |")
    print(f"| API metrics interceptor, per unary call (handler lookup, count, timing) | "
          f"{(per_call - bare_call) * 1e6:.1f} µs added ({per_call * 1e6:.1f} vs {bare_call * 1e6:.1f} µs without) | — |")
    print("\nTarget: a scrape well under Prometheus's default 10 s timeout and close to the plain-Gauge floor; "
          "no state DB or host query per scrape; the interceptor's cost small next to a call's (the gateway "
          "benchmark's 384 gRPC calls/s on this machine is about 2.6 ms of server time each).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the server tells Prometheus: per-instance guest health and beancounters, backups, tasks, agent
streams and API calls, in a registry of our own (never prometheus_client's global one).

Scrapes are cheap and never touch the state DB or a host: the per-instance series are made at scrape time
by a custom collector from what two loops keep in memory — a snapshot of the state DB (`refresh_loop`,
metrics_snapshot.py) and each host's beancounters (`usage_loop`, usage_poll.py) — plus the agent registry's
newest heartbeat of every guest connected here.

Cardinality: every per-instance series names (tenant, instance) of an instance the last snapshot found
not DELETED, so a deleted instance's series are gone within one refresh; per instance there are at most
PER_INSTANCE_SERIES of them. Per-tenant series (backup counts, stored bytes) exist for live tenants only;
tasks and API calls are labelled by kind, state, outcome, method and status code, bounded by the code.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import states
from reddwarf.common.clock import now as utcnow
from reddwarf.common.states import ServiceState
from reddwarf.v1 import common_pb2

from . import models
from .metrics_snapshot import BackupFacts, InstanceFacts, Snapshot, read_snapshot
from .usage_poll import NoHosts, UsagePoller, UsageSource

__all__ = ["PER_INSTANCE_SERIES", "BackupFacts", "InstanceFacts", "ServerMetrics", "Snapshot", "UsagePoller",
           "UsageSource", "read_snapshot"]

log = logging.getLogger("reddwarf.server.metrics")

LABELS = ("tenant", "instance")
# Guest figures with up (12), replication (2, replicas only), status (1), beancounters (5 resources x 4),
# CPU and IO (3), backups (4): the most series one instance can have.
PER_INSTANCE_SERIES = 12 + 2 + 1 + 5 * 4 + 3 + 4
# Tasks run from a second (a restart) to hours (a verify of a large backup).
TASK_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600)
API_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_RUNNING = states.to_pb(ServiceState.RUNNING)


# -- the live parts: the agent registry ------------------------------------------------------------------
class Agents(Protocol):
    """What the collector reads of server/agents.py's AgentRegistry."""

    def is_connected(self, instance_id: str) -> bool: ...

    def last_health(self, instance_id: str) -> common_pb2.GuestHealth | None: ...

    def stream_count(self) -> int: ...


def _ts(at: dt.datetime) -> float:
    return at.replace(tzinfo=dt.UTC).timestamp()


class StateCollector(Collector):
    """The per-instance, per-tenant and agent-stream series, made at scrape time from memory."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.m = metrics

    def describe(self) -> list[Metric]:
        return []  # made per scrape; nothing to check for clashes at registration

    def collect(self) -> Iterator[Metric]:
        m = self.m
        snap, agents, usage = m.snapshot, m.agents, m.usage.by_container
        expiry = m.heartbeat_expiry
        now = time.time()

        def g(name: str, doc: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*LABELS, *extra])

        def c(name: str, doc: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*LABELS, *extra])

        up = g("reddwarf_instance_up", "1 when the guest reported within its heartbeat expiry that mysqld runs "
               "and accepts connections")
        status = g("reddwarf_instance_status", "1 for the status the instance shows now (Trove's values; "
                   "STOPPED where StopInstance stopped it, which GetInstance shows as SHUTDOWN)",
                   ("status",))
        seen = g("reddwarf_guest_last_heartbeat_timestamp_seconds", "when the guest last measured its health")
        conns = g("reddwarf_guest_connections", "client connections open now (Threads_connected)")
        conns_total = c("reddwarf_guest_connections", "connection attempts since mysqld started (Connections)")
        queries = c("reddwarf_guest_queries", "statements run since mysqld started (Queries); "
                    "queries per second = rate() of it, recorded as reddwarf:guest_queries:rate1m")
        slow = c("reddwarf_guest_slow_queries", "statements slower than long_query_time since mysqld started")
        uptime = g("reddwarf_guest_uptime_seconds", "seconds since mysqld started")
        bp_size = g("reddwarf_guest_buffer_pool_size_bytes", "InnoDB buffer pool size")
        bp_data = g("reddwarf_guest_buffer_pool_data_bytes", "InnoDB buffer pool bytes holding data")
        dd_used = g("reddwarf_guest_datadir_used_bytes", "bytes used on the data volume")
        dd_size = g("reddwarf_guest_datadir_size_bytes", "size of the data volume's filesystem")
        restarts = c("reddwarf_guest_mysqld_restarts", "crashed mysqld restarted by the agent since it started")
        lag = g("reddwarf_guest_replication_lag_seconds", "seconds a replica is behind its primary "
                "(replicas with running replication only)")
        repl = g("reddwarf_guest_replication_running", "1 when a replica's IO and SQL threads run (replicas only)")
        held = g("reddwarf_beancounter_held", "what the container holds now, in the resource's unit: bytes "
                 "(memory, swap, blkio), processes (numproc), CPU milliseconds (cpu)", ("resource",))
        maxheld = g("reddwarf_beancounter_maxheld", "the most it has held (same units)", ("resource",))
        limit = g("reddwarf_beancounter_limit", "its limit (same units; cpu: millicores, 0: none)", ("resource",))
        fails = c("reddwarf_beancounter_failures", "charges refused at the limit (cpu: throttled periods)",
                  ("resource",))
        cpu = c("reddwarf_container_cpu_seconds", "CPU time the container used")
        io_r = c("reddwarf_container_io_read_bytes", "bytes the container read from block devices")
        io_w = c("reddwarf_container_io_write_bytes", "bytes the container wrote to block devices")
        b_size = g("reddwarf_backup_last_size_bytes", "size of the newest COMPLETED backup")
        b_took = g("reddwarf_backup_last_duration_seconds", "how long the newest COMPLETED backup took, "
                   "from request to proven")
        b_when = g("reddwarf_backup_last_success_timestamp_seconds", "when the newest COMPLETED backup ended")
        b_failed = g("reddwarf_backup_last_failed", "1 when the newest finished backup FAILED")

        for inst in snap.instances:
            lv = [inst.tenant, inst.id]
            status.add_metric([*lv, inst.status], 1)
            live = agents.last_health(inst.id) if agents is not None and agents.is_connected(inst.id) else None
            if live is not None:
                h, fresh = live, True
            else:
                h = inst.health
                fresh = inst.health_at is not None and (utcnow() - inst.health_at).total_seconds() <= expiry
            up.add_metric(lv, 1 if fresh and h.service_state == _RUNNING and h.accepting_connections else 0)
            if h.HasField("observed"):
                seen.add_metric(lv, h.observed.seconds + h.observed.nanos / 1e9)
                if h.accepting_connections:
                    conns.add_metric(lv, h.threads_connected)
                    conns_total.add_metric(lv, h.connections)
                    queries.add_metric(lv, h.queries)
                    slow.add_metric(lv, h.slow_queries)
                    uptime.add_metric(lv, h.uptime_seconds)
                    bp_size.add_metric(lv, h.buffer_pool_bytes_total)
                    bp_data.add_metric(lv, h.buffer_pool_bytes_data)
                if h.datadir_bytes_total:
                    dd_used.add_metric(lv, h.datadir_bytes_used)
                    dd_size.add_metric(lv, h.datadir_bytes_total)
                restarts.add_metric(lv, h.restarts)
                if h.HasField("replication_running"):
                    repl.add_metric(lv, 1 if h.replication_running else 0)
                if h.HasField("replication_lag_seconds"):
                    lag.add_metric(lv, h.replication_lag_seconds)
            u = usage.get(inst.id)
            if u is not None and u.beancounters:
                for b in u.beancounters:
                    rv = [*lv, b.resource]
                    held.add_metric(rv, b.held)
                    maxheld.add_metric(rv, b.maxheld)
                    limit.add_metric(rv, b.limit)
                    fails.add_metric(rv, b.failcnt)
                cpu.add_metric(lv, u.cpu_usage_ns / 1e9)
                io_r.add_metric(lv, u.io_read_bytes)
                io_w.add_metric(lv, u.io_write_bytes)
            bf = snap.backups.get(inst.id)
            if bf is not None:
                b_failed.add_metric(lv, 1 if bf.last_failed else 0)
                if bf.last_size is not None:
                    b_size.add_metric(lv, bf.last_size)
                if bf.last_duration is not None:
                    b_took.add_metric(lv, bf.last_duration)
                if bf.last_success is not None:
                    b_when.add_metric(lv, _ts(bf.last_success))
        yield from (up, status, seen, conns, conns_total, queries, slow, uptime, bp_size, bp_data, dd_used,
                    dd_size, restarts, lag, repl, held, maxheld, limit, fails, cpu, io_r, io_w, b_size, b_took,
                    b_when, b_failed)

        count = GaugeMetricFamily("reddwarf_backups", "backups recorded, by tenant and status",
                                  labels=["tenant", "status"])
        for (tenant, st), n in sorted(snap.tenant_backups.items()):
            count.add_metric([tenant, st], n)
        stored = GaugeMetricFamily("reddwarf_backup_stored_bytes", "bytes of the tenant's backups not FAILED",
                                   labels=["tenant"])
        for tenant, n in sorted(snap.tenant_backup_bytes.items()):
            stored.add_metric([tenant], n)
        queued = GaugeMetricFamily("reddwarf_tasks", "tasks not yet ended, by kind and state",
                                   labels=["kind", "state"])
        for (kind, st), n in sorted(snap.tasks.items()):
            queued.add_metric([kind, st], n)
        streams = GaugeMetricFamily("reddwarf_agent_streams", "guest agents connected to this server")
        streams.add_metric([], agents.stream_count() if agents is not None else 0)
        age = GaugeMetricFamily("reddwarf_metrics_snapshot_age_seconds",
                                "seconds since the state behind these series was read from the state DB")
        age.add_metric([], max(0.0, now - _ts(snap.taken)))
        yield from (count, stored, queued, streams, age)


class ServerMetrics:
    """The server's registry: the state collector, plus the series recorded as things happen (task ends,
    API calls). Built once in main.wire; the loops run only when a /metrics listener is configured."""

    def __init__(self, heartbeat_expiry: float = 20.0, usage: UsagePoller | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.heartbeat_expiry = heartbeat_expiry
        self.snapshot = Snapshot(utcnow())
        self.agents: Agents | None = None
        self.usage = usage or UsagePoller(NoHosts())
        self.task_seconds = Histogram(
            "reddwarf_task_duration_seconds", "tasks that ended here, from submit to end, by kind and outcome",
            ["kind", "outcome"], buckets=TASK_BUCKETS, registry=self.registry)
        self.api_calls = Counter("reddwarf_api_calls", "API calls, by method and gRPC status code",
                                 ["method", "code"], registry=self.registry)
        self.api_seconds = Histogram("reddwarf_api_call_duration_seconds", "unary API calls' time in the server",
                                     ["method"], buckets=API_BUCKETS, registry=self.registry)
        self.registry.register(StateCollector(self))

    def task_ended(self, kind: str, outcome: str, seconds: float) -> None:
        self.task_seconds.labels(kind, outcome).observe(seconds)

    async def refresh(self, sessions: sessionmaker[Session]) -> None:
        self.snapshot = await asyncio.to_thread(read_snapshot, sessions, self.heartbeat_expiry)

    async def refresh_loop(self, sessions: sessionmaker[Session], every: float) -> None:
        while True:
            try:
                await self.refresh(sessions)
            except Exception:  # noqa: BLE001 - the last snapshot keeps serving; its age says how old it is
                log.exception("metrics snapshot failed")
            await asyncio.sleep(every)

    async def usage_loop(self, sessions: sessionmaker[Session], every: float) -> None:
        def up_hosts() -> list[str]:
            with sessions() as s:
                return list(s.scalars(select(models.Host.id).where(models.Host.state == states.HostState.UP)))
        while True:
            try:
                await self.usage.poll(self.snapshot, await asyncio.to_thread(up_hosts))
            except Exception:  # noqa: BLE001 - polled again next round
                log.exception("usage poll failed")
            await asyncio.sleep(every)

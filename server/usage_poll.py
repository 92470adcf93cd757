"""The hosts' beancounters for the metrics: each UP host's containers' usage (hostd's ListUsage, or GetUsage
per container from a hostd that predates it), polled every metrics_usage_seconds, never per scrape."""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc

from reddwarf.common.errors import RedDwarfError, Unimplemented
from reddwarf.v1 import host_pb2

from .metrics_snapshot import Snapshot

log = logging.getLogger("reddwarf.server.metrics")


class UsageSource(Protocol):
    """What the poller needs of server/hosts.py's HostPool (a fake in unit tests)."""

    async def list_usage(self, host_id: str) -> list[host_pb2.ContainerUsage]: ...

    async def get_usage(self, host_id: str, container_id: str) -> host_pb2.ContainerUsage: ...


class UsagePoller:
    """Each UP host's containers' usage, polled (never per scrape). A host that cannot be read loses its
    entries, so its instances' beancounter series are absent rather than stale."""

    def __init__(self, source: UsageSource) -> None:
        self.source = source
        self.by_container: dict[str, host_pb2.ContainerUsage] = {}
        self._by_host: dict[str, set[str]] = {}
        self._unimplemented: set[str] = set()  # hosts whose hostd predates ListUsage

    async def poll_host(self, host_id: str, container_ids: Sequence[str]) -> None:
        try:
            if host_id in self._unimplemented:
                usages = await self._one_by_one(host_id, container_ids)
            else:
                try:
                    usages = await self.source.list_usage(host_id)
                except Unimplemented:
                    self._unimplemented.add(host_id)
                    usages = await self._one_by_one(host_id, container_ids)
        except (RedDwarfError, grpc.aio.AioRpcError, OSError) as exc:
            log.warning("usage unreadable", extra={"host": host_id, "error": str(exc)[:200]})
            usages = []
        fresh = {u.id: u for u in usages}
        for cid in self._by_host.get(host_id, set()) - fresh.keys():
            self.by_container.pop(cid, None)
        self.by_container.update(fresh)
        self._by_host[host_id] = set(fresh)

    async def _one_by_one(self, host_id: str, container_ids: Sequence[str]) -> list[host_pb2.ContainerUsage]:
        out = []
        for cid in container_ids:
            try:
                out.append(await self.source.get_usage(host_id, cid))
            except RedDwarfError:
                continue  # that container is gone or not there yet
        return out

    async def poll(self, snapshot: Snapshot, up_hosts: Iterable[str]) -> None:
        per_host: dict[str, list[str]] = defaultdict(list)
        for inst in snapshot.instances:
            if inst.host_id:
                per_host[inst.host_id].append(inst.id)
        up = set(up_hosts)
        for host_id in list(self._by_host):
            if host_id not in up:
                for cid in self._by_host.pop(host_id):
                    self.by_container.pop(cid, None)
        await asyncio.gather(*(self.poll_host(h, per_host.get(h, [])) for h in up))


class NoHosts:
    """A UsageSource with no hosts (metrics built without a host pool)."""

    async def list_usage(self, host_id: str) -> list[host_pb2.ContainerUsage]:
        return []

    async def get_usage(self, host_id: str, container_id: str) -> host_pb2.ContainerUsage:
        return host_pb2.ContainerUsage(id=container_id)

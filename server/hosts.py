"""The control server's hands: one mTLS channel per hostd (the server's own certificate), capacity refresh,
and the scheduler's placement over the hosts' reported capacity."""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.errors import NotFound, ResourceExhausted, from_rpc_error
from reddwarf.common.states import HostState
from reddwarf.common.tls import aio_channel
from reddwarf.v1 import host_pb2, host_pb2_grpc

from . import models
from .app import App
from .quotas import allocated

log = logging.getLogger("reddwarf.server.hosts")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class HostRpc(Generic[Req, Resp]):
    """One HostAgent method whose failures come back as domain errors (UNAVAILABLE → Unavailable: transient)."""

    def __init__(self, rpc: grpc.aio.UnaryUnaryMultiCallable[Req, Resp]) -> None:
        self._rpc = rpc

    async def __call__(self, request: Req, timeout: float = 300) -> Resp:
        try:
            return await self._rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


class HostClient:
    """The HostAgent methods the server calls on one host."""

    def __init__(self, stub: host_pb2_grpc.HostAgentAsyncStub, host_id: str) -> None:
        self.host_id = host_id
        self.GetCapacity = HostRpc(stub.GetCapacity)
        self.CreateVolume = HostRpc(stub.CreateVolume)
        self.ResizeVolume = HostRpc(stub.ResizeVolume)
        self.DeleteVolume = HostRpc(stub.DeleteVolume)
        self.CreateContainer = HostRpc(stub.CreateContainer)
        self.StartContainer = HostRpc(stub.StartContainer)
        self.SetLimits = HostRpc(stub.SetLimits)
        self.DeleteContainer = HostRpc(stub.DeleteContainer)


class HostPool:
    def __init__(self, app: App) -> None:
        self.app = app
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def _address(self, host_id: str) -> str:
        with self.app.sessions() as s:
            row = s.get(models.Host, host_id)
            if row is None:
                raise NotFound(f"host {host_id!r} is not registered", field="host")
            return row.address

    def client(self, host_id: str) -> HostClient:
        address = self._address(host_id)
        cached = self._channels.get(host_id)
        if cached is None or cached[0] != address:
            if cached is not None:
                asyncio.ensure_future(cached[1].close())
            self._channels[host_id] = (address, aio_channel(address, self.app.tls))
        return HostClient(host_pb2_grpc.HostAgentStub(self._channels[host_id][1]), host_id)

    async def refresh(self, host_id: str) -> None:
        cap = await self.client(host_id).GetCapacity(host_pb2.GetCapacityRequest(), timeout=15)
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, host_id)
            if row is None:
                return
            row.memory_mb_total = cap.memory_mb_total
            row.cpus = cap.cpus
            row.storage_gb_total = cap.storage_gb_total
            row.storage_gb_free = cap.storage_gb_free
            row.containers = cap.containers
            row.container_driver = cap.container_driver
            row.volume_driver = cap.volume_driver
            row.last_seen = _now()
            if row.state == HostState.DOWN:
                row.state = HostState.UP

    async def refresh_loop(self) -> None:
        while True:
            with self.app.sessions() as s:
                ids = list(s.scalars(select(models.Host.id)))
            for hid in ids:
                try:
                    await self.refresh(hid)
                except Exception as exc:  # noqa: BLE001 - one unreachable host must not stop the others
                    log.warning("host unreachable", extra={"host": hid, "error": str(exc)[:200]})
                    with self.app.sessions() as s, s.begin():
                        row = s.get(models.Host, hid)
                        if row is not None and row.state == HostState.UP:
                            row.state = HostState.DOWN
            await asyncio.sleep(self.app.settings.capacity_refresh_seconds)

    async def close(self) -> None:
        for _, ch in self._channels.values():
            await ch.close()


def place(s: Session, memory_mb: int, volume_gb: int) -> str:
    """The host with the most free memory that fits both the memory and the volume; RESOURCE_EXHAUSTED
    naming what ran out when none does. Drained and down hosts take nothing new."""
    hosts = s.scalars(select(models.Host).where(models.Host.state == HostState.UP)).all()
    if not hosts:
        raise ResourceExhausted("no container host is up to place the instance on", field="host")
    best: tuple[float, str] | None = None
    short_of = "memory"
    for h in hosts:
        used = allocated(s, models.Instance.host_id == h.id)
        free_mem = h.memory_mb_total * (h.memory_overcommit or 1.0) - used.memory_mb
        # storage_gb_free is what the filesystem reports; sparse volumes only take what they wrote, so the
        # allocated sizes count against the total instead (times the storage overcommit).
        free_disk = h.storage_gb_total * (h.storage_overcommit or 1.0) - used.volume_gb
        if free_mem < memory_mb:
            short_of = "memory"
            continue
        if free_disk < volume_gb:
            short_of = "storage"
            continue
        if best is None or free_mem > best[0]:
            best = (free_mem, h.id)
    if best is None:
        raise ResourceExhausted(f"no host has enough {short_of} for this instance "
                                f"({memory_mb} MB memory, {volume_gb} GB volume)",
                                field="instance.flavor" if short_of == "memory" else "instance.volume.size_gb")
    return best[1]

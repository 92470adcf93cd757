"""The control server's hands: one mTLS channel per hostd (the server's own certificate; the channel verifies
the peer is exactly `host/<id>`), capacity refresh, the CA's revocation list pushed to every host (hostd
refuses all calls without a current one), and the scheduler's placement over the hosts' reported
capacity."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Generic, TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.orm import Session

from reddwarf.common.clock import now as _now
from reddwarf.common.errors import FailedPrecondition, NotFound, ResourceExhausted, from_rpc_error
from reddwarf.common.states import HostState
from reddwarf.common.tls import aio_channel, host_peer
from reddwarf.v1 import host_pb2, host_pb2_grpc

from . import models
from .app import App
from .quotas import allocated

log = logging.getLogger("reddwarf.server.hosts")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class HostRpc(Generic[Req, Resp]):
    """One HostAgent method whose failures come back as domain errors (UNAVAILABLE → Unavailable: transient).
    With a pool, the host holds a current CRL before the call, and one pushed again if hostd says it has none
    (restarted with a wiped state dir), then the call is retried once."""

    def __init__(self, rpc: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], host_id: str,
                 pool: HostPool | None = None) -> None:
        self._rpc = rpc
        self.host_id = host_id
        self._pool = pool

    async def __call__(self, request: Req, timeout: float = 300) -> Resp:
        if self._pool is not None:
            await self._pool.ensure_crl(self.host_id)
        try:
            try:
                return await self._rpc(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc)
                if (self._pool is None or not isinstance(err, FailedPrecondition)
                        or not any(f == "crl" for f, _ in err.violations)):
                    raise
                await self._pool.ensure_crl(self.host_id, force=True)
                return await self._rpc(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None


class HostClient:
    """The HostAgent methods the server calls on one host."""

    def __init__(self, stub: host_pb2_grpc.HostAgentAsyncStub, host_id: str,
                 pool: HostPool | None = None) -> None:
        self.host_id = host_id
        self.GetCapacity = HostRpc(pool=pool, host_id=host_id, rpc=stub.GetCapacity)
        self.CreateVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.CreateVolume)
        self.ResizeVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.ResizeVolume)
        self.DeleteVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.DeleteVolume)
        self.AdoptVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.AdoptVolume)
        self.GetVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.GetVolume)
        self.ExportVolume = HostRpc(pool=pool, host_id=host_id, rpc=stub.ExportVolume)
        self.CreateContainer = HostRpc(pool=pool, host_id=host_id, rpc=stub.CreateContainer)
        self.GetContainer = HostRpc(pool=pool, host_id=host_id, rpc=stub.GetContainer)
        self.ListContainers = HostRpc(pool=pool, host_id=host_id, rpc=stub.ListContainers)
        self.ListVolumes = HostRpc(pool=pool, host_id=host_id, rpc=stub.ListVolumes)
        self.StartContainer = HostRpc(pool=pool, host_id=host_id, rpc=stub.StartContainer)
        self.StopContainer = HostRpc(pool=pool, host_id=host_id, rpc=stub.StopContainer)
        self.SetLimits = HostRpc(pool=pool, host_id=host_id, rpc=stub.SetLimits)
        self.DeleteContainer = HostRpc(pool=pool, host_id=host_id, rpc=stub.DeleteContainer)
        self.RequestCertificateRenewal = HostRpc(pool=pool, host_id=host_id, rpc=stub.RequestCertificateRenewal)
        self.InstallCertificate = HostRpc(pool=pool, host_id=host_id, rpc=stub.InstallCertificate)
        self.GetUsage = HostRpc(pool=pool, host_id=host_id, rpc=stub.GetUsage)
        self.ListUsage = HostRpc(pool=pool, host_id=host_id, rpc=stub.ListUsage)


class HostPool:
    def __init__(self, app: App) -> None:
        self.app = app
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        # host id -> (generation, PEM) of the CRL it last accepted from us. The generation counts the CA's
        # CRL writes (each one calls _on_crl), so the check before every hostd call is a comparison in memory,
        # not a read of crl.pem.
        self._crl_sent: dict[str, tuple[int, bytes]] = {}
        self._crl_generation = 0
        self._crl_changed: asyncio.Event | None = None
        # One push at a time per host, the list read inside: concurrent tasks (20 deletes, each revoking a
        # certificate) would otherwise push lists read at different moments, and an older one arriving after a
        # newer one is refused by hostd ("older than the held"), failing the task that pushed it.
        self._crl_locks: dict[str, asyncio.Lock] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        app.ca.crl_listeners.append(self._on_crl)

    def _on_crl(self) -> None:
        """A revocation (or a re-signed CRL), from any thread: wake the push loop."""
        self._crl_generation += 1
        loop, event = self._loop, self._crl_changed
        if loop is not None and event is not None and not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def ensure_crl(self, host_id: str, force: bool = False) -> None:
        """Pushes the CA's current CRL to a host that has not yet accepted this exact list from us."""
        sent = self._crl_sent.get(host_id)
        if not force and sent is not None and sent[0] == self._crl_generation:
            return
        async with self._crl_locks.setdefault(host_id, asyncio.Lock()):
            await self._push_crl(host_id, force)

    async def _push_crl(self, host_id: str, force: bool) -> None:
        sent = self._crl_sent.get(host_id)
        generation = self._crl_generation
        if not force and sent is not None and sent[0] == generation:
            return  # pushed by the call this one waited for
        crl = await asyncio.to_thread(self.app.ca.crl_pem)
        if not force and sent is not None and sent[1] == crl:
            self._crl_sent[host_id] = (generation, crl)
            return
        address, channel = self._channel(host_id)
        try:
            await host_pb2_grpc.HostAgentStub(channel).PushRevocations(
                host_pb2.PushRevocationsRequest(crl_pem=crl.decode()), timeout=15)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        self._crl_sent[host_id] = (generation, crl)

    async def crl_loop(self, every: float = 3600) -> None:
        """Pushes every new CRL to all hosts as soon as it is written, re-signs it before it expires, and
        renews host certificates that are due (each round, and at least hourly)."""
        self._loop = asyncio.get_running_loop()
        self._crl_changed = asyncio.Event()
        self._crl_changed.set()  # first round at once: re-sign a list that lapsed while we were down
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._crl_changed.wait(), timeout=every)
            self._crl_changed.clear()
            try:
                await asyncio.to_thread(self.app.ca.refresh_crl)
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("re-signing the CRL failed")
            with self.app.sessions() as s:
                ids = list(s.scalars(select(models.Host.id)))
            for hid in ids:
                try:
                    await self.ensure_crl(hid)
                except Exception as exc:  # noqa: BLE001 - an unreachable host gets it at its next call
                    log.warning("CRL push failed", extra={"host": hid, "error": str(exc)[:200]})
                    continue
                try:
                    await self.renew_certificate(hid)
                except Exception as exc:  # noqa: BLE001 - retried next round, long before it expires
                    log.warning("host certificate renewal failed", extra={"host": hid, "error": str(exc)[:200]})

    async def renew_certificate(self, host_id: str, force: bool = False) -> bool:
        """Renews a host's certificate when hostd says it is due: hostd makes the key, we sign its CSR for
        host/<the id we registered> (whatever the CSR says) and install the result. True if renewed."""
        client = self.client(host_id)
        due = await client.RequestCertificateRenewal(host_pb2.CertificateRenewalRequest(force=force), timeout=30)
        if not due.csr_pem:
            return False

        def sign() -> bytes:
            from .admin import record_certificate
            issued = self.app.ca.sign_csr(due.csr_pem.encode(), "host", host_id,
                                          days=self.app.settings.host_cert_days)
            with self.app.sessions() as s, s.begin():
                record_certificate(s, issued.cert_pem, issued.not_after)
            return issued.cert_pem
        cert = await asyncio.to_thread(sign)
        await client.InstallCertificate(host_pb2.InstallCertificateRequest(certificate_pem=cert.decode()), timeout=30)
        log.info("host certificate renewed", extra={"host": host_id})
        return True

    def _address(self, host_id: str) -> str:
        with self.app.sessions() as s:
            row = s.get(models.Host, host_id)
            if row is None:
                raise NotFound(f"host {host_id!r} is not registered", field="host")
            return row.address

    def _channel(self, host_id: str) -> tuple[str, grpc.aio.Channel]:
        address = self._address(host_id)
        cached = self._channels.get(host_id)
        if cached is None or cached[0] != address:
            if cached is not None:
                asyncio.ensure_future(cached[1].close())
            self._crl_sent.pop(host_id, None)  # a new host process: it gets the CRL before anything else
            self._channels[host_id] = (address, aio_channel(address, self.app.tls, peer=host_peer(host_id)))
        return self._channels[host_id]

    def stub(self, host_id: str) -> host_pb2_grpc.HostAgentAsyncStub:
        """The raw stub, for a streaming call (ProveBackup); HostClient wraps the unary ones."""
        return host_pb2_grpc.HostAgentStub(self._channel(host_id)[1])

    def client(self, host_id: str) -> HostClient:
        return HostClient(host_pb2_grpc.HostAgentStub(self._channel(host_id)[1]), host_id, self)

    async def refresh(self, host_id: str) -> None:
        cap = await self.client(host_id).GetCapacity(host_pb2.GetCapacityRequest(), timeout=15)
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, host_id)
            if row is None:
                return
            record_capacity(row, cap)

    async def refresh_loop(self) -> None:
        crl_task = asyncio.create_task(self.crl_loop(), name="crl_loop")
        try:
            await self._refresh_forever()
        finally:
            crl_task.cancel()
            with contextlib.suppress(BaseException):
                await crl_task

    async def _refresh_forever(self) -> None:
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

    async def list_usage(self, host_id: str) -> list[host_pb2.ContainerUsage]:
        """Every container's beancounters on that host (for server/metrics.py's poller)."""
        return list((await self.client(host_id).ListUsage(host_pb2.ListUsageRequest(), timeout=15)).usages)

    async def get_usage(self, host_id: str, container_id: str) -> host_pb2.ContainerUsage:
        return await self.client(host_id).GetUsage(host_pb2.ContainerRef(id=container_id), timeout=15)

    async def close(self) -> None:
        for _, ch in self._channels.values():
            await ch.close()


def _san_room(s: Session) -> dict[str, float]:
    """GiB each SAN node that is up can still give (its total times its overcommit, less its LUNs)."""
    nodes = s.scalars(select(models.Host).where(models.Host.state == HostState.UP,
                                                models.Host.mode == "storage")).all()
    return {h.id: h.storage_gb_total * (h.storage_overcommit or 1.0)
            - allocated(s, models.Instance.storage_host_id == h.id).volume_gb for h in nodes}


def place_storage(s: Session, volume_gb: int) -> str:
    """The SAN node with the most room for an iscsi volume; RESOURCE_EXHAUSTED when none has it."""
    room = _san_room(s)
    if not room:
        raise ResourceExhausted("no SAN node is up to hold the volume", field="storage_host")
    best = max(room, key=lambda k: (room[k], k))
    if room[best] < volume_gb:
        raise ResourceExhausted(f"no SAN node has room for a {volume_gb} GB volume",
                                field="instance.volume.size_gb")
    return best


def record_capacity(row: models.Host, cap: host_pb2.Capacity) -> None:
    """A capacity report from the host's hostd: it answered, so a DOWN host is UP again."""
    row.memory_mb_total = cap.memory_mb_total
    row.cpus = cap.cpus
    row.storage_gb_total = cap.storage_gb_total
    row.storage_gb_free = cap.storage_gb_free
    row.containers = cap.containers
    row.container_driver = cap.container_driver
    row.volume_driver = cap.volume_driver
    row.mode = cap.mode or "compute"
    row.initiator_iqn = cap.initiator_iqn
    row.iscsi_portal = cap.iscsi_portal
    row.last_seen = _now()
    if row.state == HostState.DOWN:  # a FENCED host stays so: only the host watch lets it rejoin
        row.state = HostState.UP


def place(s: Session, memory_mb: int, volume_gb: int) -> str:
    """The host with the most free memory that fits both the memory and the volume; RESOURCE_EXHAUSTED
    naming what ran out when none does. Drained and down hosts take nothing new; SAN nodes run no
    containers. A host with iscsi volumes keeps them on a SAN node, so the SAN nodes' room counts for it."""
    hosts = s.scalars(select(models.Host).where(models.Host.state == HostState.UP,
                                                models.Host.mode != "storage")).all()
    if not hosts:
        raise ResourceExhausted("no container host is up to place the instance on", field="host")
    best: tuple[float, str] | None = None
    short_of = "memory"
    san_room: dict[str, float] | None = None
    for h in hosts:
        used = allocated(s, models.Instance.host_id == h.id)
        free_mem = h.memory_mb_total * (h.memory_overcommit or 1.0) - used.memory_mb
        if h.volume_driver == "iscsi":
            san_room = _san_room(s) if san_room is None else san_room
            free_disk = max(san_room.values(), default=0.0)
        else:
            # storage_gb_free is what the filesystem reports; sparse volumes only take what they wrote, so
            # the allocated sizes count against the total instead (times the storage overcommit).
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

"""HostAgent over gRPC: the control server's hands on this host.

Only the control server may call (a certificate with role `server` from the deployment CA, not revoked in
the CA's signed CRL); everything else is PERMISSION_DENIED before any handler runs. Host operations are
blocking (lxc-*, mkfs, mount) and mutate one JSON state, so they run one at a time in a worker thread,
never on the event loop.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from reddwarf.common.errors import PermissionDenied, Unauthenticated, abort, grpc_edge
from reddwarf.common.tls import RevocationList, peer_identity
from reddwarf.common import states
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc

from .containers import Bootstrap, Limits
from .host import CapacityView, ContainerView, CreateContainer, Host, VolumeView

log = logging.getLogger("reddwarf.hostd.service")
T = TypeVar("T")

MODES = {host_pb2.NETWORK_MODE_UNSPECIFIED: "", host_pb2.NETWORK_MODE_HOST: "host",
         host_pb2.NETWORK_MODE_BRIDGE: "bridge"}


def limits_from_pb(pb: common_pb2.Limits) -> Limits:
    return Limits(memory_mb=pb.memory_mb, cpu_shares=pb.cpu_shares, max_processes=pb.max_processes,
                  swap_mb=pb.swap_mb, cpu_limit_millicores=pb.cpu_limit_millicores,
                  max_open_files=pb.max_open_files, io_weight=pb.io_weight, io_iops=pb.io_iops,
                  io_bytes_per_sec=pb.io_bytes_per_sec)


def limits_to_pb(lim: Limits) -> common_pb2.Limits:
    return common_pb2.Limits(memory_mb=lim.memory_mb, swap_mb=lim.swap_mb, cpu_shares=lim.cpu_shares,
                             cpu_limit_millicores=lim.cpu_limit_millicores, max_processes=lim.max_processes,
                             max_open_files=lim.max_open_files, io_weight=lim.io_weight, io_iops=lim.io_iops,
                             io_bytes_per_sec=lim.io_bytes_per_sec)


def container_pb(view: ContainerView, driver: str) -> host_pb2.Container:
    r = view.record
    return host_pb2.Container(
        id=r.id, limits=limits_to_pb(r.limits),
        network_mode=host_pb2.NETWORK_MODE_BRIDGE if r.network_mode == "bridge" else host_pb2.NETWORK_MODE_HOST,
        volume_id=r.volume_id, datadir=r.datadir, state=states.to_pb(states.ContainerState(view.status.state)), address=r.address,
        port=r.port, driver=driver, init_pid=view.status.init_pid, template=r.template)


def volume_pb(view: VolumeView) -> host_pb2.HostVolume:
    r, i = view.record, view.info
    return host_pb2.HostVolume(
        id=r.id, size_gb=r.size_gb, driver=r.driver,
        state=host_pb2.VOLUME_STATE_ATTACHED if r.attached_to else host_pb2.VOLUME_STATE_AVAILABLE,
        attached_to=r.attached_to, device=i.device, fs_bytes_total=i.fs_bytes_total,
        fs_bytes_used=i.fs_bytes_used, locator=r.locator)


def capacity_pb(c: CapacityView) -> host_pb2.Capacity:
    return host_pb2.Capacity(
        host_id=c.host_id, memory_mb_total=c.memory_mb_total, memory_mb_allocated=c.memory_mb_allocated,
        cpus=c.cpus, storage_gb_total=c.storage_gb_total, storage_gb_free=c.storage_gb_free,
        storage_gb_allocated=c.storage_gb_allocated, containers=c.containers,
        container_driver=c.container_driver, volume_driver=c.volume_driver, cgroup_version=c.cgroup_version)


class ServerOnly(grpc.aio.ServerInterceptor):
    """Refuses every caller but the control server (role `server`), and revoked certificates."""

    def __init__(self, revocations: RevocationList) -> None:
        self.revocations = revocations

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            ident = peer_identity(context)
            if ident is None:
                await abort(context, Unauthenticated("a certificate from the deployment CA is required"))
            elif self.revocations.is_revoked(ident.serial):
                await abort(context, Unauthenticated(f"certificate of {ident.uri} is revoked"))
            elif ident.role != "server":
                await abort(context, PermissionDenied(
                    f"only the control server may call hostd; {ident.uri} is a {ident.role}"))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, handler.request_deserializer,
                                                   handler.response_serializer)


class HostAgentServicer(host_pb2_grpc.HostAgentServicer):
    def __init__(self, host: Host) -> None:
        self.host = host
        self._lock = asyncio.Lock()

    async def run_locked(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._lock:  # one mutation at a time: the state file and lxc are not concurrent-safe
            return await asyncio.to_thread(functools.partial(fn, *args))

    @property
    def _driver(self) -> str:
        return self.host.containers.name

    @grpc_edge
    async def GetCapacity(self, request, context):  # type: ignore[no-untyped-def]
        return capacity_pb(await asyncio.to_thread(self.host.capacity))

    @grpc_edge
    async def CreateContainer(self, request, context):  # type: ignore[no-untyped-def]
        c = request.container
        b = c.bootstrap
        req = CreateContainer(
            id=c.id, limits=limits_from_pb(c.limits),
            bootstrap=Bootstrap(server_address=b.server_address, ca_pem=b.ca_pem,
                                enrollment_token=b.enrollment_token, instance_id=b.instance_id,
                                heartbeat_seconds=b.heartbeat_seconds, enroll_address=b.enroll_address),
            network_mode=MODES.get(c.network_mode, "invalid"), volume_id=c.volume_id, datadir=c.datadir,
            template=c.template)
        return container_pb(await self.run_locked(self.host.create_container, req), self._driver)

    @grpc_edge
    async def GetContainer(self, request, context):  # type: ignore[no-untyped-def]
        return container_pb(await asyncio.to_thread(self.host.get_container, request.id), self._driver)

    @grpc_edge
    async def ListContainers(self, request, context):  # type: ignore[no-untyped-def]
        views, unmanaged = await asyncio.to_thread(self.host.list_containers)
        return host_pb2.ListContainersResponse(containers=[container_pb(v, self._driver) for v in views],
                                               unmanaged=unmanaged)

    @grpc_edge
    async def StartContainer(self, request, context):  # type: ignore[no-untyped-def]
        return container_pb(await self.run_locked(self.host.start_container, request.id), self._driver)

    @grpc_edge
    async def StopContainer(self, request, context):  # type: ignore[no-untyped-def]
        return container_pb(await self.run_locked(self.host.stop_container, request.id, request.timeout_seconds),
                            self._driver)

    @grpc_edge
    async def DeleteContainer(self, request, context):  # type: ignore[no-untyped-def]
        await self.run_locked(self.host.delete_container, request.id)
        return empty_pb2.Empty()

    @grpc_edge
    async def SetLimits(self, request, context):  # type: ignore[no-untyped-def]
        return container_pb(await self.run_locked(self.host.set_limits, request.id, limits_from_pb(request.limits)),
                            self._driver)

    @grpc_edge
    async def GetUsage(self, request, context):  # type: ignore[no-untyped-def]
        u = await asyncio.to_thread(self.host.usage, request.id)
        return host_pb2.ContainerUsage(
            id=u.id, cpu_usage_ns=u.cpu_usage_ns, io_read_bytes=u.io_read_bytes, io_write_bytes=u.io_write_bytes,
            beancounters=[host_pb2.Beancounter(resource=b.resource, held=b.held, maxheld=b.maxheld,
                                               barrier=b.barrier, limit=b.limit, failcnt=b.failcnt)
                          for b in u.beancounters])

    @grpc_edge
    async def Exec(self, request, context):  # type: ignore[no-untyped-def]
        r = await asyncio.to_thread(self.host.exec, request.id, list(request.argv), request.timeout_seconds)
        return host_pb2.ExecResponse(exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr)

    @grpc_edge
    async def CreateVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await self.run_locked(self.host.create_volume, request.volume.id, request.volume.size_gb))

    @grpc_edge
    async def GetVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await asyncio.to_thread(self.host.get_volume, request.id))

    @grpc_edge
    async def ListVolumes(self, request, context):  # type: ignore[no-untyped-def]
        views, unmanaged = await asyncio.to_thread(self.host.list_volumes)
        return host_pb2.ListVolumesResponse(volumes=[volume_pb(v) for v in views], unmanaged=unmanaged)

    @grpc_edge
    async def ResizeVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await self.run_locked(self.host.resize_volume, request.id, request.size_gb))

    @grpc_edge
    async def AttachVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await self.run_locked(self.host.attach_volume, request.id, request.container_id,
                                         request.mount_path))

    @grpc_edge
    async def DetachVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await self.run_locked(self.host.detach_volume, request.id))

    @grpc_edge
    async def DeleteVolume(self, request, context):  # type: ignore[no-untyped-def]
        await self.run_locked(self.host.delete_volume, request.id, request.keep_data)
        return empty_pb2.Empty()

    @grpc_edge
    async def AdoptVolume(self, request, context):  # type: ignore[no-untyped-def]
        return volume_pb(await self.run_locked(self.host.adopt_volume, request.id, request.locator))

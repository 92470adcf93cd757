"""HostAgent over gRPC: the control server's hands on this host.

Only the control server may call (a certificate with role `server` from the deployment CA, not revoked in
the CA's signed CRL); everything else is PERMISSION_DENIED before any handler runs. hostd fails closed:
until it holds a current CRL (pushed by the server, PushRevocations) every other call is refused. Host operations are
blocking (lxc-*, mkfs, mount), so each runs in a worker thread, never on the event loop; operations on
different containers and volumes run at the same time (Host takes the locks each one needs).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable
from typing import IO, Any, TypeVar

import grpc
from google.protobuf import empty_pb2

from reddwarf.agent import sandbox
from reddwarf.common import states
from reddwarf.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    RedDwarfError,
    Unauthenticated,
    abort,
    grpc_edge,
)
from reddwarf.common.tls import RevocationList, peer_identity
from reddwarf.v1 import common_pb2, host_pb2, host_pb2_grpc

from . import locks, template
from .containers import Bootstrap, Limits, Usage
from .host import CapacityView, ContainerView, CreateContainer, Host, VolumeView
from .iscsi import Chap
from .renewal import CertificateRenewer

log = logging.getLogger("reddwarf.hostd.service")
T = TypeVar("T")
# What a servicer method is called with (as server/app.py's Context): the generated servicer base types each
# method's request and response; the context's own parameters only matter to streaming through it.
Context = grpc.aio.ServicerContext[Any, Any]

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
        volume_id=r.volume_id, datadir=r.datadir, address=r.address,
        state=states.to_pb(states.ContainerState(view.status.state)),
        port=r.port, driver=driver, init_pid=view.status.init_pid, template=r.template)


def volume_pb(view: VolumeView) -> host_pb2.HostVolume:
    r, i = view.record, view.info
    return host_pb2.HostVolume(
        id=r.id, size_gb=r.size_gb, driver=r.driver,
        state=host_pb2.VOLUME_STATE_ATTACHED if r.attached_to else host_pb2.VOLUME_STATE_AVAILABLE,
        attached_to=r.attached_to, device=i.device, fs_bytes_total=i.fs_bytes_total,
        fs_bytes_used=i.fs_bytes_used, locator=r.locator, initiator_iqn=r.initiator_iqn)


def capacity_pb(c: CapacityView) -> host_pb2.Capacity:
    return host_pb2.Capacity(
        host_id=c.host_id, memory_mb_total=c.memory_mb_total, memory_mb_allocated=c.memory_mb_allocated,
        cpus=c.cpus, storage_gb_total=c.storage_gb_total, storage_gb_free=c.storage_gb_free,
        storage_gb_allocated=c.storage_gb_allocated, containers=c.containers,
        container_driver=c.container_driver, volume_driver=c.volume_driver, cgroup_version=c.cgroup_version,
        mode=c.mode, initiator_iqn=c.initiator_iqn, iscsi_portal=c.iscsi_portal)


def chap_from_pb(request: host_pb2.AdoptVolumeRequest | host_pb2.ExportVolumeRequest) -> Chap | None:
    return Chap(request.chap.user, request.chap.secret) if request.HasField("chap") else None


def usage_pb(u: Usage) -> host_pb2.ContainerUsage:
    return host_pb2.ContainerUsage(
        id=u.id, cpu_usage_ns=u.cpu_usage_ns, io_read_bytes=u.io_read_bytes, io_write_bytes=u.io_write_bytes,
        beancounters=[host_pb2.Beancounter(resource=b.resource, held=b.held, maxheld=b.maxheld,
                                           barrier=b.barrier, limit=b.limit, failcnt=b.failcnt)
                      for b in u.beancounters])


PUSH_REVOCATIONS = "/reddwarf.v1.HostAgent/PushRevocations"
PROVE_TIMEOUT = 6 * 3600
_PROVE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
_PROVE_SHA = re.compile(r"[0-9a-f]{64}\Z")


def _check_prove_spec(spec: host_pb2.ProveBackupSpec) -> None:
    if not 1 <= len(spec.backup_ids) <= 1000 or len(spec.sha256s) != len(spec.backup_ids):
        raise InvalidArgument("1..1000 backup ids, one sha256 each", field="spec.backup_ids")
    if not all(_PROVE_ID.match(b) for b in spec.backup_ids) or not all(_PROVE_SHA.match(x) for x in spec.sha256s):
        raise InvalidArgument("malformed backup id or sha256", field="spec")
    if spec.max_extract_bytes < 0:
        raise InvalidArgument("max_extract_bytes must not be negative", field="spec.max_extract_bytes")


class ServerOnly(grpc.aio.ServerInterceptor):
    """Refuses every caller but the control server (role `server`), revoked certificates, and everything
    while no current CRL is held, except a server pushing one (the list is CA-signed: it proves itself)."""

    def __init__(self, revocations: RevocationList) -> None:
        self.revocations = revocations

    async def intercept_service(self, continuation: Callable[..., Any], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return handler
        pushing = details.method == PUSH_REVOCATIONS

        async def admitted(context: Context) -> bool:
            ident = peer_identity(context)
            if ident is None:
                await abort(context, Unauthenticated("a certificate from the deployment CA is required"))
                return False
            try:
                if not (pushing and self.revocations.current() is None):
                    self.revocations.check(ident)
            except RedDwarfError as err:
                await abort(context, err)
                return False
            if ident.role != "server":
                await abort(context, PermissionDenied(
                    f"only the control server may call hostd; {ident.uri} is a {ident.role}"))
                return False
            return True

        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def guarded(request: Any, context: Context) -> Any:
                return await unary(request, context) if await admitted(context) else None

            return grpc.unary_unary_rpc_method_handler(guarded, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.stream_unary is not None:  # ProveBackup: the same gate before a byte is read
            streamed = handler.stream_unary

            async def guarded_stream(requests: Any, context: Context) -> Any:
                return await streamed(requests, context) if await admitted(context) else None

            return grpc.stream_unary_rpc_method_handler(guarded_stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler  # grpc.health's Watch (unary-stream), as before: it says only SERVING


class HostAgentServicer(host_pb2_grpc.HostAgentServicer):
    def __init__(self, host: Host, revocations: RevocationList | None = None,
                 renewer: CertificateRenewer | None = None) -> None:
        # What a killed hostd left of a proof restore: the sandbox killed, the staged tenant data removed.
        scratch = os.path.join(host.settings.state_dir, "scratch")
        sandbox.clear(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        self.host = host
        self.revocations = revocations
        self.renewer = renewer

    def _renewer(self) -> CertificateRenewer:
        if self.renewer is None:
            raise FailedPrecondition("this hostd does not renew its certificate", field="certificate_pem")
        return self.renewer

    @grpc_edge
    async def RequestCertificateRenewal(self, request: host_pb2.CertificateRenewalRequest,
                                        context: Context) -> host_pb2.CertificateRenewalResponse:
        not_after, csr = await asyncio.to_thread(self._renewer().request, request.force)
        return host_pb2.CertificateRenewalResponse(not_after_unix=int(not_after.timestamp()), csr_pem=csr.decode())

    @grpc_edge
    async def InstallCertificate(self, request: host_pb2.InstallCertificateRequest,
                                 context: Context) -> host_pb2.InstallCertificateResponse:
        not_after = await asyncio.to_thread(self._renewer().install, request.certificate_pem.encode())
        log.info("renewed certificate installed", extra={"not_after": not_after.isoformat()})
        return host_pb2.InstallCertificateResponse(not_after_unix=int(not_after.timestamp()))

    @grpc_edge
    async def PushRevocations(self, request: host_pb2.PushRevocationsRequest,
                              context: Context) -> host_pb2.PushRevocationsResponse:
        if self.revocations is None:
            raise FailedPrecondition("this hostd keeps no revocation list", field="crl")
        crl = await asyncio.to_thread(self.revocations.install, request.crl_pem.encode())
        log.info("revocation list installed", extra={"crl_number": crl.number, "revoked": len(crl.serials)})
        return host_pb2.PushRevocationsResponse(crl_number=crl.number, revoked=len(crl.serials))

    async def run_op(self, fn: Callable[..., T], *args: Any) -> T:
        """A mutation in a worker thread, logged with its time (bench/provision_breakdown.py reads the line)."""
        waited = [0.0]

        def timed() -> T:
            locks.take_waited()
            try:
                return fn(*args)
            finally:
                waited[0] = locks.take_waited()

        began = time.monotonic()
        try:
            return await asyncio.to_thread(timed)
        finally:
            ran = time.monotonic() - began - waited[0]
            log.info("host operation", extra={"op": getattr(fn, "__name__", "?"), "waited_ms": int(waited[0] * 1000),
                                              "ran_ms": int(ran * 1000)})

    @property
    def _driver(self) -> str:
        return self.host.containers.name

    @grpc_edge
    async def GetCapacity(self, request: host_pb2.GetCapacityRequest,
                          context: Context) -> host_pb2.Capacity:
        return capacity_pb(await asyncio.to_thread(self.host.capacity))

    @grpc_edge
    async def CreateContainer(self, request: host_pb2.CreateContainerRequest,
                              context: Context) -> host_pb2.Container:
        c = request.container
        b = c.bootstrap
        req = CreateContainer(
            id=c.id, limits=limits_from_pb(c.limits),
            bootstrap=Bootstrap(server_address=b.server_address, ca_pem=b.ca_pem,
                                enrollment_token=b.enrollment_token, instance_id=b.instance_id,
                                heartbeat_seconds=b.heartbeat_seconds, enroll_address=b.enroll_address),
            network_mode=MODES.get(c.network_mode, "invalid"), volume_id=c.volume_id, datadir=c.datadir,
            template=c.template)
        out = container_pb(await self.run_op(self.host.create_container, req), self._driver)
        if self._driver == "lxc":
            with contextlib.suppress(OSError):  # reported when readable; a create never fails for it
                out.package_versions.update(await asyncio.to_thread(
                    template.package_versions, self.host.settings, out.template))
        return out

    @grpc_edge
    async def GetContainer(self, request: host_pb2.ContainerRef,
                           context: Context) -> host_pb2.Container:
        return container_pb(await asyncio.to_thread(self.host.get_container, request.id), self._driver)

    @grpc_edge
    async def ListContainers(self, request: host_pb2.ListContainersRequest,
                             context: Context) -> host_pb2.ListContainersResponse:
        views, unmanaged = await asyncio.to_thread(self.host.list_containers)
        return host_pb2.ListContainersResponse(containers=[container_pb(v, self._driver) for v in views],
                                               unmanaged=unmanaged)

    @grpc_edge
    async def StartContainer(self, request: host_pb2.ContainerRef,
                             context: Context) -> host_pb2.Container:
        return container_pb(await self.run_op(self.host.start_container, request.id), self._driver)

    @grpc_edge
    async def StopContainer(self, request: host_pb2.StopContainerRequest,
                            context: Context) -> host_pb2.Container:
        return container_pb(await self.run_op(self.host.stop_container, request.id, request.timeout_seconds),
                            self._driver)

    @grpc_edge
    async def DeleteContainer(self, request: host_pb2.ContainerRef,
                              context: Context) -> empty_pb2.Empty:
        await self.run_op(self.host.delete_container, request.id)
        return empty_pb2.Empty()

    @grpc_edge
    async def SetLimits(self, request: host_pb2.SetLimitsRequest,
                        context: Context) -> host_pb2.Container:
        return container_pb(await self.run_op(self.host.set_limits, request.id, limits_from_pb(request.limits)),
                            self._driver)

    @grpc_edge
    async def GetUsage(self, request: host_pb2.ContainerRef,
                       context: Context) -> host_pb2.ContainerUsage:
        return usage_pb(await asyncio.to_thread(self.host.usage, request.id))

    @grpc_edge
    async def ListUsage(self, request: host_pb2.ListUsageRequest,
                        context: Context) -> host_pb2.ListUsageResponse:
        return host_pb2.ListUsageResponse(usages=[usage_pb(u) for u in await asyncio.to_thread(self.host.all_usage)])

    @grpc_edge
    async def Exec(self, request: host_pb2.ExecRequest,
                   context: Context) -> host_pb2.ExecResponse:
        r = await asyncio.to_thread(self.host.exec, request.id, list(request.argv), request.timeout_seconds)
        return host_pb2.ExecResponse(exit_code=r.exit_code, stdout=r.stdout, stderr=r.stderr)

    @grpc_edge
    async def ProveBackup(self, request_iterator: AsyncIterator[host_pb2.ProveBackupChunk],
                          context: grpc.aio.ServicerContext[host_pb2.ProveBackupChunk, host_pb2.ProveBackupResponse]
                          ) -> host_pb2.ProveBackupResponse:
        """Stages the streamed chain and restores it in the throw-away sandbox (reddwarf.agent.sandbox) with
        this host's keys, containers and volumes hidden; the stage is removed whatever happens."""
        st = self.host.settings
        parent = os.path.join(st.state_dir, "scratch")
        stage = await asyncio.to_thread(sandbox.new_stage, parent)
        out: IO[bytes] | None = None
        try:
            spec: host_pb2.ProveBackupSpec | None = None
            link = -1
            async for chunk in request_iterator:
                if spec is None:
                    if not chunk.HasField("spec"):
                        raise InvalidArgument("the first message must carry the spec", field="spec")
                    spec = chunk.spec
                    _check_prove_spec(spec)
                    continue
                if not link <= chunk.link < len(spec.backup_ids):
                    raise InvalidArgument("links must come in order, each within the chain", field="link")
                if chunk.link != link:
                    if out is not None:
                        out.close()
                    link = chunk.link
                    out = open(sandbox.input_path(stage, link), "xb")  # noqa: SIM115 - closed on the next link
                assert out is not None
                await asyncio.to_thread(out.write, chunk.data)
            if out is not None:
                out.close()
                out = None
            if spec is None or link != len(spec.backup_ids) - 1:
                raise InvalidArgument("the stream ended before every link of the chain", field="link")
            hide = [st.state_dir, st.cert_path, st.key_path, st.ca_path, st.crl_path, st.lxc_path,
                    st.template_lxc_path, st.storage_path, st.wheelhouse]
            res = await sandbox.prove(stage, list(spec.backup_ids), list(spec.sha256s),
                                      dict(spec.expected) if spec.compare else None, spec.max_extract_bytes,
                                      hide, timeout=PROVE_TIMEOUT,
                                      limits=sandbox.Limits(st.proof_memory_mb, st.proof_cpu_shares,
                                                            st.proof_cpu_quota_pct, st.proof_pids))
            log.info("backup proof done", extra={"backup": spec.backup_ids[-1], "ok": res["ok"]})
            return host_pb2.ProveBackupResponse(ok=res["ok"], detail=res["detail"], checksums=res["checksums"])
        finally:
            if out is not None:
                out.close()
            await asyncio.to_thread(shutil.rmtree, stage, True)

    @grpc_edge
    async def CreateVolume(self, request: host_pb2.CreateVolumeRequest,
                           context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.create_volume, request.volume.id, request.volume.size_gb))

    @grpc_edge
    async def GetVolume(self, request: host_pb2.VolumeRef,
                        context: Context) -> host_pb2.HostVolume:
        return volume_pb(await asyncio.to_thread(self.host.get_volume, request.id))

    @grpc_edge
    async def ListVolumes(self, request: host_pb2.ListVolumesRequest,
                          context: Context) -> host_pb2.ListVolumesResponse:
        views, unmanaged = await asyncio.to_thread(self.host.list_volumes)
        return host_pb2.ListVolumesResponse(volumes=[volume_pb(v) for v in views], unmanaged=unmanaged)

    @grpc_edge
    async def ResizeVolume(self, request: host_pb2.ResizeVolumeHostRequest,
                           context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.resize_volume, request.id, request.size_gb))

    @grpc_edge
    async def AttachVolume(self, request: host_pb2.AttachVolumeRequest,
                           context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.attach_volume, request.id, request.container_id,
                                         request.mount_path))

    @grpc_edge
    async def DetachVolume(self, request: host_pb2.DetachVolumeRequest,
                           context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.detach_volume, request.id))

    @grpc_edge
    async def DeleteVolume(self, request: host_pb2.DeleteVolumeRequest,
                           context: Context) -> empty_pb2.Empty:
        await self.run_op(self.host.delete_volume, request.id, request.keep_data)
        return empty_pb2.Empty()

    @grpc_edge
    async def AdoptVolume(self, request: host_pb2.AdoptVolumeRequest,
                          context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.adopt_volume, request.id, request.locator,
                                               chap_from_pb(request), request.only_if_tracked))

    @grpc_edge
    async def ExportVolume(self, request: host_pb2.ExportVolumeRequest,
                           context: Context) -> host_pb2.HostVolume:
        return volume_pb(await self.run_op(self.host.export_volume, request.id, request.initiator_iqn,
                                               chap_from_pb(request)))

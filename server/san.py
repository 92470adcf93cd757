"""An instance's data volume when its host uses the iscsi volume driver: a LUN on a SAN node (hostd in storage
mode) that admits exactly that host. The server picks the SAN node, makes the volume's CHAP account and holds
it (sealed on the instance row), and hands it to both ends: ExportVolume on the SAN node (this host's
initiator only), AdoptVolume on the compute host (log in, mount). Each call is idempotent by the instance id,
so a step replayed after a crash repeats them harmlessly.

A compute host that lost its sessions (it rebooted: the initiator's sessions went with it, and hostd keeps no
CHAP secret) gets each of its iscsi volumes attached again by `reattach_loop`, with the same account; the SAN
node's ACL still decides, so a fenced host stays refused.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass

from sqlalchemy import select

from reddwarf.common.errors import FailedPrecondition, NotFound, RedDwarfError, Unavailable
from reddwarf.common.states import HostState, TaskState
from reddwarf.v1 import host_pb2

from . import models
from .app import App
from .db import update_row
from .hosts import HostClient, HostPool, place_storage
from .sealing import PasswordSealer

log = logging.getLogger("reddwarf.server.san")
ISCSI = "iscsi"


@dataclass(frozen=True)
class SanPlacement:
    storage_host_id: str
    chap: host_pb2.ChapCredentials


@dataclass(eq=False)
class SanVolumes:
    app: App
    hosts: HostPool
    sealer: PasswordSealer

    def _detached(self, iid: str) -> models.Instance:
        with self.app.sessions() as s:
            row = s.get(models.Instance, iid)
            if row is None:
                raise NotFound(f"instance {iid} vanished", field="instance")
            s.expunge(row)
            return row

    def host_uses_iscsi(self, host_id: str) -> bool:
        with self.app.sessions() as s:
            h = s.get(models.Host, host_id)
            return h is not None and h.volume_driver == ISCSI and h.mode != "storage"

    def _initiator(self, host_id: str) -> str:
        with self.app.sessions() as s:
            h = s.get(models.Host, host_id)
            if h is None or not h.initiator_iqn:
                raise FailedPrecondition(f"host {host_id} has not reported an iSCSI initiator name", field="host")
            return h.initiator_iqn

    def _placement(self, iid: str, volume_gb: int) -> SanPlacement:
        """The SAN node and CHAP account of this volume, chosen once and kept on the row (a replay reuses
        them: the secret the SAN node already holds)."""
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Instance, iid)
            if row is None:
                raise NotFound(f"instance {iid} vanished", field="instance")
            if not row.storage_host_id:
                row.storage_host_id = place_storage(s, volume_gb)
                row.volume_driver = ISCSI
                row.volume_chap = self.sealer.seal(secrets.token_urlsafe(18))
            user = f"rd-{iid[:24]}"
            return SanPlacement(row.storage_host_id, host_pb2.ChapCredentials(
                user=user, secret=self.sealer.unseal(row.volume_chap)))

    async def _san_call(self, storage_host_id: str, call: str, request: object, timeout: float = 300) -> object:
        """A call to the SAN node; its being down is UNAVAILABLE naming it."""
        client = self.hosts.client(storage_host_id)
        try:
            return await getattr(client, call)(request, timeout=timeout)
        except Unavailable as exc:
            raise Unavailable(f"SAN node {storage_host_id} is unavailable: {exc.message}",
                              field="storage_host") from None

    async def _adopt(self, host: HostClient, storage_host_id: str, iid: str, locator: str,
                     chap: host_pb2.ChapCredentials, only_if_tracked: bool = False) -> host_pb2.HostVolume:
        try:
            return await host.AdoptVolume(host_pb2.AdoptVolumeRequest(
                id=iid, locator=locator, chap=chap, only_if_tracked=only_if_tracked), timeout=300)
        except Unavailable as exc:
            if any(f == "locator" for f, _ in exc.violations):  # hostd reached, the SAN node not
                raise Unavailable(f"SAN node {storage_host_id} is unavailable to host {host.host_id}: "
                                  f"{exc.message}", field="storage_host") from None
            raise

    async def create(self, iid: str) -> None:
        """create_volume for an iscsi host: LUN on a SAN node, admitted to this host only, attached here."""
        row = self._detached(iid)
        assert row.host_id
        place = await asyncio.to_thread(self._placement, iid, row.volume_size_gb)
        initiator = await asyncio.to_thread(self._initiator, row.host_id)
        vol = await self._san_call(place.storage_host_id, "CreateVolume", host_pb2.CreateVolumeRequest(
            volume=host_pb2.HostVolume(id=iid, size_gb=row.volume_size_gb)))
        assert isinstance(vol, host_pb2.HostVolume)
        update_row(self.app.sessions, models.Instance, iid, volume_locator=vol.locator)
        await self._san_call(place.storage_host_id, "ExportVolume", host_pb2.ExportVolumeRequest(
            id=iid, initiator_iqn=initiator, chap=place.chap), timeout=60)
        await self._adopt(self.hosts.client(row.host_id), place.storage_host_id, iid, vol.locator, place.chap)
        log.info("san volume attached", extra={"instance": iid, "host": row.host_id,
                                               "storage_host": place.storage_host_id})

    async def delete(self, iid: str) -> None:
        """The compute host lets go (keeping the data), then the SAN node deletes the LUN and its file."""
        row = self._detached(iid)
        if row.host_id:
            with contextlib.suppress(NotFound):  # already gone: a replayed step
                await self.hosts.client(row.host_id).DeleteVolume(
                    host_pb2.DeleteVolumeRequest(id=iid, keep_data=True))
        if row.storage_host_id:
            with contextlib.suppress(NotFound):
                await self._san_call(row.storage_host_id, "DeleteVolume", host_pb2.DeleteVolumeRequest(id=iid))

    async def resize(self, iid: str, size_gb: int) -> None:
        """The SAN node grows the file and the LUN, then the compute host its session and filesystem."""
        row = self._detached(iid)
        assert row.host_id and row.storage_host_id
        await self._san_call(row.storage_host_id, "ResizeVolume",
                             host_pb2.ResizeVolumeHostRequest(id=iid, size_gb=size_gb), timeout=900)
        await self.hosts.client(row.host_id).ResizeVolume(
            host_pb2.ResizeVolumeHostRequest(id=iid, size_gb=size_gb), timeout=900)

    def _attached_here(self) -> list[tuple[str, str, str, str]]:
        """(instance, compute host, SAN node, locator) of every live iscsi volume on a host that is up, but
        for instances a task is working on (a create, delete or move attaches and detaches on its own)."""
        with self.app.sessions() as s:
            busy = set(s.scalars(select(models.Task.resource).where(
                models.Task.state.in_((TaskState.PENDING, TaskState.RUNNING)),
                models.Task.resource.like("instances/%"))))
            rows = s.execute(
                select(models.Instance.id, models.Instance.host_id, models.Instance.storage_host_id,
                       models.Instance.volume_locator)
                .join(models.Host, models.Host.id == models.Instance.host_id)
                .where(models.Instance.deleted_at.is_(None), models.Instance.storage_host_id.is_not(None),
                       models.Instance.volume_locator != "", models.Host.state == HostState.UP)).all()
        return [(r[0], r[1] or "", r[2] or "", r[3]) for r in rows if f"instances/{r[0]}" not in busy]

    async def reattach(self) -> list[str]:
        """Attaches again every iscsi volume whose compute host reports no device for it; returns their ids."""
        done = []
        for iid, host_id, storage_host_id, locator in await asyncio.to_thread(self._attached_here):
            host = self.hosts.client(host_id)
            try:
                vol = await host.GetVolume(host_pb2.VolumeRef(id=iid), timeout=30)
                if vol.device:
                    continue
                place = await asyncio.to_thread(self._placement, iid, 0)
                # only_if_tracked: a delete or a move that let go of it meanwhile wins (hostd's lock orders them)
                await self._adopt(host, storage_host_id, iid, locator, place.chap, only_if_tracked=True)
            except RedDwarfError as exc:  # NotFound: not attached there yet (a create, a move in flight)
                if not isinstance(exc, NotFound):
                    log.warning("iscsi reattach failed", extra={"instance": iid, "host": host_id,
                                                                "error": exc.message[:200]})
                continue
            log.info("iscsi volume attached again", extra={"instance": iid, "host": host_id})
            done.append(iid)
        return done

    async def reattach_loop(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.reattach()
            except Exception:  # noqa: BLE001 - the loop outlives any one failure
                log.exception("iscsi reattach pass failed")

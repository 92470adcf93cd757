"""The host watch: every compute host's hostd is asked for its capacity each host_check_seconds. One that
answers is UP (its capacity recorded); one that does not is DOWN, and one silent for host_lost_seconds is
lost: an evacuate_host task fences it (certificate revoked, initiator out of every LUN ACL) before anything
else, then evacuates its instances (server/migration.py). An operator can do the same at once with
Admin.EvacuateHost.

A host back from DOWN (or first seen by this server) is told to drop containers and volumes of instances that
live elsewhere now (a move it died in the middle of), as the server knows them; see forget_strays.

A fenced host that answers again (it was cut off, not dead) is taken back once its evacuation has ended:
containers and volumes of instances that now live elsewhere are removed there, the volumes without touching
their data (keep_data: they are LUNs the new host uses), it gets a new certificate, and it is UP again.
SAN nodes are not watched here: their LUNs have nowhere else to be; the capacity refresh marks them DOWN.
"""
from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass, field

from sqlalchemy import select

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import NotFound
from reddwarf.common.states import HostState
from reddwarf.v1 import host_pb2

from . import models, tasks
from .app import App
from .hosts import HostPool, record_capacity
from .migration import submit_evacuation

log = logging.getLogger("reddwarf.server.host_watch")
PROBE_TIMEOUT = 10.0


@dataclass(eq=False)
class HostWatch:
    app: App
    hosts: HostPool
    engine: tasks.TaskEngine | None = None
    # Silence is counted from when this watch began at the latest: a server that was down itself for a while
    # has old last_seen times that say nothing about the hosts.
    started: dt.datetime | None = None
    # Hosts whose strays this server has looked for since it started.
    _checked: set[str] = field(default_factory=set, init=False)

    def _hosts(self) -> list[tuple[str, str, str]]:
        with self.app.sessions() as s:
            return [(h.id, h.state, h.mode) for h in s.scalars(select(models.Host).order_by(models.Host.id))]

    async def check(self) -> None:
        """One round over every host."""
        for hid, state, mode in await asyncio.to_thread(self._hosts):
            if mode == "storage":
                continue  # never evacuated (its LUNs have nowhere else to be); the capacity refresh marks it DOWN
            try:
                cap = await self.hosts.client(hid).GetCapacity(host_pb2.GetCapacityRequest(),
                                                               timeout=min(PROBE_TIMEOUT, 1 + self.app.settings.host_check_seconds))
            except Exception as exc:  # noqa: BLE001 - silence is what we are looking for
                await asyncio.to_thread(self._silent, hid, mode, str(exc)[:200])
                continue
            await asyncio.to_thread(self._answered, hid, cap)
            if state == HostState.FENCED:
                try:
                    await self.rejoin(hid)
                except Exception as exc:  # noqa: BLE001 - tried again next round
                    log.warning("fenced host could not rejoin yet", extra={"host": hid, "error": str(exc)[:200]})
            elif state == HostState.DOWN or hid not in self._checked:
                # Back from an outage (or first seen by this server): what it still runs of instances that
                # live elsewhere now (a move it died in the middle of) goes.
                try:
                    await self.forget_strays(hid)
                    self._checked.add(hid)
                except Exception as exc:  # noqa: BLE001 - tried again next round while not checked
                    log.warning("returning host's strays not removed yet",
                                extra={"host": hid, "error": str(exc)[:200]})

    def _answered(self, hid: str, cap: host_pb2.Capacity) -> None:
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, hid)
            if row is not None:
                record_capacity(row, cap)

    def _silent(self, hid: str, mode: str, error: str) -> None:
        st = self.app.settings
        submitted = False
        with self.app.sessions() as s, s.begin():
            row = s.get(models.Host, hid)
            if row is None or row.state == HostState.FENCED:
                return
            since = max(row.last_seen, self.started) if row.last_seen and self.started else row.last_seen
            silent_for = (utcnow() - since).total_seconds() if since else 0.0
            # One missed probe on a busy machine is not an outage: DOWN (nothing new placed there) after two.
            if row.state != HostState.DOWN and silent_for >= 2 * st.host_check_seconds:
                log.warning("host silent: DOWN", extra={"host": hid, "error": error})
                row.state = HostState.DOWN
            if (st.host_evacuate_automatically and st.host_lost_seconds > 0
                    and silent_for >= st.host_lost_seconds):
                submit_evacuation(s, hid, f"silent for {int(silent_for)} s, past host_lost_seconds="
                                          f"{st.host_lost_seconds:g}")
                submitted = True
        if submitted:
            log.warning("host lost: fencing and evacuating", extra={"host": hid})
            if self.engine is not None:
                self.engine.wake()

    async def forget_strays(self, hid: str) -> None:
        """The server tells a host that answers again what it should no longer run: containers and volumes of
        instances that live on another host now, or are deleted. An instance with a task under way is left to
        that task (a move to this host may be attaching it right now), and ids the server does not know are
        not its to judge. Volumes go with keep_data: their LUNs are the new host's."""
        client = self.hosts.client(hid)
        listed = await client.ListContainers(host_pb2.ListContainersRequest(), timeout=30)
        volumes = await client.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30)
        ids = {c.id for c in listed.containers} | {v.id for v in volumes.volumes}

        def strays() -> set[str]:
            out = set()
            with self.app.sessions() as s:
                for iid in ids:
                    row = s.get(models.Instance, iid)
                    # Only what the server knows lives elsewhere (or is deleted): an instance that lost its
                    # host (a failed create) is its delete's to clean up.
                    if row is None or not (row.deleted_at is not None or (row.host_id and row.host_id != hid)):
                        continue
                    if tasks.active_task_for(s, f"instances/{iid}") is not None:
                        continue
                    out.add(iid)
            return out
        gone = await asyncio.to_thread(strays)
        for c in listed.containers:
            if c.id in gone:
                with contextlib.suppress(NotFound):
                    await client.DeleteContainer(host_pb2.ContainerRef(id=c.id), timeout=300)
                log.warning("stray container removed from a returning host", extra={"host": hid, "instance": c.id})
        for v in volumes.volumes:
            if v.id in gone:
                with contextlib.suppress(NotFound):
                    await client.DeleteVolume(host_pb2.DeleteVolumeRequest(id=v.id, keep_data=True), timeout=120)
                log.warning("stray volume let go on a returning host", extra={"host": hid, "instance": v.id})

    async def rejoin(self, hid: str) -> None:
        """A fenced host answers again: once its evacuation has ended, it gives up what lives elsewhere now,
        gets a new certificate and is UP."""
        def busy() -> bool:
            with self.app.sessions() as s:
                return tasks.active_task_for(s, f"hosts/{hid}") is not None
        if await asyncio.to_thread(busy):
            return
        client = self.hosts.client(hid)

        def mine() -> set[str]:
            with self.app.sessions() as s:
                return set(s.scalars(select(models.Instance.id).where(models.Instance.host_id == hid,
                                                                      models.Instance.deleted_at.is_(None))))
        ours = await asyncio.to_thread(mine)
        listed = await client.ListContainers(host_pb2.ListContainersRequest(), timeout=30)
        for c in listed.containers:
            if c.id not in ours:
                with contextlib.suppress(NotFound):
                    await client.DeleteContainer(host_pb2.ContainerRef(id=c.id), timeout=300)
                log.info("container of an instance that moved removed", extra={"host": hid, "instance": c.id})
        for v in (await client.ListVolumes(host_pb2.ListVolumesRequest(), timeout=30)).volumes:
            if v.id not in ours:
                with contextlib.suppress(NotFound):  # forgotten here; the LUN and its data stay
                    await client.DeleteVolume(host_pb2.DeleteVolumeRequest(id=v.id, keep_data=True), timeout=120)
        await self.hosts.renew_certificate(hid, force=True)

        def up() -> None:
            with self.app.sessions() as s, s.begin():
                row = s.get(models.Host, hid)
                if row is not None and row.state == HostState.FENCED:
                    row.state = HostState.UP
        await asyncio.to_thread(up)
        log.warning("fenced host rejoined", extra={"host": hid, "removed": len(listed.containers) - len(ours)})

    async def run(self) -> None:
        every = self.app.settings.host_check_seconds
        self.started = utcnow()
        while True:
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - the watch outlives any one failure
                log.exception("host watch round failed")
            await asyncio.sleep(every)

"""The host: hostd's operations over its drivers and its durable state, free of gRPC.

Every operation is idempotent by id: repeating a create with the same parameters returns what exists, the
same id with other parameters is AlreadyExists, deleting what is absent is NotFound. Inputs are validated
before anything changes.

Safe to call from many threads at once (the service runs each call in a worker thread): an operation holds
the locks of the container and volume it touches (locks.py), so creates of different instances run their
mkfs, lxc-copy and lxc-start side by side, while two calls on one container or volume run one after the
other. What instances share is picked under one short allocation lock: a container's mysqld port or bridge
address is chosen and its intent record written (which reserves it) before the slow driver work starts
outside that lock.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from typing import TypeVar

from reddwarf.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

from . import network
from . import template as templates
from .cgroups import CgroupLayout
from .containers import (
    Bootstrap,
    ContainerDriver,
    ContainerSpec,
    ContainerStatus,
    ExecResult,
    Limits,
    NetworkPlan,
    Usage,
    VolumeMount,
    validate_id,
)
from .iscsi import Chap, Locator, validate_chap, validate_iqn
from .iscsi_volumes import IscsiVolumeDriver
from .locks import NamedLocks, container_key, volume_key
from .loop import OnlineResizeDenied, device_numbers
from .san import SanTargetDriver
from .settings import Settings
from .state import ContainerRecord, HostState, Record, VolumeRecord
from .volumes import GIB, VolumeDriver, VolumeInfo

log = logging.getLogger("reddwarf.hostd.host")

DEFAULT_DATADIR = "/var/lib/mysql"
MAX_VOLUME_GB = 16 * 1024
REVIVE_MAX_DELAY = 60.0
R = TypeVar("R", bound=Record)


@dataclass(frozen=True)
class CreateContainer:
    id: str
    limits: Limits
    bootstrap: Bootstrap
    network_mode: str = "host"
    volume_id: str = ""
    datadir: str = ""
    template: str = ""

    def fingerprint(self) -> str:
        data = asdict(self)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ContainerView:
    record: ContainerRecord
    status: ContainerStatus


@dataclass(frozen=True)
class VolumeView:
    record: VolumeRecord
    info: VolumeInfo


@dataclass(frozen=True)
class CapacityView:
    host_id: str
    memory_mb_total: int
    memory_mb_allocated: int
    cpus: int
    storage_gb_total: int
    storage_gb_free: int
    storage_gb_allocated: int
    containers: int
    container_driver: str
    volume_driver: str
    cgroup_version: str
    mode: str = "compute"
    initiator_iqn: str = ""
    iscsi_portal: str = ""


def _validate_path(value: str, field: str) -> str:
    if not value.startswith("/") or posixpath.normpath(value) != value or value == "/" or "\n" in value \
            or " " in value:
        raise InvalidArgument(f"{field} must be an absolute, normalised path without spaces, got {value!r}",
                              field=field)
    return value


def _managed(kind: str, records: dict[str, R], rid: str, field: str) -> R:
    """The record kept for a valid id, or NotFound naming the request field."""
    validate_id(rid, field)
    rec = records.get(rid)
    if rec is None:
        raise NotFound(f"{kind} {rid} is not managed by this host", field=field)
    return rec


class Host:
    def _template(self, requested: str) -> str:
        """The template a create asked for: the host's default, a Debian release the LXC driver builds its
        recipe for (`trixie`, `trixie-r2`: cached by recipe, so only a host's first such create builds), or
        a template's own name."""
        if not requested:
            return self.default_template
        release = templates.parse_release(requested)
        if release is None or self.containers.name != "lxc":
            return requested
        return templates.build_template(self.settings, release=release[0], revision=release[1])

    def __init__(self, settings: Settings, containers: ContainerDriver, volumes: VolumeDriver,
                 layout: CgroupLayout | None, default_template: str) -> None:
        self.settings = settings
        self.containers = containers
        self.volumes = volumes
        self.layout = layout
        self.default_template = default_template
        self.state = HostState.load(settings.state_file)
        self._locks = NamedLocks()
        # Short: only around picks made against every container's record (port, bridge address) and the
        # write of the record that reserves them. Taken inside NamedLocks.hold, never around it.
        self._alloc = threading.Lock()
        # Restart backoff per container: (monotonic time of the last revival, current delay).
        self._revived: dict[str, tuple[float, float]] = {}
        for rec in list(self.state.containers.values()):
            if not rec.desired:  # written by an older hostd: keep whatever the container is doing now
                running = self.containers.status(rec.id).state in ("RUNNING", "FROZEN")
                self.state.put_container(rec.with_(desired="running" if running else "stopped"))

    # ------------------------------------------------------------------ containers
    def create_container(self, req: CreateContainer) -> ContainerView:
        validate_id(req.id, "container.id")
        req.limits.validate("container.limits")
        if not req.network_mode:  # unspecified: this host's default (settings.network_mode)
            req = replace(req, network_mode=self.settings.network_mode)
        if req.network_mode not in ("host", "bridge"):
            raise InvalidArgument("container.network_mode must be NETWORK_MODE_HOST or NETWORK_MODE_BRIDGE",
                                  field="container.network_mode")
        b = req.bootstrap
        missing = [(f"container.bootstrap.{n}", "required") for n, v in
                   (("server_address", b.server_address), ("instance_id", b.instance_id),
                    ("enrollment_token", b.enrollment_token), ("ca_pem", b.ca_pem)) if not v]
        if missing:
            raise InvalidArgument(f"{missing[0][0]} is required", violations=missing)
        if b.heartbeat_seconds < 0 or b.heartbeat_seconds > 3600:
            raise InvalidArgument("container.bootstrap.heartbeat_seconds must be 0..3600",
                                  field="container.bootstrap.heartbeat_seconds")
        datadir = _validate_path(req.datadir or DEFAULT_DATADIR, "container.datadir")
        template = self._template(req.template)
        if not all(c.isalnum() or c in "-_." for c in template):
            raise InvalidArgument(f"container.template {template!r} is not a template name",
                                  field="container.template")
        with self._locks.hold(container_key(req.id), volume_key(req.volume_id) if req.volume_id else ""):
            return self._create_container(req, datadir, template)

    def _create_container(self, req: CreateContainer, datadir: str, template: str) -> ContainerView:
        b = req.bootstrap
        fingerprint = req.fingerprint()
        existing = self.state.containers.get(req.id)
        if existing is not None:
            if existing.fingerprint != fingerprint:
                raise AlreadyExists(f"container {req.id} exists with other parameters", field="container.id")
            self.containers.create(self._spec(existing, b))  # finishes a create a crash interrupted
            return self.get_container(req.id)
        if req.id in self.containers.list_names():
            raise AlreadyExists(f"an unmanaged container {req.id} exists on this host", field="container.id")
        mount: VolumeMount | None = None
        if req.volume_id:
            vol = self._volume(req.volume_id, "container.volume_id")
            if vol.attached_to and vol.attached_to != req.id:
                raise FailedPrecondition(f"volume {vol.id} is attached to {vol.attached_to}",
                                         field="container.volume_id")
            mount = self._mount_for(req.volume_id, datadir)
        with self._alloc:
            rec = self._allocate(req, datadir, template, fingerprint)
            # Intent first: if hostd dies inside the driver's create, the half-made container is still ours (a
            # retried create finishes it, a delete removes it) instead of an "unmanaged" orphan. Written under
            # the allocation lock, the record also reserves its port or address against concurrent creates.
            self.state.put_container(rec)
        if req.volume_id:
            self.state.put_volume(self.state.volumes[req.volume_id].with_(attached_to=req.id,
                                                                           container_path=datadir))
        self.containers.create(self._spec(rec, b, mount))  # the slow part: outside the allocation lock
        log.info("container created", extra={"instance": req.id, "network": req.network_mode, "port": rec.port})
        return self.get_container(req.id)

    def _allocate(self, req: CreateContainer, datadir: str, template: str, fingerprint: str) -> ContainerRecord:
        """The new container's record with its port (host mode) or bridge address; the caller holds the
        allocation lock until the record is written."""
        if req.network_mode == "host":
            port = network.allocate_port(self.settings.port_min, self.settings.port_max,
                                         {c.port for c in self.state.containers.values()})
            address = self.settings.advertise_address
        else:
            address, _, _ = network.allocate_address(
                self.settings.host_bridge.cidr,
                {c.address for c in self.state.containers.values() if c.network_mode == "bridge"})
            port = network.MYSQL_PORT
        return ContainerRecord(id=req.id, limits=req.limits, network_mode=req.network_mode, address=address,
                               port=port, template=template, datadir=datadir, volume_id=req.volume_id,
                               fingerprint=fingerprint, driver=self.containers.name, desired="stopped")

    @contextmanager
    def _holding_pair(self, key: str, partner: Callable[[], str], partner_key: Callable[[str], str]) -> Iterator[None]:
        """The lock of `key` and of its partner's (read, locked, then checked unchanged: the partner may have
        changed while this waited for the locks, and is then read again)."""
        while True:
            other = partner()
            with self._locks.hold(key, partner_key(other) if other else ""):
                if partner() == other:
                    yield
                    return

    def _holding_container(self, cid: str) -> AbstractContextManager[None]:
        """The locks of a container and of the volume it has."""
        def volume() -> str:
            rec = self.state.containers.get(cid)
            return rec.volume_id if rec is not None else ""
        return self._holding_pair(container_key(cid), volume, volume_key)

    def _holding_volume(self, vid: str) -> AbstractContextManager[None]:
        """The locks of a volume and of the container it is attached to."""
        def container() -> str:
            rec = self.state.volumes.get(vid)
            return rec.attached_to if rec is not None else ""
        return self._holding_pair(volume_key(vid), container, container_key)

    def _spec(self, rec: ContainerRecord, b: Bootstrap, mount: VolumeMount | None = None) -> ContainerSpec:
        if rec.network_mode == "bridge":
            _, plen, gw = network.allocate_address(self.settings.host_bridge.cidr, ())
            plan = NetworkPlan("bridge", rec.address, rec.port, self.settings.host_bridge.name, plen, gw)
        else:
            plan = NetworkPlan("host", rec.address, rec.port)
        if mount is None and rec.volume_id and rec.volume_id in self.state.volumes:
            mount = self._mount_for(rec.volume_id, rec.datadir)
        return ContainerSpec(id=rec.id, limits=rec.limits, bootstrap=b, network=plan, template=rec.template,
                             datadir=rec.datadir, mount=mount)

    def _mount_for(self, vid: str, path: str) -> VolumeMount:
        vol = self.state.volumes[vid]
        info = self.volumes.info(vid, vol.locator)
        if not info.mount_path:
            info = self.volumes.activate(vid, vol.locator)
        return VolumeMount(host_path=info.mount_path, container_path=path,
                           device=device_numbers(info.device) if info.device.startswith("/dev/") else "")

    def _container(self, cid: str, field: str = "id") -> ContainerRecord:
        return _managed("container", self.state.containers, cid, field)

    def get_container(self, cid: str) -> ContainerView:
        rec = self._container(cid)
        return ContainerView(rec, self.containers.status(cid))

    def list_containers(self) -> tuple[list[ContainerView], list[str]]:
        views = [ContainerView(r, self.containers.status(r.id)) for r in self.state.containers.values()]
        unmanaged = [n for n in self.containers.list_names() if n not in self.state.containers]
        return views, unmanaged

    def start_container(self, cid: str) -> ContainerView:
        with self._holding_container(cid):
            return self._start_container(cid)

    def _start_container(self, cid: str) -> ContainerView:
        rec = self._container(cid)
        if rec.desired != "running":
            rec = rec.with_(desired="running")
            self.state.put_container(rec)
        return ContainerView(rec, self._start(rec))

    def _start(self, rec: ContainerRecord) -> ContainerStatus:
        if rec.volume_id in self.state.volumes:
            self._mount_for(rec.volume_id, rec.datadir)  # after a host reboot the volume is not mounted
        return self.containers.start(rec.id)

    def stop_container(self, cid: str, timeout: int) -> ContainerView:
        with self._holding_container(cid):
            return self._stop_container(cid, timeout)

    def _stop_container(self, cid: str, timeout: int) -> ContainerView:
        rec = self._container(cid)
        if timeout < 0 or timeout > 3600:
            raise InvalidArgument("timeout_seconds must be 0..3600", field="timeout_seconds")
        if rec.desired != "stopped":
            rec = rec.with_(desired="stopped")
            self.state.put_container(rec)
        return ContainerView(rec, self.containers.stop(cid, timeout))

    def revive(self, now: float | None = None) -> list[str]:
        """Restart policy "always": a container the server wants running that stopped on its own (its PID 1,
        the agent, died; the host rebooted) is started again. One that keeps dying waits 1, 2, 4... up to
        REVIVE_MAX_DELAY seconds between attempts; a container that stayed up for that long starts afresh.
        Returns the ids started. (hostd's loop calls the two halves itself: only the second takes locks.)"""
        now = time.monotonic() if now is None else now
        return [cid for cid in self.due_for_revival(now) if self.revive_one(cid, now)]

    def due_for_revival(self, now: float) -> list[str]:
        """Read-only: the containers meant to run that are stopped and past their backoff."""
        due = []
        for rec in list(self.state.containers.values()):
            if rec.desired != "running":
                continue
            last = self._revived.get(rec.id)
            try:
                state = self.containers.status(rec.id).state
            except Exception:  # noqa: BLE001 - one broken container must not stop the others' care
                log.exception("status failed", extra={"instance": rec.id})
                continue
            if state != "STOPPED":
                if last is not None and now - last[0] > REVIVE_MAX_DELAY:
                    self._revived.pop(rec.id, None)
                continue
            if last is None or now >= last[0] + last[1]:
                due.append(rec.id)
        return due

    def revive_one(self, cid: str, now: float) -> bool:
        """Starts one container found due (re-checked: it may have been stopped or deleted meanwhile)."""
        with self._holding_container(cid):
            return self._revive_one(cid, now)

    def _revive_one(self, cid: str, now: float) -> bool:
        rec = self.state.containers.get(cid)
        if rec is None or rec.desired != "running" or self.containers.status(cid).state != "STOPPED":
            return False
        last = self._revived.get(cid)
        self._revived[cid] = (now, 1.0 if last is None else min(REVIVE_MAX_DELAY, last[1] * 2))
        try:
            self._start(rec)
        except Exception:  # noqa: BLE001 - retried after the backoff
            log.exception("restarting a stopped container failed", extra={"instance": cid})
            return False
        log.warning("container stopped without being asked; started again", extra={"instance": cid})
        return True

    def delete_container(self, cid: str) -> None:
        with self._holding_container(cid):
            self._delete_container(cid)

    def _delete_container(self, cid: str) -> None:
        rec = self._container(cid)
        self.containers.destroy(cid)
        if rec.volume_id in self.state.volumes:
            self.state.put_volume(self.state.volumes[rec.volume_id].with_(attached_to="", container_path=""))
        self.state.drop_container(cid)
        self._revived.pop(cid, None)
        log.info("container deleted", extra={"instance": cid})

    def set_limits(self, cid: str, limits: Limits) -> ContainerView:
        with self._holding_container(cid):
            return self._set_limits(cid, limits)

    def _set_limits(self, cid: str, limits: Limits) -> ContainerView:
        rec = self._container(cid)
        limits.validate("limits")
        mount = self._mount_for(rec.volume_id, rec.datadir) if rec.volume_id in self.state.volumes else None
        self.containers.set_limits(cid, limits, mount)
        self.state.put_container(rec.with_(limits=limits))
        return self.get_container(cid)

    def usage(self, cid: str) -> Usage:
        rec = self._container(cid)
        return self.containers.usage(cid, rec.limits)

    def all_usage(self) -> list[Usage]:
        """Usage of every managed container; one that vanished or cannot be read meanwhile is left out (the
        next poll sees it again), so one broken container does not blind the operator to the others."""
        out: list[Usage] = []
        for cid, rec in list(self.state.containers.items()):
            try:
                out.append(self.containers.usage(cid, rec.limits))
            except Exception as exc:  # noqa: BLE001 - see above
                log.warning("usage unreadable", extra={"instance": cid, "error": str(exc)[:200]})
        return out

    def exec(self, cid: str, argv: list[str], timeout: int) -> ExecResult:
        self._container(cid)
        if not argv:
            raise InvalidArgument("argv must not be empty", field="argv")
        if timeout < 0 or timeout > 3600:
            raise InvalidArgument("timeout_seconds must be 0..3600", field="timeout_seconds")
        return self.containers.exec(cid, argv, timeout)

    # ------------------------------------------------------------------ volumes
    def _volume(self, vid: str, field: str = "id") -> VolumeRecord:
        return _managed("volume", self.state.volumes, vid, field)

    def _check_space(self, needed_gb: int, field: str) -> None:
        if self.volumes.remote:
            return  # the SAN node's disk, checked there
        free = self.volumes.free_bytes()
        if needed_gb * GIB > free:
            raise ResourceExhausted(f"{field}: {needed_gb} GiB asked, {free // GIB} GiB free in storage",
                                    field=field)

    def create_volume(self, vid: str, size_gb: int) -> VolumeView:
        validate_id(vid, "volume.id")
        if not 1 <= size_gb <= MAX_VOLUME_GB:
            raise InvalidArgument(f"volume.size_gb must be 1..{MAX_VOLUME_GB}, got {size_gb}",
                                  field="volume.size_gb")
        with self._locks.hold(volume_key(vid)):
            return self._create_volume(vid, size_gb)

    def _create_volume(self, vid: str, size_gb: int) -> VolumeView:
        existing = self.state.volumes.get(vid)
        if existing is not None:
            if existing.size_gb != size_gb:
                raise AlreadyExists(f"volume {vid} exists with size {existing.size_gb} GiB", field="volume.id")
            return self.get_volume(vid)
        locator = self._locator_for(vid)
        if locator in self.volumes.list_locators():
            raise AlreadyExists(f"an unmanaged backing store for {vid} exists; adopt it instead",
                                field="volume.id")
        # Per volume, as when creates ran one at a time (not summed over creates in flight): the files are
        # sparse, so a volume being made takes next to nothing from the free space this reads.
        self._check_space(size_gb, "volume.size_gb")
        info = self.volumes.create(vid, size_gb)
        self.state.put_volume(VolumeRecord(id=vid, size_gb=size_gb, driver=self.volumes.name,
                                           locator=info.locator))
        return self.get_volume(vid)

    def _locator_for(self, vid: str) -> str:
        fn = getattr(self.volumes, "locator_for", None)
        return fn(vid) if fn else ""

    def get_volume(self, vid: str) -> VolumeView:
        rec = self._volume(vid)
        return VolumeView(rec, self.volumes.info(vid, rec.locator))

    def list_volumes(self) -> tuple[list[VolumeView], list[str]]:
        views = [VolumeView(r, self.volumes.info(r.id, r.locator)) for r in self.state.volumes.values()]
        tracked = {r.locator for r in self.state.volumes.values()}
        return views, [loc for loc in self.volumes.list_locators() if loc not in tracked]

    def resize_volume(self, vid: str, size_gb: int) -> VolumeView:
        with self._holding_volume(vid):  # an offline grow stops and starts the container using it
            return self._resize_volume(vid, size_gb)

    def _resize_volume(self, vid: str, size_gb: int) -> VolumeView:
        rec = self._volume(vid)
        if size_gb == rec.size_gb:
            return self.get_volume(vid)  # a replayed resize is done already
        if not rec.size_gb < size_gb <= MAX_VOLUME_GB:
            raise InvalidArgument(f"size_gb must be larger than the current {rec.size_gb} GiB "
                                  f"(and at most {MAX_VOLUME_GB}), got {size_gb}", field="size_gb")
        self._check_space(size_gb - rec.size_gb, "size_gb")
        try:
            self.volumes.resize(vid, rec.locator, size_gb)
        except OnlineResizeDenied:
            self._grow_offline(rec)
        self.state.put_volume(rec.with_(size_gb=size_gb))
        return self.get_volume(vid)

    def _grow_offline(self, rec: VolumeRecord) -> None:
        """Online grow refused by the kernel: stop the container using the volume, grow the unmounted
        filesystem, and bring both back (a restart of mysqld, like Trove's resize)."""
        was_running = bool(rec.attached_to) and self.containers.status(rec.attached_to).state == "RUNNING"
        if was_running:
            self.containers.stop(rec.attached_to, 30)
        self.volumes.unmount(rec.id, rec.locator)
        grow = getattr(self.volumes, "grow_offline", None)
        if grow is None:
            raise FailedPrecondition(f"volume driver {self.volumes.name} cannot grow offline", field="size_gb")
        grow(rec.id, rec.locator)
        self.volumes.activate(rec.id, rec.locator)
        if was_running:
            self.containers.start(rec.attached_to)
        log.info("volume grown offline", extra={"volume": rec.id, "restarted": rec.attached_to if was_running
                                                else ""})

    def attach_volume(self, vid: str, cid: str, mount_path: str) -> VolumeView:
        # The volume's current container (if another) is not locked: attached elsewhere is refused, and
        # attached_to changes only under this volume's lock.
        with self._locks.hold(volume_key(vid), container_key(cid)):
            return self._attach_volume(vid, cid, mount_path)

    def _attach_volume(self, vid: str, cid: str, mount_path: str) -> VolumeView:
        rec = self._volume(vid)
        crec = self._container(cid, "container_id")
        path = _validate_path(mount_path or crec.datadir, "mount_path")
        if rec.attached_to == cid and rec.container_path == path:
            return self.get_volume(vid)
        if rec.attached_to:
            raise FailedPrecondition(f"volume {vid} is attached to {rec.attached_to}", field="id")
        if crec.volume_id and crec.volume_id != vid and crec.volume_id in self.state.volumes:
            raise FailedPrecondition(f"container {cid} already has volume {crec.volume_id}",
                                     field="container_id")
        self.containers.set_mount(cid, self._mount_for(vid, path), crec.limits)
        self.state.put_container(crec.with_(volume_id=vid, datadir=path))
        self.state.put_volume(rec.with_(attached_to=cid, container_path=path))
        return self.get_volume(vid)

    def detach_volume(self, vid: str) -> VolumeView:
        with self._holding_volume(vid):
            return self._detach_volume(vid)

    def _detach_volume(self, vid: str) -> VolumeView:
        rec = self._volume(vid)
        if not rec.attached_to:
            return self.get_volume(vid)
        crec = self.state.containers.get(rec.attached_to)
        if crec is not None:
            self.containers.set_mount(crec.id, None, crec.limits)
            self.state.put_container(crec.with_(volume_id=""))
        self.state.put_volume(rec.with_(attached_to="", container_path=""))
        return self.get_volume(vid)

    def delete_volume(self, vid: str, keep_data: bool) -> None:
        with self._holding_volume(vid):
            self._delete_volume(vid, keep_data)

    def _delete_volume(self, vid: str, keep_data: bool) -> None:
        rec = self._volume(vid)
        if rec.attached_to:
            raise FailedPrecondition(f"volume {vid} is attached to {rec.attached_to}; detach it first",
                                     field="id")
        if keep_data:
            self.volumes.deactivate(vid, rec.locator)
        else:
            self.volumes.delete(vid, rec.locator)
        self.state.drop_volume(vid)
        log.info("volume deleted", extra={"volume": vid, "keep_data": keep_data})

    def adopt_volume(self, vid: str, locator: str, chap: Chap | None = None,
                     only_if_tracked: bool = False) -> VolumeView:
        validate_id(vid, "id")
        if not locator:
            raise InvalidArgument("locator is required", field="locator")
        # The locator's lock too: two adoptions of one backing store under two ids must not both pass the
        # "already tracked under another id" check.
        with self._locks.hold(volume_key(vid), "locator:" + locator):
            return self._adopt_volume(vid, locator, chap, only_if_tracked)

    def _adopt_volume(self, vid: str, locator: str, chap: Chap | None, only_if_tracked: bool) -> VolumeView:
        if only_if_tracked and vid not in self.state.volumes:
            raise NotFound(f"volume {vid} is not tracked by this host", field="id")
        if isinstance(self.volumes, IscsiVolumeDriver):
            return self._attach_lun(vid, locator, chap)
        existing = self.state.volumes.get(vid)
        if existing is not None:
            if existing.locator != locator:
                raise AlreadyExists(f"volume {vid} exists with another locator", field="id")
            return self.get_volume(vid)
        if self.volumes.name == "loop":
            # Only files in our storage path: a caller must not make hostd mount an arbitrary host file.
            root = os.path.realpath(self.settings.storage_path) + "/"
            if not os.path.realpath(locator).startswith(root) or not locator.endswith(".img"):
                raise InvalidArgument(f"locator must be a .img file under {root}", field="locator")
            if not os.path.exists(locator):
                raise NotFound(f"no backing file at {locator}", field="locator")
        if any(r.locator == locator for r in self.state.volumes.values()):
            raise AlreadyExists("that locator is already tracked under another id", field="locator")
        info = self.volumes.activate(vid, locator)
        self.state.put_volume(VolumeRecord(id=vid, size_gb=info.size_gb, driver=self.volumes.name,
                                           locator=locator))
        log.info("volume adopted", extra={"volume": vid})
        return self.get_volume(vid)

    def _attach_lun(self, vid: str, locator: str, chap: Chap | None) -> VolumeView:
        """An iscsi volume comes to a compute host by logging in to its LUN with the CHAP account the server
        handed over (kept by the initiator only: nothing in hostd's state holds it). Idempotent; a record
        whose session is gone (host reboot) logs in again. A failed attach leaves no session behind."""
        assert isinstance(self.volumes, IscsiVolumeDriver)
        Locator.parse(locator, "locator")
        existing = self.state.volumes.get(vid)
        if existing is not None and existing.locator != locator:
            raise AlreadyExists(f"volume {vid} exists with another locator", field="id")
        if existing is None and any(r.locator == locator for r in self.state.volumes.values()):
            raise AlreadyExists("that locator is already tracked under another id", field="locator")
        has_session = bool(self.volumes.info(vid, locator).device) or self.volumes.has_session(vid, locator)
        if not has_session:
            if chap is None or not chap.user or not chap.secret:
                raise InvalidArgument("chap.user and chap.secret are required to attach an iscsi volume",
                                      field="chap")
            validate_chap(chap)
            if existing is not None:
                self.volumes.deactivate(vid, locator)  # what a lost session left mounted
            self.volumes.login(vid, locator, chap)
        try:
            info = self.volumes.activate(vid, locator)
        except Exception:
            if not has_session:
                self.volumes.deactivate(vid, locator)
            raise
        if existing is None:
            self.state.put_volume(VolumeRecord(id=vid, size_gb=info.size_gb, driver=self.volumes.name,
                                               locator=locator))
            log.info("iscsi volume attached", extra={"volume": vid, "locator": locator})
        return self.get_volume(vid)

    def export_volume(self, vid: str, initiator_iqn: str, chap: Chap | None) -> VolumeView:
        """Storage mode: the LUN admits exactly this initiator with this CHAP account; everyone else is
        refused and cut off. An empty initiator admits nobody (detached, or its host fenced)."""
        if not isinstance(self.volumes, SanTargetDriver):
            raise FailedPrecondition("only a hostd in storage mode exports volumes", field="id")
        with self._locks.hold(volume_key(vid)):
            return self._export_volume(self.volumes, vid, initiator_iqn, chap)

    def _export_volume(self, target: SanTargetDriver, vid: str, initiator_iqn: str,
                       chap: Chap | None) -> VolumeView:
        rec = self._volume(vid)
        if initiator_iqn:
            validate_iqn(initiator_iqn, "initiator_iqn")
            if chap is None or not chap.user or not chap.secret:
                raise InvalidArgument("chap.user and chap.secret are required with an initiator", field="chap")
            validate_chap(chap)
        elif chap is not None and (chap.user or chap.secret):
            raise InvalidArgument("chap must be empty when no initiator is admitted", field="chap")
        target.allow(vid, initiator_iqn, chap if initiator_iqn else None)
        self.state.put_volume(rec.with_(initiator_iqn=initiator_iqn, chap_user=chap.user if chap else "",
                                        chap_secret=chap.secret if chap else ""))
        return self.get_volume(vid)

    def reconcile_targets(self) -> None:
        """Storage mode, at start: every kept volume exported again with its one initiator (tgtd keeps its
        targets in memory only; after a tgtd restart they are gone)."""
        if not isinstance(self.volumes, SanTargetDriver):
            return
        for rec in self.state.volumes.values():
            self.volumes.activate(rec.id, rec.locator)
            chap = Chap(rec.chap_user, rec.chap_secret) if rec.initiator_iqn else None
            self.volumes.allow(rec.id, rec.initiator_iqn, chap)

    # ------------------------------------------------------------------ capacity
    def capacity(self) -> CapacityView:
        mem_kb = 0
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_kb = int(line.split()[1])
        return CapacityView(
            host_id=self.settings.host_id, memory_mb_total=mem_kb // 1024,
            memory_mb_allocated=sum(c.limits.memory_mb for c in self.state.containers.values()),
            cpus=os.cpu_count() or 1, storage_gb_total=self.volumes.total_bytes() // GIB,
            storage_gb_free=self.volumes.free_bytes() // GIB,
            storage_gb_allocated=sum(v.size_gb for v in self.state.volumes.values()),
            containers=len(self.state.containers), container_driver=self.containers.name,
            volume_driver=self.volumes.name, cgroup_version=self.layout.version if self.layout else "",
            mode=self.settings.mode,
            initiator_iqn=self.settings.initiator_iqn if isinstance(self.volumes, IscsiVolumeDriver) else "",
            iscsi_portal=self.settings.iscsi_portal if isinstance(self.volumes, SanTargetDriver) else "")

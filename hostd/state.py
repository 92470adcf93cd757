"""hostd's durable memory: what it was asked to keep (containers, volumes), as JSON in the state dir.

Written atomically (temp file + fsync + rename) after every change, so a crash leaves either the old or the
new state, never half of one. Anything found on the host that is not in here is "unmanaged".

hostd changes it from several threads at once (operations on different containers and volumes run in
parallel): every change swaps in a new dict and writes the file under one lock, so a reader iterating
`containers` or `volumes` iterates a snapshot that no writer changes under it, and each write holds every
change made before it.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Self

from .containers import Limits


@dataclass(frozen=True)
class Record:
    """A kept thing, by id: a JSON object in the state file, changed by copying."""

    id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**d)

    def with_(self, **changes: Any) -> Self:
        return replace(self, **changes)


@dataclass(frozen=True)
class ContainerRecord(Record):
    limits: Limits
    network_mode: str  # "host" | "bridge"
    address: str
    port: int
    template: str
    datadir: str
    volume_id: str
    # sha256 over the create request's parameters: same id + other parameters => ALREADY_EXISTS.
    fingerprint: str
    driver: str = "lxc"
    # What the server last asked for: "running" after StartContainer, "stopped" after create/StopContainer.
    # A container that is "running" here but stopped on the host died on its own and is started again.
    # "" only in state written before this field existed: resolved from the container's state at load.
    desired: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        return cls(**{**d, "limits": Limits(**d["limits"])})


@dataclass(frozen=True)
class VolumeRecord(Record):
    size_gb: int
    driver: str
    locator: str
    attached_to: str = ""
    container_path: str = ""
    # Storage mode only: the one initiator the LUN admits and the volume's CHAP account (the target must hold
    # the secret to check it; the state file is 0600 in a 0700 dir). Empty on compute hosts.
    initiator_iqn: str = ""
    chap_user: str = ""
    chap_secret: str = ""

    def __repr__(self) -> str:  # never print the secret
        return f"VolumeRecord(id={self.id!r}, driver={self.driver!r}, locator={self.locator!r})"


@dataclass
class HostState:
    path: str
    containers: dict[str, ContainerRecord] = field(default_factory=dict)
    volumes: dict[str, VolumeRecord] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def load(cls, path: str) -> HostState:
        state = cls(path)
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            state.containers = {k: ContainerRecord.from_dict(v) for k, v in data.get("containers", {}).items()}
            state.volumes = {k: VolumeRecord.from_dict(v) for k, v in data.get("volumes", {}).items()}
        return state

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        data = {"containers": {k: v.to_dict() for k, v in sorted(self.containers.items())},
                "volumes": {k: v.to_dict() for k, v in sorted(self.volumes.items())}}
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    # Copy on write (see the module's doc): never change a dict a reader may be iterating.
    def put_container(self, rec: ContainerRecord) -> None:
        with self._lock:
            self.containers = {**self.containers, rec.id: rec}
            self._save()

    def drop_container(self, cid: str) -> None:
        with self._lock:
            self.containers = {k: v for k, v in self.containers.items() if k != cid}
            self._save()

    def put_volume(self, rec: VolumeRecord) -> None:
        with self._lock:
            self.volumes = {**self.volumes, rec.id: rec}
            self._save()

    def drop_volume(self, vid: str) -> None:
        with self._lock:
            self.volumes = {k: v for k, v in self.volumes.items() if k != vid}
            self._save()

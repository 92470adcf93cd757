"""Every state machine's states, defined once, and their one mapping onto the proto enums.

Inside a process a state is a StrEnum member (its value is what the state DB stores and what logs show);
at a gRPC edge it becomes the proto enum value `<ENUM_PREFIX>_<NAME>` through `to_pb` / `from_pb`.
"""
from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar, overload

from reddwarf.v1 import admin_pb2, common_pb2, database_pb2, host_pb2

if TYPE_CHECKING:  # the generic base of every generated enum's wrapper (types-protobuf; stubs only)
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper


class InstanceStatus(StrEnum):
    """Trove's instance status values (what a Trove client reads), plus DELETING, RESTORING, and STOPPING and
    STARTING (StopInstance / StartInstance running)."""
    BUILD = "BUILD"
    ACTIVE = "ACTIVE"
    HEALTHY = "HEALTHY"
    REBOOT = "REBOOT"
    RESIZE = "RESIZE"
    BACKUP = "BACKUP"
    SHUTDOWN = "SHUTDOWN"
    ERROR = "ERROR"
    FAILED = "FAILED"
    RESTART_REQUIRED = "RESTART_REQUIRED"
    DELETING = "DELETING"
    RESTORING = "RESTORING"
    STOPPING = "STOPPING"
    STARTING = "STARTING"
    UPGRADE = "UPGRADE"  # UpgradeInstance running (Trove's own value)


class BackupStatus(StrEnum):
    NEW = "NEW"
    BUILDING = "BUILDING"
    SAVING = "SAVING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    DELETE_FAILED = "DELETE_FAILED"


class VerifyStatus(StrEnum):
    NOT_VERIFIED = "NOT_VERIFIED"
    VERIFYING = "VERIFYING"
    VERIFIED = "VERIFIED"
    MISMATCH = "MISMATCH"
    FAILED = "FAILED"


class TaskState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StepState(StrEnum):
    """One recorded step of a task. Shown on the API as the TaskState it amounts to (`step_task_state`)."""
    RUNNING = "running"
    DONE = "done"
    ERROR = "error"


def step_task_state(step: StepState) -> TaskState:
    return {StepState.RUNNING: TaskState.RUNNING, StepState.DONE: TaskState.SUCCEEDED,
            StepState.ERROR: TaskState.FAILED}[step]


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    # Lost (silent past the grace period) and cut off: its certificate revoked, its initiator out of every LUN
    # ACL. Only the server takes a host out of it (after the host came back and gave up its instances).
    FENCED = "fenced"


class ContainerState(StrEnum):
    STOPPED = "STOPPED"
    RUNNING = "RUNNING"
    FROZEN = "FROZEN"
    ABSENT = "ABSENT"


class VolumeState(StrEnum):
    AVAILABLE = "AVAILABLE"
    ATTACHED = "ATTACHED"
    ABSENT = "ABSENT"


class NetworkMode(StrEnum):
    HOST = "host"
    BRIDGE = "bridge"


class ServiceState(StrEnum):
    """mysqld inside a guest, as its agent sees it."""
    UNKNOWN = "UNKNOWN"
    BUILDING = "BUILDING"
    RUNNING = "RUNNING"
    SHUTDOWN = "SHUTDOWN"
    CRASHED = "CRASHED"
    FAILED = "FAILED"
    NEW = "NEW"


# Each StrEnum's proto enum and the prefix its values carry there.
_PB: dict[type[StrEnum], tuple[_EnumTypeWrapper[Any], str]] = {
    InstanceStatus: (database_pb2.InstanceStatus, "INSTANCE_STATUS_"),
    BackupStatus: (database_pb2.BackupStatus, "BACKUP_STATUS_"),
    VerifyStatus: (database_pb2.VerifyStatus, "VERIFY_STATUS_"),
    TaskState: (admin_pb2.TaskState, "TASK_STATE_"),
    HostState: (admin_pb2.HostState, "HOST_STATE_"),
    ContainerState: (host_pb2.ContainerState, "CONTAINER_STATE_"),
    VolumeState: (host_pb2.VolumeState, "VOLUME_STATE_"),
    NetworkMode: (host_pb2.NetworkMode, "NETWORK_MODE_"),
    ServiceState: (common_pb2.ServiceState, "SERVICE_STATE_"),
}

E = TypeVar("E", bound=StrEnum)


# One overload per mapped state machine, so a caller gets the proto enum's own value type back.
@overload
def to_pb(state: InstanceStatus) -> database_pb2.InstanceStatus.ValueType: ...
@overload
def to_pb(state: BackupStatus) -> database_pb2.BackupStatus.ValueType: ...
@overload
def to_pb(state: VerifyStatus) -> database_pb2.VerifyStatus.ValueType: ...
@overload
def to_pb(state: TaskState) -> admin_pb2.TaskState.ValueType: ...
@overload
def to_pb(state: HostState) -> admin_pb2.HostState.ValueType: ...
@overload
def to_pb(state: ContainerState) -> host_pb2.ContainerState.ValueType: ...
@overload
def to_pb(state: VolumeState) -> host_pb2.VolumeState.ValueType: ...
@overload
def to_pb(state: NetworkMode) -> host_pb2.NetworkMode.ValueType: ...
@overload
def to_pb(state: ServiceState) -> common_pb2.ServiceState.ValueType: ...
def to_pb(state: StrEnum) -> int:
    """The proto enum value of a state (`InstanceStatus.ACTIVE` → `INSTANCE_STATUS_ACTIVE`)."""
    wrapper, prefix = _PB[type(state)]
    return int(wrapper.Value(prefix + state.name))


def from_pb(cls: type[E], value: int) -> E:
    """The state a proto enum value names; ValueError for UNSPECIFIED or a value this build lacks."""
    wrapper, prefix = _PB[cls]
    name = wrapper.Name(value)
    return cls[name.removeprefix(prefix)]


def parse(cls: type[E], text: str) -> E:
    """A state from its name or value as a user or the state DB spells it (case-insensitive)."""
    for member in cls:
        if text.upper() in (member.name, member.value.upper()):
            return member
    raise ValueError(f"{text!r} is not one of {', '.join(m.name for m in cls)}")

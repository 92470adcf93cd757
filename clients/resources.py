"""What the clients share that does no I/O (httpx's BaseClient, as functions): resource names, the request
messages, paging, channel settings and wait_for's verdicts. The async client (aio.py) and the sync one
generated from it (sdk.py) only add the calls.

Both clients accept bare ids ("abc") or full resource names ("instances/abc") wherever a resource is named,
so a value copied from any output works as input.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import grpc

from reddwarf.common import errors as common_errors
from reddwarf.common import states
from reddwarf.common.tls import SERVER_PEER, peer_name
from reddwarf.v1 import admin_pb2 as apb
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import database_pb2 as pb
from reddwarf.v1 import observe_pb2 as opb

from . import endpoints
from .config import ClientConfig
from .errors import FieldViolation, InstanceFailed, InvalidArgument, NotFound, WaitTimeout

# Instances reach these and stay there unless someone acts; wait_for stops on them.
FAILED_STATUSES = frozenset({pb.INSTANCE_STATUS_ERROR, pb.INSTANCE_STATUS_FAILED})


class HasId(Protocol):
    @property
    def id(self) -> str: ...


Named = TypeVar("Named", bound=HasId)


@dataclass(frozen=True)
class DatabaseSpec:
    name: str
    character_set: str = ""
    collation: str = ""


@dataclass(frozen=True)
class UserSpec:
    name: str
    password: str = field(repr=False)
    host: str = "%"
    databases: tuple[str, ...] = ()


def resource(collection: str, ident: str) -> str:
    """"x" -> "instances/x"; "instances/x" stays as it is."""
    prefix = collection + "/"
    return ident if ident.startswith(prefix) else prefix + ident


def maintenance_window(window: tuple[int, str, int] | None) -> pb.MaintenanceWindow | None:
    """(weekday 1..7, "HH:MM" UTC, minutes or 0 for 60) as the message; None stays None."""
    if window is None:
        return None
    weekday, start, minutes = window
    return pb.MaintenanceWindow(weekday=weekday, start_time=start, duration_minutes=minutes)


def instance_name(ident: str) -> str:
    return resource("instances", ident)


def user_name(instance: str, user: str, host: str = "%") -> str:
    if user.startswith("instances/"):
        return user
    at = user if "@" in user else f"{user}@{host}"
    return f"{instance_name(instance)}/users/{at}"


def log_name(instance: str, log: str) -> str:
    """A guest log's resource name: "instances/<id>/logs/<log>" (log: error, slow_query, general)."""
    if log.startswith("instances/"):
        return log
    return f"{instance_name(instance)}/logs/{log}"


def list_events_request(resource: str = "", kind: str = "", since: dt.datetime | None = None,
                        until: dt.datetime | None = None, tenant: str = "") -> opb.ListEventsRequest:
    request = opb.ListEventsRequest(resource=resource, kind=kind, tenant=tenant)
    if since is not None:
        request.since.FromDatetime(since)
    if until is not None:
        request.until.FromDatetime(until)
    return request


def database_name(instance: str, database: str) -> str:
    if database.startswith("instances/"):
        return database
    return f"{instance_name(instance)}/databases/{database}"


def may_be_id(collection: str, ref: str) -> bool:
    """Whether ref could name a resource by id (the server refuses ids with "/" or over 64 characters:
    such a ref can only be a display name)."""
    rid = ref.removeprefix(collection + "/")
    return bool(rid) and "/" not in rid and len(rid) <= 64


def one_match(kind: str, ref: str, matches: Sequence[Named]) -> Named:
    """The one resource a display name found: NotFound when none has it, InvalidArgument listing the ids
    when several do (names need not be unique; the id always is)."""
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise NotFound(f"{kind} {ref!r} not found: no {kind} has this id or name",
                       (FieldViolation("name", "no such id or name"),))
    ids = ", ".join(m.id for m in matches)
    raise InvalidArgument(f"{len(matches)} {kind}s are named {ref!r}: {ids}; give the id",
                          (FieldViolation("name", "ambiguous name"),))


def short_id(name: str) -> str:
    """"instances/abc" -> "abc"."""
    return name.rsplit("/", 1)[-1]


def instance_status(status: str | int) -> pb.InstanceStatus.ValueType:
    """Accepts "ACTIVE" or pb.INSTANCE_STATUS_ACTIVE."""
    if isinstance(status, int):
        return pb.InstanceStatus.ValueType(status)
    try:
        return states.to_pb(states.parse(states.InstanceStatus, status))
    except ValueError:
        raise ValueError(f"unknown instance status {status!r}; one of "
                         + ", ".join(states.InstanceStatus)) from None


def status_name(status: int) -> str:
    return states.from_pb(states.InstanceStatus, status).value


# ---------------------------------------------------------------------- paging

class PageRequest(Protocol):
    """Every List request: page_size (0 = the server's default) and the token of the page wanted."""
    page_size: int
    page_token: str


class PageResponse(Protocol):
    next_page_token: str


def turn_page(request: PageRequest, response: PageResponse) -> bool:
    """Points request at the page after response; False when response was the last page."""
    request.page_token = response.next_page_token
    return bool(response.next_page_token)


# ---------------------------------------------------------------------- wait_for's verdicts

def reached(inst: pb.Instance, wanted: int, instance: str) -> bool:
    """True when inst has the wanted status; InstanceFailed when it went to ERROR/FAILED instead (unless
    that is what is wanted)."""
    if inst.status == wanted:
        return True
    if inst.status in FAILED_STATUSES and wanted not in FAILED_STATUSES:
        detail = f": {inst.fault.message}" if inst.fault.message else ""
        raise InstanceFailed(f"instance {inst.id or instance} went to {status_name(inst.status)}{detail}")
    return False


def wait_timeout(inst: pb.Instance, wanted: int, instance: str, timeout: float) -> WaitTimeout:
    return WaitTimeout(f"instance {instance} is {status_name(inst.status)}, not {status_name(wanted)}, "
                       f"after {timeout}s")


# ---------------------------------------------------------------------- request messages

def _database(d: str | DatabaseSpec | cpb.Database) -> cpb.Database:
    if isinstance(d, cpb.Database):
        return d
    if isinstance(d, str):
        return cpb.Database(database=d)
    return cpb.Database(database=d.name, character_set=d.character_set, collation=d.collation)


def _user(u: UserSpec | cpb.User) -> cpb.User:
    if isinstance(u, cpb.User):
        return u
    return cpb.User(user=u.name, password=u.password, host=u.host, databases=list(u.databases))


def create_instance_request(name: str, flavor: str, size_gb: int, *,
                            databases: Iterable[str | DatabaseSpec | cpb.Database] = (),
                            users: Iterable[UserSpec | cpb.User] = (), datastore: str = "",
                            datastore_version: str = "", restore_from: str | None = None,
                            request_id: str = "", allowed_cidrs: Iterable[str] = (),
                            require_secure_transport: bool = False, tags: Mapping[str, str] | None = None,
                            deletion_protection: bool = False, configuration: str = "",
                            services: Iterable[str] = ()) -> pb.CreateInstanceRequest:
    return pb.CreateInstanceRequest(
        configuration=resource("configurations", configuration) if configuration else "",
        access=pb.InstanceAccess(allowed_cidrs=list(allowed_cidrs), require_secure_transport=require_secure_transport),
        instance=pb.Instance(display_name=name, flavor=flavor, volume=pb.Volume(size_gb=size_gb),
                             datastore=datastore, datastore_version=datastore_version, tags=dict(tags or {}),
                             deletion_protection=deletion_protection, services=list(services)),
        databases=[_database(d) for d in databases], users=[_user(u) for u in users],
        restore_from_backup=resource("backups", restore_from) if restore_from else "",
        request_id=request_id or new_request_id())


def parameter_values(values: Mapping[str, object]) -> dict[str, str]:
    """Configuration values as the API carries them, text: True/False become ON/OFF, numbers their digits
    (the server checks each against its parameter's rule)."""
    out = {}
    for name, v in values.items():
        out[name] = ("ON" if v else "OFF") if isinstance(v, bool) else str(v)
    return out


def version_name(datastore: str, version: str) -> str:
    return f"datastores/{datastore}/versions/{version}"


def create_database_request(instance: str, database: str | DatabaseSpec | cpb.Database
                            ) -> pb.CreateDatabaseRequest:
    return pb.CreateDatabaseRequest(parent=instance_name(instance), database=_database(database))


def create_user_request(instance: str, user: UserSpec | cpb.User) -> pb.CreateUserRequest:
    return pb.CreateUserRequest(parent=instance_name(instance), user=_user(user))


def update_user_request(instance: str, user: str, host: str = "%", *, password: str | None = None,
                        new_user: str | None = None, new_host: str | None = None) -> pb.UpdateUserRequest:
    return pb.UpdateUserRequest(name=user_name(instance, user, host), password=password or "",
                                new_user=new_user or "", new_host=new_host or "")


def create_backup_request(instance: str, name: str, description: str = "",
                          parent: str | None = None, tags: Mapping[str, str] | None = None,
                          request_id: str = "") -> pb.CreateBackupRequest:
    return pb.CreateBackupRequest(backup=pb.Backup(
        display_name=name, description=description, instance=instance_name(instance),
        parent=resource("backups", parent) if parent else "", tags=dict(tags or {})),
        request_id=request_id or new_request_id())


def new_request_id() -> str:
    """A create's idempotency key: made once per call, so the channel's retries of that call all carry it
    and the server makes one resource however many attempts reach it (clients/endpoints.py)."""
    return str(uuid.uuid4())


def tag_filters(tags: Iterable[str] | Mapping[str, str | None]) -> list[str]:
    """List filters as the server takes them: "key=value", or "key" (any value; a None in a mapping)."""
    if isinstance(tags, Mapping):
        return [k if v is None else f"{k}={v}" for k, v in tags.items()]
    return list(tags)


def _tag_paths(tags: Mapping[str, str] | None, set_tags: Mapping[str, str] | None,
               remove_tags: Iterable[str]) -> tuple[list[str], dict[str, str]]:
    """Mask paths and values for a tag change: `tags` replaces them all; `set_tags` / `remove_tags` change
    only those keys ("tags.<key>" paths: set when given a value, removed when not)."""
    removing = list(remove_tags)
    if tags is not None and (set_tags or removing):
        raise ValueError("give tags (replace them all) or set_tags/remove_tags, not both")
    if tags is not None:
        return ["tags"], dict(tags)
    values = dict(set_tags or {})
    return [f"tags.{k}" for k in values] + [f"tags.{k}" for k in removing if k not in values], values


def update_instance_request(instance: str, *, name: str | None = None, deletion_protection: bool | None = None,
                            tags: Mapping[str, str] | None = None, set_tags: Mapping[str, str] | None = None,
                            remove_tags: Iterable[str] = ()) -> pb.UpdateInstanceRequest:
    paths, values = _tag_paths(tags, set_tags, remove_tags)
    inst = pb.Instance(name=instance_name(instance), tags=values)
    if name is not None:
        inst.display_name = name
        paths.append("display_name")
    if deletion_protection is not None:
        inst.deletion_protection = deletion_protection
        paths.append("deletion_protection")
    request = pb.UpdateInstanceRequest(instance=inst)
    request.update_mask.paths.extend(paths)
    return request


def update_backup_request(backup: str, *, name: str | None = None, description: str | None = None,
                          tags: Mapping[str, str] | None = None, set_tags: Mapping[str, str] | None = None,
                          remove_tags: Iterable[str] = ()) -> pb.UpdateBackupRequest:
    paths, values = _tag_paths(tags, set_tags, remove_tags)
    b = pb.Backup(name=resource("backups", backup), tags=values)
    if name is not None:
        b.display_name = name
        paths.append("display_name")
    if description is not None:
        b.description = description
        paths.append("description")
    request = pb.UpdateBackupRequest(backup=b)
    request.update_mask.paths.extend(paths)
    return request


def quota(instances: int | None = None, memory_mb: int | None = None, volume_gb: int | None = None,
          backups: int | None = None, base: apb.Quota | None = None) -> apb.Quota:
    """A Quota with the given limits changed from base (-1 = unlimited)."""
    q = apb.Quota()
    if base is not None:
        q.CopyFrom(base)
    for key, value in (("instances", instances), ("memory_mb", memory_mb), ("volume_gb", volume_gb),
                       ("backups", backups)):
        if value is not None:
            setattr(q, key, value)
    return q


# ---------------------------------------------------------------------- channel

def channel_credentials(config: ClientConfig) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        return Path(path).expanduser().read_bytes() if path else None
    return grpc.ssl_channel_credentials(root_certificates=read(config.ca), private_key=read(config.key),
                                        certificate_chain=read(config.cert))


def channel_options(config: ClientConfig) -> Sequence[tuple[str, str | int]]:
    options: list[tuple[str, str | int]] = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    # The server's role name is verified whatever address was dialled: a host or instance certificate
    # cannot pose as the server (common/tls.py). server_name may pin one server: "<id>.server.reddwarf".
    options.append(("grpc.ssl_target_name_override", server_name(config)))
    # Several endpoints balanced round-robin, and gRPC's retries of what is safe to retry.
    options.extend(endpoints.channel_options(config.endpoint))
    return options


def server_name(config: ClientConfig) -> str:
    default = peer_name(SERVER_PEER)
    name = (config.server_name or default).lower().rstrip(".")
    if name != default and not name.endswith("." + default):
        raise common_errors.InvalidArgument(f"server_name must be {default} or <server id>.{default}, got {name!r}",
                              field="server_name")
    return name


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()

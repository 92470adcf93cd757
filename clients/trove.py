"""Trove v1.0 JSON ⇄ the SDK's values: the shapes python-troveclient reads and writes, parsed into the
arguments of reddwarf.client.AsyncClient calls and rendered from the messages they return."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from reddwarf.common import errors, states
from reddwarf.v1 import common_pb2, database_pb2, observe_pb2

from .resources import DatabaseSpec, UserSpec

# Trove has no DELETING/RESTORING/STOPPING/STARTING on the wire: its clients know BUILD, SHUTDOWN and REBOOT.
STATUS = {"RESTORING": "BUILD", "DELETING": "SHUTDOWN", "HEALTHY": "ACTIVE", "STOPPING": "REBOOT",
          "STARTING": "REBOOT"}

# The member an error body is wrapped in, by HTTP status: {"itemNotFound": {"code": 404, "message": ...}}.
FAULT_NAMES = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
               408: "requestTimeout", 409: "conflictingRequest", 411: "lengthRequired", 413: "overLimit",
               422: "unprocessableEntity", 429: "overLimit", 500: "instanceFault", 503: "serviceUnavailable"}


class BadInput(errors.InvalidArgument):
    """A body that is JSON but not the shape Trove defines (400)."""


@dataclass(frozen=True)
class InstanceCreate:
    """The arguments of AsyncClient.create_instance that a Trove create body carries."""
    name: str
    flavor: str
    size_gb: int
    databases: list[DatabaseSpec]
    users: list[UserSpec]
    datastore: str = ""
    datastore_version: str = ""
    restore_from: str | None = None
    allowed_cidrs: tuple[str, ...] = ()  # Trove's access.allowed_cidrs (checked by the server)
    tags: dict[str, str] | None = None
    deletion_protection: bool = False
    configuration: str = ""  # a configuration group's id (checked by the server)
    services: tuple[str, ...] = ()  # our extension: extra services in the container ("memcached")
    maintenance_window: tuple[int, str, int] | None = None  # our extension: (weekday, "HH:MM", minutes)


@dataclass(frozen=True)
class InstanceUpdate:
    """The arguments of AsyncClient.update_instance that a Trove PUT/PATCH body carries (None: unchanged)."""
    name: str | None = None
    deletion_protection: bool | None = None
    tags: dict[str, str] | None = None  # replaces them all


@dataclass(frozen=True)
class BackupCreate:
    """The arguments of AsyncClient.create_backup that a Trove backup body carries."""
    instance: str
    name: str
    description: str = ""
    parent: str | None = None
    tags: dict[str, str] | None = None


def fault(code: int, message: str) -> dict[str, Any]:
    return {FAULT_NAMES.get(code, "computeFault"): {"code": code, "message": message}}


def _str(d: dict[str, Any], key: str, where: str, required: bool = True) -> str:
    v = d.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or (required and not v):
        raise BadInput(f"{where}.{key} must be a non-empty string")
    return v


def int_field(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str):
        raise BadInput(f"{where} must be an integer")
    try:
        return int(v)
    except ValueError:
        raise BadInput(f"{where} must be an integer") from None


def ref_id(ref: Any, where: str) -> str:
    """flavorRef / backupRef may be an id or a URL ending in the id."""
    if isinstance(ref, int) and not isinstance(ref, bool):
        ref = str(ref)
    if not isinstance(ref, str) or not ref:
        raise BadInput(f"{where} must be an id or a link")
    return ref.rstrip("/").rsplit("/", 1)[-1]


def _links(request: Request, path: str) -> list[dict[str, str]]:
    base = str(request.base_url).rstrip("/")
    tenant = request.path_params.get("tenant", "")
    return [{"href": f"{base}/v1.0/{tenant}/{path}", "rel": "self"}]


def flavor(f: database_pb2.Flavor, request: Request) -> dict[str, Any]:
    return {"id": f.id, "str_id": f.id, "name": f.id, "ram": f.limits.memory_mb,
            "vcpus": max(1, f.limits.cpu_limit_millicores // 1000) if f.limits.cpu_limit_millicores else 1,
            "disk": f.default_volume_gb, "links": _links(request, f"flavors/{f.id}")}


def datastore(d: database_pb2.Datastore) -> dict[str, Any]:
    return {"id": d.id, "name": d.id, "default_version": d.default_version, "links": [],
            "versions": [{"id": v.version, "name": v.version, "active": v.active, "links": []} for v in d.versions]}


def datastore_ref(kind: str, version: str) -> dict[str, str]:
    """An instance's or backup's datastore as Trove gives it: a version's id is its version string here
    (the /datastores listing gives the same ids)."""
    return {"type": kind, "version": version, "version_id": version, "version_number": version}


# Trove's operating_status (the guest's service status, ServiceStatuses' api_status), from guest health.
_SERVICE_OPERATING = {"BUILDING": "BUILD", "SHUTDOWN": "SHUTDOWN", "CRASHED": "SHUTDOWN", "FAILED": "FAILED",
                      "NEW": "NEW", "UNKNOWN": "ERROR"}


def operating_status(i: database_pb2.Instance) -> str:
    """HEALTHY when mysqld accepts connections, ACTIVE when it runs but does not yet; BUILD while it is being
    made, SHUTDOWN when stopped (or the agent's reports have lapsed), ERROR when no report is to be had."""
    status = states.from_pb(states.InstanceStatus, i.status)
    if status in (states.InstanceStatus.SHUTDOWN, states.InstanceStatus.DELETING):
        return "SHUTDOWN"
    service = i.health.service_state
    if not service or service == states.to_pb(states.ServiceState.UNKNOWN):
        if status in (states.InstanceStatus.BUILD, states.InstanceStatus.RESTORING):
            return "BUILD"
        return "ERROR"  # Trove's UNKNOWN service status reads ERROR
    try:
        state = states.from_pb(states.ServiceState, service)
    except ValueError:  # a state newer than this gateway
        return "ERROR"
    if state == states.ServiceState.RUNNING:
        return "HEALTHY" if i.health.accepting_connections else "ACTIVE"
    return _SERVICE_OPERATING.get(state.value, "ERROR")


def service(i: database_pb2.Instance, name: str) -> dict[str, Any]:
    """An extra service of the instance (our extension; Trove has none): where it answers and the state the
    guest reports for it ("" until the guest has reported)."""
    where = next((e for e in i.endpoints if e.service == name), None)
    state = i.health.services.get(name)
    return {"name": name, "address": where.host if where else "", "port": where.port if where else 0,
            "status": common_pb2.ServiceState.Name(state).removeprefix("SERVICE_STATE_") if state else ""}


def instance(i: database_pb2.Instance, request: Request) -> dict[str, Any]:
    status = states.from_pb(states.InstanceStatus, i.status).value
    mysql = [e for e in i.endpoints if e.service in ("", "mysql")]
    out: dict[str, Any] = {
        "id": i.id, "name": i.display_name, "status": STATUS.get(status, status),
        "flavor": {"id": i.flavor.rsplit("/", 1)[-1], "links": _links(request, f"flavors/{i.flavor.rsplit('/', 1)[-1]}")},
        # Trove's volume "type" (a Cinder volume type there) names our volume driver: loop or iscsi.
        "volume": {"size": i.volume.size_gb, "used": round(i.volume.used_bytes / 2**30, 3),
                   "type": i.volume.driver},
        "datastore": datastore_ref(i.datastore, i.datastore_version),
        "operating_status": operating_status(i),
        "addresses": [{"address": e.host, "type": "private", "port": e.port} for e in mysql],
        "created": i.create_time.ToJsonString() if i.HasField("create_time") else "",
        "updated": i.update_time.ToJsonString() if i.HasField("update_time") else "",
        "ip": [e.host for e in mysql], "port": mysql[0].port if mysql else 0,
        "links": _links(request, f"instances/{i.id}"),
        "tags": dict(i.tags), "deletion_protection": i.deletion_protection,
        "services": [service(i, name) for name in i.services],
    }
    if i.HasField("fault"):
        out["fault"] = {"message": i.fault.message, "details": i.fault.details,
                        "created": i.fault.created.ToJsonString() if i.fault.HasField("created") else ""}
    if i.restored_from:
        out["restorePoint"] = {"backupRef": i.restored_from}
    if i.configuration:
        cid = i.configuration.rsplit("/", 1)[-1]
        out["configuration"] = {"id": cid, "name": cid, "links": _links(request, f"configurations/{cid}")}
    if i.host:  # as Trove's management view names the compute host
        out["host"] = i.host.rsplit("/", 1)[-1]
    # Our extensions (Trove has no maintenance windows): the window, what waits for it, the agent's build.
    if i.maintenance_window.weekday:
        w = i.maintenance_window
        out["maintenance_window"] = {"weekday": w.weekday, "start_time": w.start_time,
                                     "duration_minutes": w.duration_minutes}
        out["pending_maintenance"] = [
            {"kind": m.kind, "state": m.state, "description": m.description,
             "apply_after": m.apply_after.ToJsonString() if m.HasField("apply_after") else ""}
            for m in i.pending_maintenance]
    if i.agent_version:
        out["agent_version"] = i.agent_version
    return out


def window_field(body: dict[str, Any], where: str) -> tuple[int, str, int] | None:
    """body["maintenance_window"] (our extension): {"weekday": 1..7, "start_time": "HH:MM", "duration_minutes":
    N}; its types are checked here, its values by the server (which names the field)."""
    w = body.get("maintenance_window")
    if w is None:
        return None
    if not isinstance(w, dict):
        raise BadInput(f"{where}.maintenance_window must be an object")
    weekday, start, duration = w.get("weekday"), w.get("start_time"), w.get("duration_minutes", 0)
    if not isinstance(weekday, int) or isinstance(weekday, bool):
        raise BadInput(f"{where}.maintenance_window.weekday must be an integer 1 (Monday) .. 7 (Sunday)")
    if not isinstance(start, str):
        raise BadInput(f"{where}.maintenance_window.start_time must be a string HH:MM (UTC)")
    if duration is None:
        duration = 0
    if not isinstance(duration, int) or isinstance(duration, bool):
        raise BadInput(f"{where}.maintenance_window.duration_minutes must be an integer")
    return weekday, start, duration


def _objects(items: Any, where: str) -> list[dict[str, Any]]:
    """A non-empty JSON list of objects, or BadInput naming where it is not one."""
    if not isinstance(items, list) or not items:
        raise BadInput(f"{where} must be a non-empty list")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadInput(f"{where}[{n}] must be an object")
    return items


def databases(items: Any) -> list[DatabaseSpec]:
    return [DatabaseSpec(_str(d, "name", f"databases[{n}]"),
                         character_set=_str(d, "character_set", f"databases[{n}]", False),
                         collation=_str(d, "collate", f"databases[{n}]", False))
            for n, d in enumerate(_objects(items, "databases"))]


def users(items: Any) -> list[UserSpec]:
    """Users as Trove gives them; host "" (none given) means any host, as it does to the server."""
    out = []
    for n, u in enumerate(_objects(items, "users")):
        dbs = u.get("databases", [])
        if not isinstance(dbs, list):
            raise BadInput(f"users[{n}].databases must be a list")
        out.append(UserSpec(_str(u, "name", f"users[{n}]"), password=_str(u, "password", f"users[{n}]"),
                            host=_str(u, "host", f"users[{n}]", False),
                            databases=tuple(d.name for d in databases(dbs)) if dbs else ()))
    return out


def database(d: common_pb2.Database) -> dict[str, Any]:
    return {"name": d.database, "character_set": d.character_set, "collate": d.collation}


def user(u: common_pb2.User) -> dict[str, Any]:
    return {"name": u.user, "host": u.host or "%", "databases": [{"name": d} for d in u.databases]}


def create_request(body: Any) -> InstanceCreate:
    if not isinstance(body, dict):
        raise BadInput("instance must be an object")
    name = _str(body, "name", "instance")
    flavor_id = ref_id(body.get("flavorRef"), "instance.flavorRef")
    vol = body.get("volume", {})
    if not isinstance(vol, dict):
        raise BadInput("instance.volume must be an object")
    size = int_field(vol.get("size", 0), "instance.volume.size")
    ds = body.get("datastore", {}) or {}
    if not isinstance(ds, dict):
        raise BadInput("instance.datastore must be an object")
    datastore = _str(ds, "type", "instance.datastore", False)
    version = _str(ds, "version", "instance.datastore", False)
    dbs = databases(body["databases"]) if body.get("databases") else []
    accounts = users(body["users"]) if body.get("users") else []
    restore_from = None
    rp = body.get("restorePoint")
    if rp is not None:
        if not isinstance(rp, dict):
            raise BadInput("instance.restorePoint must be an object")
        restore_from = ref_id(rp.get("backupRef"), "instance.restorePoint.backupRef")
    access = body.get("access") or {}
    if not isinstance(access, dict):
        raise BadInput("instance.access must be an object")
    cidrs = access.get("allowed_cidrs") or []
    if not isinstance(cidrs, list) or not all(isinstance(c, str) for c in cidrs):
        raise BadInput("instance.access.allowed_cidrs must be a list of strings")
    configuration = ref_id(body["configuration"], "instance.configuration") if body.get("configuration") else ""
    return InstanceCreate(name, flavor_id, size, dbs, accounts, datastore, version, restore_from, tuple(cidrs),
                          tags_field(body, "instance"), bool_field(body, "deletion_protection", "instance") or False,
                          configuration, extra_services(body.get("services")), window_field(body, "instance"))


def tags_field(body: dict[str, Any], where: str) -> dict[str, str] | None:
    """body["tags"]: an object of strings (the server validates keys and values), or None when absent."""
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tags.items()):
        raise BadInput(f"{where}.tags must be an object of strings")
    return tags


def bool_field(body: dict[str, Any], key: str, where: str) -> bool | None:
    v = body.get(key)
    if v is not None and not isinstance(v, bool):
        raise BadInput(f"{where}.{key} must be true or false")
    return v


# What an instance PUT/PATCH may carry besides `configuration` (the gateway attaches or detaches a group for
# it, and upgrades for `datastore_version`). Trove's other members (replica_of, access) are refused by name.
UPDATABLE = ("name", "deletion_protection", "tags")


def update_request(body: dict[str, Any]) -> InstanceUpdate:
    unknown = sorted(set(body) - set(UPDATABLE))
    if unknown:
        raise BadInput(f"instance.{unknown[0]} cannot be changed here; an update takes {', '.join(UPDATABLE)}")
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise BadInput("instance.name must be a string")
    update = InstanceUpdate(name, bool_field(body, "deletion_protection", "instance"), tags_field(body, "instance"))
    if update == InstanceUpdate():
        raise BadInput(f"instance: nothing to change; give one of {', '.join(UPDATABLE)}")
    return update


@dataclass(frozen=True)
class BackupUpdate:
    """The arguments of AsyncClient.update_backup that a PUT/PATCH /backups/{id} body carries (None: unchanged;
    Trove has no such call: this is Red Dwarf's, in Trove's shape)."""
    name: str | None = None
    description: str | None = None
    tags: dict[str, str] | None = None


def backup_update_request(body: dict[str, Any]) -> BackupUpdate:
    fields = ("name", "description", "tags")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadInput(f"backup.{unknown[0]} cannot be changed; an update takes {', '.join(fields)}")
    for key in ("name", "description"):
        if body.get(key) is not None and not isinstance(body[key], str):
            raise BadInput(f"backup.{key} must be a string")
    update = BackupUpdate(body.get("name"), body.get("description"), tags_field(body, "backup"))
    if update == BackupUpdate():
        raise BadInput(f"backup: nothing to change; give one of {', '.join(fields)}")
    return update


def extra_services(items: Any) -> tuple[str, ...]:
    """Our extension of Trove's create body: "services": ["memcached"] (or [{"name": "memcached"}]); the
    server checks the names."""
    if items is None:
        return ()
    if not isinstance(items, list):
        raise BadInput("instance.services must be a list")
    out = []
    for n, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else item
        if not isinstance(name, str) or not name:
            raise BadInput(f"instance.services[{n}] must be a service name or an object with a name")
        out.append(name)
    return tuple(out)


def backup_request(body: Any) -> BackupCreate:
    if not isinstance(body, dict):
        raise BadInput("backup must be an object")
    name = _str(body, "name", "backup")
    instance = ref_id(body.get("instance"), "backup.instance")
    return BackupCreate(instance, name, description=_str(body, "description", "backup", False),
                        parent=ref_id(body["parent_id"], "backup.parent_id") if body.get("parent_id") else None,
                        tags=tags_field(body, "backup"))


def backup(b: database_pb2.Backup) -> dict[str, Any]:
    st = states.from_pb(states.BackupStatus, b.status).value
    return {"id": b.id, "name": b.display_name, "description": b.description,
            "instance_id": b.instance.rsplit("/", 1)[-1], "status": st,
            "parent_id": b.parent.rsplit("/", 1)[-1] if b.parent else None, "size": round(b.size_bytes / 2**30, 6),
            "locationRef": b.location, "created": b.create_time.ToJsonString() if b.HasField("create_time") else "",
            "updated": b.update_time.ToJsonString() if b.HasField("update_time") else "",
            "datastore": datastore_ref(b.datastore, b.datastore_version), "tags": dict(b.tags)}


def limits(t: database_pb2.TenantLimits) -> list[dict[str, Any]]:
    """Trove's GET /limits list: first the "ABSOLUTE" entry of quotas (max_*), then one entry per rate limit
    (python-troveclient pops the first and shows value/verb/remaining/unit of the rest)."""
    absolute: dict[str, Any] = {"verb": "ABSOLUTE", "max_instances": t.max_instances, "max_backups": t.max_backups,
                                "max_volumes": t.max_volume_gb, "max_ram": t.max_memory_mb}
    return [absolute] + [
        {"verb": r.verb, "uri": r.uri, "regex": r.regex, "value": r.value, "unit": r.unit, "remaining": r.remaining,
         "nextAvailable": r.next_available.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")} for r in t.rates]


# -- guest logs (Trove's /instances/{id}/log) ----------------------------------------------------------
LOG_FLAGS = ("enable", "disable", "publish", "discard")


@dataclass(frozen=True)
class LogAction:
    """A Trove log action body: {"name": "slow_query", "enable": 1} (python-troveclient's log_action)."""
    name: str
    enable: bool = False
    disable: bool = False
    publish: bool = False
    discard: bool = False


def log_action(body: Any) -> LogAction:
    if not isinstance(body, dict):
        raise BadInput("request body must be a JSON object with the log's name")
    name = _str(body, "name", "log")
    unknown = sorted(set(body) - {"name", *LOG_FLAGS})
    if unknown:
        raise BadInput(f"unknown member(s) of a log action: {', '.join(unknown)}")
    flags: dict[str, bool] = {}
    for f in LOG_FLAGS:
        v = body.get(f, 0)
        if v not in (0, 1, True, False):
            raise BadInput(f"log.{f} must be 0 or 1")
        flags[f] = bool(v)
    if flags["enable"] and flags["disable"]:
        raise BadInput("log.enable and log.disable cannot both be set")
    return LogAction(name, **flags)


def guest_log(g: observe_pb2.GuestLog, saved: observe_pb2.SavedLog | None = None) -> dict[str, Any]:
    """Trove's log view. "published" is what a save (publish) just stored, "pending" what the guest holds
    beyond it; container and prefix say where in the backup store the saved copy is."""
    published = saved.size_bytes if saved is not None else 0
    return {"name": g.log, "type": g.type, "status": "Published" if saved is not None else g.status,
            "published": published, "pending": max(0, g.size_bytes - published),
            "container": saved.location.rsplit("/", 1)[0] if saved is not None else "",
            "prefix": saved.object_id if saved is not None else "", "metafile": ""}

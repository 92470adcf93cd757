"""Validation of a CreateInstanceRequest before anything is stored: the display name, the request id, the
extra services, the access networks, the tags, and the initial databases and users (names, passwords, no duplicates, grants
only on databases it creates, hosts inside the access networks); and of the update masks of
UpdateInstance / UpdateBackup."""
from __future__ import annotations

from collections.abc import Sequence

from reddwarf.common import cidrs, names
from reddwarf.common.errors import InvalidArgument
from reddwarf.v1 import database_pb2

from . import tags

MAX_NAME = 255
MAX_REQUEST_ID = 64
# Services a create may ask for beside the datastore (Instance.services).
EXTRA_SERVICES = ("memcached",)
# What UpdateInstance may change ("tags.<key>" too).
INSTANCE_PATHS = ("display_name", "deletion_protection", "maintenance_window", "tags")


def display_name_problem(name: str) -> str | None:
    """Why a display name (instance or backup) is refused, or None."""
    if not name.strip():
        return "is required"
    if len(name) > MAX_NAME or any(ord(c) < 32 for c in name):
        return f"must be at most {MAX_NAME} printable characters"
    return None


def mask_paths(paths: Sequence[str], allowed: Sequence[str], field: str = "update_mask") -> list[str]:
    """The update mask's paths, each one of `allowed` (or "tags.<key>" when "tags" is), at least one."""
    if not paths:
        raise InvalidArgument(f"{field} must name at least one of: {', '.join(allowed)}", field=field)
    for path in paths:
        if path not in allowed and not (path.startswith("tags.") and "tags" in allowed):
            raise InvalidArgument(f"{field}: {path[:80]!r} cannot be changed; the paths are "
                                  f"{', '.join(allowed)}" + (" and tags.<key>" if "tags" in allowed else ""),
                                  field=field)
    if "tags" in paths and any(p.startswith("tags.") for p in paths):
        raise InvalidArgument(f"{field}: give either tags (all of them) or tags.<key> paths, not both", field=field)
    if len(set(paths)) != len(paths):
        raise InvalidArgument(f"{field}: a path is listed twice", field=field)
    return list(paths)


def validate_create(req: database_pb2.CreateInstanceRequest) -> None:
    inst = req.instance
    v: list[tuple[str, str]] = []
    problem = display_name_problem(inst.display_name)
    if problem:
        v.append(("instance.display_name", problem))
    if not inst.flavor:
        v.append(("instance.flavor", "is required"))
    if len(req.request_id) > MAX_REQUEST_ID:
        v.append(("request_id", f"must be at most {MAX_REQUEST_ID} characters"))
    for i, svc in enumerate(inst.services):
        if svc not in EXTRA_SERVICES:
            v.append((f"instance.services[{i}]", f"must be one of {', '.join(EXTRA_SERVICES)}"))
        elif svc in inst.services[:i]:
            v.append((f"instance.services[{i}]", f"lists {svc!r} twice"))
    if v:
        raise InvalidArgument(f"{v[0][0]} {v[0][1]}", violations=v)
    tags.validate_tags(inst.tags, "instance.tags")
    seen: set[str] = set()
    for i, d in enumerate(req.databases):
        names.validate_database(d.database, f"databases[{i}].database")
        if d.database in seen:
            raise InvalidArgument(f"database {d.database!r} is listed twice", field=f"databases[{i}].database")
        seen.add(d.database)
    nets = cidrs.parse_cidrs(req.access.allowed_cidrs, "access.allowed_cidrs")
    users: set[tuple[str, str]] = set()
    for i, u in enumerate(req.users):
        names.validate_user(u.user, f"users[{i}].user")
        if u.host:
            names.validate_host(u.host, f"users[{i}].host")
            if nets and u.host != "%" and not cidrs.host_within(u.host, nets):
                raise InvalidArgument(f"host {u.host!r} is outside access.allowed_cidrs", field=f"users[{i}].host")
        names.validate_password(u.password, f"users[{i}].password")
        key = (u.user, u.host or "%")
        if key in users:
            raise InvalidArgument(f"user {u.user!r} is listed twice", field=f"users[{i}].user")
        users.add(key)
        for j, grant in enumerate(u.databases):
            names.validate_database(grant, f"users[{i}].databases[{j}]")
            if grant not in seen:
                raise InvalidArgument(f"user {u.user!r} is granted {grant!r}, which this request does not create",
                                      field=f"users[{i}].databases[{j}]")


def validate_update(req: database_pb2.UpdateInstanceRequest) -> list[str]:
    """The update's mask paths, once the mask and the new values it names are valid."""
    paths = mask_paths(req.update_mask.paths, INSTANCE_PATHS)
    if "display_name" in paths:
        problem = display_name_problem(req.instance.display_name)
        if problem:
            raise InvalidArgument(f"instance.display_name {problem}", field="instance.display_name")
    tags.validate_tags(req.instance.tags, "instance.tags")
    return paths

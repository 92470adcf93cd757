"""Validation of a CreateInstanceRequest before anything is stored: the display name, the request id, the
extra services, the access networks, and the initial databases and users (names, passwords, no duplicates, grants only on
databases it creates, hosts inside the access networks)."""
from __future__ import annotations

from reddwarf.common import cidrs, names
from reddwarf.common.errors import InvalidArgument
from reddwarf.v1 import database_pb2

MAX_NAME = 255
MAX_REQUEST_ID = 64
# Services a create may ask for beside the datastore (Instance.services).
EXTRA_SERVICES = ("memcached",)


def validate_create(req: database_pb2.CreateInstanceRequest) -> None:
    inst = req.instance
    v: list[tuple[str, str]] = []
    if not inst.display_name.strip():
        v.append(("instance.display_name", "is required"))
    elif len(inst.display_name) > MAX_NAME or any(ord(c) < 32 for c in inst.display_name):
        v.append(("instance.display_name", f"must be at most {MAX_NAME} printable characters"))
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

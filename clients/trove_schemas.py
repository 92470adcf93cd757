"""The gateway's OpenAPI 3.1 document: every route's request and response bodies as JSON Schema, so generated
clients and schemathesis can check them. The shapes are those clients/trove.py writes and parses (Trove's
v1.0 JSON and our extensions: an instance's `services`, a user's listing without internal accounts).

Objects allow properties beyond those named (Trove clients send and read more than we use); what is named
as required is what the gateway always writes, so a response missing one fails validation."""
from __future__ import annotations

import re
from typing import Any

from reddwarf.common import states

from .trove import FAULT_NAMES, STATUS

Schema = dict[str, Any]

STRING: Schema = {"type": "string"}
INTEGER: Schema = {"type": "integer"}
NUMBER: Schema = {"type": "number"}
BOOLEAN: Schema = {"type": "boolean"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None,
        additional: bool = True) -> Schema:
    out: Schema = {"type": "object", "properties": {**required, **(optional or {})},
                   "required": sorted(required)}
    if not additional:
        out["additionalProperties"] = False
    return out


def array(items: Schema, min_items: int = 0) -> Schema:
    out: Schema = {"type": "array", "items": items}
    if min_items:
        out["minItems"] = min_items
    return out


def nullable(s: Schema) -> Schema:
    """s or null, kept flat: {"type": T, ...} becomes {"type": [T, "null"], ...} (its other keywords apply to
    T's values only) and an anyOf gains a null branch. Nesting costs generators a recursion level each
    (schemathesis's coverage phase hit CPython 3.11's recursion limit, and then its ast bug, on nested
    anyOf/$ref bodies), so request bodies name no component through a nullable either."""
    if isinstance(s.get("type"), str):
        return {**s, "type": [s["type"], "null"]}
    if "anyOf" in s:
        return {**s, "anyOf": [*s["anyOf"], {"type": "null"}]}
    return {"anyOf": [s, {"type": "null"}]}


# Inline (not $ref) forms of two components, for request members that may also be null.
REF: Schema = {"anyOf": [{"type": "string", "minLength": 1}, INTEGER]}
TAGS: Schema = {"type": "object", "additionalProperties": STRING}
# Our extension: a weekly maintenance window (weekday 1 = Monday .. 7, "HH:MM" UTC, minutes 30..1440).
WINDOW: Schema = obj({"weekday": INTEGER, "start_time": STRING}, {"duration_minutes": INTEGER})


# What the gateway answers for an instance's status: Trove's values (DELETING and RESTORING mapped).
INSTANCE_STATUSES = sorted({STATUS.get(s.value, s.value) for s in states.InstanceStatus})
BACKUP_STATUSES = sorted(s.value for s in states.BackupStatus)
OPERATING_STATUSES = ["ACTIVE", "BUILD", "ERROR", "FAILED", "HEALTHY", "NEW", "SHUTDOWN"]
SERVICE_STATES = sorted(["", *(s.value for s in states.ServiceState)])

COMPONENTS: dict[str, Schema] = {
    "Link": obj({"href": STRING, "rel": STRING}),
    # Labels on instances and backups (the server checks their count and characters).
    "Tags": TAGS,
    "FaultBody": obj({"code": INTEGER, "message": STRING}),
    # {"itemNotFound": {"code": 404, "message": "..."}}: one member, named by the HTTP status.
    "Fault": {"type": "object", "minProperties": 1, "maxProperties": 1,
              "propertyNames": {"enum": sorted(set(FAULT_NAMES.values()) | {"computeFault"})},
              "additionalProperties": ref("FaultBody")},
    "Version": obj({"id": STRING, "status": STRING, "updated": STRING, "links": array(ref("Link"))}),
    "Flavor": obj({"id": STRING, "str_id": STRING, "name": STRING, "ram": INTEGER, "vcpus": INTEGER,
                   "disk": INTEGER, "links": array(ref("Link"))}),
    "DatastoreVersion": obj({"id": STRING, "name": STRING, "active": BOOLEAN, "links": array(ref("Link"))}),
    "Datastore": obj({"id": STRING, "name": STRING, "default_version": STRING, "links": array(ref("Link")),
                      "versions": array(ref("DatastoreVersion"))}),
    "DatastoreRef": obj({"type": STRING, "version": STRING, "version_id": STRING, "version_number": STRING}),
    "Address": obj({"address": STRING, "type": STRING, "port": INTEGER}),
    "InstanceService": obj({"name": STRING, "address": STRING, "port": INTEGER,
                            "status": {"type": "string", "enum": SERVICE_STATES}}),
    "Instance": obj(
        {"id": STRING, "name": STRING, "status": {"type": "string", "enum": INSTANCE_STATUSES},
         "flavor": obj({"id": STRING, "links": array(ref("Link"))}),
         "volume": obj({"size": INTEGER, "used": NUMBER}), "datastore": ref("DatastoreRef"),
         "operating_status": {"type": "string", "enum": OPERATING_STATUSES},
         "addresses": array(ref("Address")), "created": STRING, "updated": STRING, "ip": array(STRING),
         "port": INTEGER, "links": array(ref("Link")), "services": array(ref("InstanceService")),
         "tags": ref("Tags"), "deletion_protection": BOOLEAN},
        {"fault": obj({"message": STRING, "details": STRING, "created": STRING}),
         "restorePoint": obj({"backupRef": STRING}),
         "configuration": obj({"id": STRING, "name": STRING, "links": array(ref("Link"))}),
         # Our extensions (Trove has no maintenance windows).
         "maintenance_window": obj({"weekday": INTEGER, "start_time": STRING, "duration_minutes": INTEGER}),
         "pending_maintenance": array(obj({"kind": STRING, "state": STRING, "description": STRING,
                                           "apply_after": STRING})),
         "agent_version": STRING}),
    "Database": obj({"name": STRING, "character_set": STRING, "collate": STRING}),
    "DatabaseName": obj({"name": STRING}),
    "User": obj({"name": STRING, "host": STRING, "databases": array(ref("DatabaseName"))}),
    "Backup": obj({"id": STRING, "name": STRING, "description": STRING, "instance_id": STRING,
                   "status": {"type": "string", "enum": BACKUP_STATUSES}, "parent_id": nullable(STRING),
                   "size": NUMBER, "locationRef": STRING, "created": STRING, "updated": STRING,
                   "datastore": ref("DatastoreRef"), "tags": ref("Tags")}),
    "AbsoluteLimits": obj({"verb": {"const": "ABSOLUTE"}, "max_instances": INTEGER, "max_backups": INTEGER,
                           "max_volumes": INTEGER, "max_ram": INTEGER}),
    "RateLimit": obj({"verb": STRING, "uri": STRING, "regex": STRING, "value": INTEGER, "unit": STRING,
                      "remaining": INTEGER, "nextAvailable": STRING}),
    # Configuration groups (clients/trove_configurations.py): values typed by their parameter's rule.
    "ConfigurationValues": {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}},
    "Configuration": obj({"id": STRING, "name": STRING, "description": nullable(STRING), "datastore_name": STRING,
                          "datastore_version_name": STRING, "datastore_version_id": STRING,
                          "datastore_version_number": STRING, "values": ref("ConfigurationValues"),
                          "instance_count": INTEGER, "created": STRING, "updated": STRING,
                          "links": array(ref("Link"))}),
    "ConfigurationParameter": obj({"name": STRING, "type": STRING, "restart_required": BOOLEAN,
                                   "datastore_version_id": STRING, "description": STRING},
                                  {"min": NUMBER, "max": NUMBER, "allowed_values": array(STRING)}),
    "GuestLog": obj({"name": STRING, "type": STRING, "status": STRING, "published": INTEGER, "pending": INTEGER,
                     "container": STRING, "prefix": STRING, "metafile": STRING}),
    # Request bodies.
    "Ref": REF,
    # Optional members may be null: the gateway reads null as absent, as Trove does.
    "DatabaseCreate": obj({"name": {"type": "string", "minLength": 1}},
                          {"character_set": nullable(STRING), "collate": nullable(STRING)}),
    "UserCreate": obj({"name": {"type": "string", "minLength": 1}, "password": {"type": "string", "minLength": 1}},
                      {"host": nullable(STRING), "databases": array(ref("DatabaseCreate"))}),
    "InstanceCreate": obj(
        {"name": {"type": "string", "minLength": 1}, "flavorRef": ref("Ref")},
        {"volume": obj({}, {"size": {"anyOf": [INTEGER, STRING]}, "type": nullable(STRING)}),
         "databases": array(ref("DatabaseCreate")), "users": array(ref("UserCreate")),
         "datastore": nullable(obj({}, {"type": nullable(STRING), "version": nullable(STRING)})),
         "restorePoint": obj({"backupRef": ref("Ref")}),
         "access": obj({}, {"allowed_cidrs": array(STRING), "is_public": BOOLEAN}),
         "tags": nullable(TAGS), "deletion_protection": nullable(BOOLEAN),
         "configuration": nullable(REF),
         # Our extension (Trove has none): when pending maintenance runs, a weekly window in UTC.
         "maintenance_window": nullable(WINDOW),
         # Our extension (Trove has none): extra services in the instance's container.
         "services": {"type": "array", "description": 'Extra services beside MySQL in the container: "memcached".',
                      "items": {"anyOf": [{"type": "string", "enum": ["memcached"]},
                                          obj({"name": {"type": "string", "enum": ["memcached"]}})]}}}),
    # Only these members; at least one of them.
    # `configuration` (an id attaches the group, null detaches it) goes alone, and so does `datastore_version`
    # (Trove's upgrade: PATCH {"instance": {"datastore_version": "11.8"}}).
    "InstanceUpdate": {**obj({}, {"name": nullable(STRING), "deletion_protection": nullable(BOOLEAN),
                                  "tags": nullable(TAGS), "configuration": nullable(REF),
                                  "maintenance_window": WINDOW,
                                  "datastore_version": {"type": "string", "minLength": 1}},
                             additional=False), "minProperties": 1},
    "BackupUpdate": {**obj({}, {"name": nullable(STRING), "description": nullable(STRING),
                                "tags": nullable(TAGS)}, additional=False), "minProperties": 1},
    "InstanceAction": {"anyOf": [
        obj({"restart": {"type": "object"}}), obj({"stop": {"type": "object"}}), obj({"start": {"type": "object"}}),
        obj({"apply_pending_maintenance": obj({}, {"kinds": array(STRING)})}),
        obj({"resize": {"anyOf": [obj({"flavorRef": ref("Ref")}),
                                  obj({"volume": obj({"size": {"anyOf": [INTEGER, STRING]}})})]}}),
    ], "minProperties": 1, "maxProperties": 1},
    "ConfigurationCreate": obj({"name": {"type": "string", "minLength": 1}},
                               {"values": ref("ConfigurationValues"), "description": nullable(STRING),
                                "datastore": nullable(obj({}, {"type": nullable(STRING), "version": nullable(STRING),
                                                               "version_number": nullable(STRING)}))}),
    "ConfigurationUpdate": obj({}, {"values": ref("ConfigurationValues"), "name": nullable(STRING),
                                    "description": nullable(STRING)}),
    # {"name": "slow_query", "enable": 1}: at most one of enable/disable; none of them shows the log.
    "LogAction": obj({"name": {"type": "string", "minLength": 1}},
                     {f: {"enum": [0, 1, True, False]} for f in ("enable", "disable", "publish", "discard")},
                     additional=False),
    "BackupCreate": obj({"name": {"type": "string", "minLength": 1}, "instance": ref("Ref")},
                        {"description": nullable(STRING), "parent_id": nullable(STRING)}),
}


def body(**members: Schema) -> Schema:
    """A JSON body whose every member is required: {"instance": {...}}."""
    return obj(members)


# Each operation: (request body schema or None, {HTTP status: response body schema or None (no body)}).
# Paths are relative to /v1.0/{tenant}, except the version documents.
Operation = tuple[Schema | None, dict[int, Schema | None]]
INSTANCE = "/instances/{instance_id}"
GROUP = "/configurations/{configuration_id}"
PARAMETERS = obj({"configuration-parameters": array(ref("ConfigurationParameter"))})
OPERATIONS: dict[tuple[str, str], Operation] = {
    ("/", "GET"): (None, {200: body(versions=array(ref("Version")))}),
    ("/v1.0", "GET"): (None, {200: body(version=ref("Version"))}),
    ("/v1.0/", "GET"): (None, {200: body(version=ref("Version"))}),
    # The "ABSOLUTE" entry first, then one per rate limit (python-troveclient pops the first).
    ("/limits", "GET"): (None, {200: body(limits={"type": "array", "minItems": 1, "items": {
        "anyOf": [ref("AbsoluteLimits"), ref("RateLimit")]}})}),
    ("/flavors", "GET"): (None, {200: body(flavors=array(ref("Flavor")))}),
    ("/flavors/{flavor_id}", "GET"): (None, {200: body(flavor=ref("Flavor"))}),
    ("/datastores", "GET"): (None, {200: body(datastores=array(ref("Datastore")))}),
    ("/datastores/{datastore}/versions", "GET"): (None, {200: body(versions=array(ref("DatastoreVersion")))}),
    ("/instances", "GET"): (None, {200: body(instances=array(ref("Instance")))}),
    ("/instances", "POST"): (body(instance=ref("InstanceCreate")), {200: body(instance=ref("Instance"))}),
    (INSTANCE, "GET"): (None, {200: body(instance=ref("Instance"))}),
    (INSTANCE, "DELETE"): (None, {202: None}),
    (INSTANCE, "PUT"): (body(instance=ref("InstanceUpdate")), {202: None}),
    (INSTANCE, "PATCH"): (body(instance=ref("InstanceUpdate")), {202: None}),
    (INSTANCE + "/action", "POST"): (ref("InstanceAction"), {202: None}),
    ("/mgmt" + INSTANCE + "/action", "POST"): (ref("InstanceAction"), {202: None}),
    (INSTANCE + "/databases", "GET"): (None, {200: body(databases=array(ref("Database")))}),
    (INSTANCE + "/databases", "POST"): (body(databases=array(ref("DatabaseCreate"), 1)), {202: None}),
    (INSTANCE + "/databases/{name}", "DELETE"): (None, {202: None}),
    (INSTANCE + "/users", "GET"): (None, {200: body(users=array(ref("User")))}),
    (INSTANCE + "/users", "POST"): (body(users=array(ref("UserCreate"), 1)), {202: None}),
    (INSTANCE + "/users", "PUT"): (body(users=array(ref("UserCreate"), 1)), {202: None}),
    (INSTANCE + "/users/{user}", "GET"): (None, {200: body(user=ref("User"))}),
    (INSTANCE + "/users/{user}", "DELETE"): (None, {202: None}),
    (INSTANCE + "/users/{user}/databases", "GET"): (None, {200: body(databases=array(ref("DatabaseName")))}),
    (INSTANCE + "/users/{user}/databases", "PUT"): (body(databases=array(ref("DatabaseCreate"), 1)), {202: None}),
    (INSTANCE + "/users/{user}/databases/{name}", "DELETE"): (None, {202: None}),
    (INSTANCE + "/root", "POST"): (None, {200: body(user=obj({"name": STRING, "password": STRING}))}),
    (INSTANCE + "/root", "GET"): (None, {200: body(rootEnabled=BOOLEAN)}),
    (INSTANCE + "/root", "DELETE"): (None, {204: None}),
    (INSTANCE + "/log", "GET"): (None, {200: body(logs=array(ref("GuestLog")))}),
    (INSTANCE + "/log", "POST"): (ref("LogAction"), {200: body(log=ref("GuestLog"))}),
    (INSTANCE + "/configuration", "GET"): (None, {200: body(instance=obj({
        "configuration": ref("ConfigurationValues")}))}),
    ("/configurations", "GET"): (None, {200: body(configurations=array(ref("Configuration")))}),
    ("/configurations", "POST"): (body(configuration=ref("ConfigurationCreate")),
                                  {200: body(configuration=ref("Configuration"))}),
    (GROUP, "GET"): (None, {200: body(configuration=ref("Configuration"))}),
    (GROUP, "PUT"): (body(configuration=ref("ConfigurationUpdate")), {202: None}),
    (GROUP, "PATCH"): (body(configuration=ref("ConfigurationUpdate")), {202: None}),
    (GROUP, "DELETE"): (None, {202: None}),
    (GROUP + "/instances", "GET"): (None, {200: body(instances=array(obj({"id": STRING, "name": STRING})))}),
    ("/datastores/{datastore}/versions/{version}/parameters", "GET"): (None, {200: PARAMETERS}),
    ("/datastores/{datastore}/versions/{version}/parameters/{name}", "GET"):
        (None, {200: ref("ConfigurationParameter")}),
    ("/datastores/versions/{version}/parameters", "GET"): (None, {200: PARAMETERS}),
    ("/datastores/versions/{version}/parameters/{name}", "GET"): (None, {200: ref("ConfigurationParameter")}),
    ("/backups", "GET"): (None, {200: body(backups=array(ref("Backup")))}),
    ("/backups", "POST"): (body(backup=ref("BackupCreate")), {202: body(backup=ref("Backup"))}),
    ("/backups/{backup_id}", "GET"): (None, {200: body(backup=ref("Backup"))}),
    ("/backups/{backup_id}", "DELETE"): (None, {202: None}),
    ("/backups/{backup_id}", "PUT"): (body(backup=ref("BackupUpdate")), {200: body(backup=ref("Backup"))}),
    ("/backups/{backup_id}", "PATCH"): (body(backup=ref("BackupUpdate")), {200: body(backup=ref("Backup"))}),
}
_TAG_FILTER = {"name": "tag", "in": "query", "required": False, "style": "form", "explode": True,
               "description": '"key=value" or "key"; repeated: every one must match',
               "schema": array(STRING)}
# Query parameters, by the same keys.
QUERY: dict[tuple[str, str], list[Schema]] = {
    ("/instances", "GET"): [_TAG_FILTER],
    ("/backups", "GET"): [_TAG_FILTER],
    (INSTANCE, "DELETE"): [{"name": "final_backup", "in": "query", "required": False, "schema": STRING,
                            "description": "take a backup of this name first; nothing is deleted if it fails"}]}
TENANT_PREFIX = "/v1.0/{tenant}"
# Every error the gateway answers with (the error table's HTTP statuses, and the body guard's).
ERRORS = {400: "bad request", 401: "no or an unknown token", 403: "not the token's tenant, or not allowed",
          404: "no such resource", 405: "method not allowed", 408: "body too slow", 409: "already exists",
          411: "length required", 413: "body too large, or over quota", 422: "not in a state that allows it",
          429: "rate limited (Retry-After)", 500: "internal error", 503: "unavailable, try again"}


def _relative(path: str) -> str:
    return path.removeprefix(TENANT_PREFIX) if path.startswith(TENANT_PREFIX + "/") else path


def operation(path: str, method: str) -> Operation | None:
    """The declared schemas of a route (its full path), or None if it has none."""
    return OPERATIONS.get((_relative(path), method.upper()))


def _json(schema: Schema) -> Schema:
    return {"content": {"application/json": {"schema": schema}}}


def openapi(routes: list[tuple[str, list[str]]]) -> Schema:
    """The document for the given (path, methods) routes. A route with no declared schemas is still listed
    (with any JSON object as its body) and marked `x-undeclared`, so the document never hides a route."""
    paths: dict[str, Any] = {}
    for path, methods in routes:
        params = [{"name": p.strip("{}"), "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in path.split("/") if p.startswith("{")]
        tenant_scoped = path.startswith(TENANT_PREFIX + "/")
        if tenant_scoped:
            params.append({"name": "X-Auth-Token", "in": "header", "required": True, "schema": STRING})
        for m in methods:
            declared = operation(path, m)
            request, responses = declared or ({"type": "object"} if m in ("POST", "PUT", "PATCH") else None,
                                              {200: {"type": "object"}})
            op: Schema = {"operationId": m.lower() + re.sub(r"[{}.]", "", path).replace("/", "_"),
                          "parameters": params + QUERY.get((_relative(path), m.upper()), []),
                          "responses": {str(code): ({"description": "ok", **_json(s)} if s is not None else
                                                    {"description": "accepted, no body"})
                                        for code, s in responses.items()}}
            if tenant_scoped:
                op["responses"].update({str(code): {"description": text, **_json(ref("Fault"))}
                                        for code, text in ERRORS.items()})
            if declared is None:
                op["x-undeclared"] = True
            if request is not None:
                op["requestBody"] = {"required": True, **_json(request)}
            paths.setdefault(path, {})[m.lower()] = op
    return {"openapi": "3.1.0",
            "info": {"title": "Red Dwarf — Trove v1.0 compatible REST gateway", "version": "1.0"},
            "paths": paths, "components": {"schemas": COMPONENTS}}

"""Trove v1.0 JSON for configuration groups and parameters ⇄ the SDK's values: the shapes python-troveclient
and its `openstack database configuration ...` commands send and read.

Trove's values are typed JSON (200, 2.5, true, "STRICT_TRANS_TABLES"); the API carries text, so values are
turned into text here (true → ON) and back into their parameter's JSON type on the way out. The server
checks them; anything that is not a scalar is refused here already, naming where it was.
"""
from __future__ import annotations

from typing import Any

from starlette.requests import Request

from reddwarf.common import parameters
from reddwarf.v1 import configuration_pb2

from .trove import BadInput, _links, _str


def values_from_json(values: Any, where: str) -> dict[str, str]:
    """A Trove `values` object as the API's text values; BadInput for a non-object or a non-scalar value."""
    if not isinstance(values, dict):
        raise BadInput(f"{where} must be an object of parameter: value")
    out = {}
    for name, v in values.items():
        if isinstance(v, bool):
            out[name] = "ON" if v else "OFF"
        elif isinstance(v, int | float | str):
            out[name] = str(v)
        else:
            raise BadInput(f"{where}.{name} must be a number, a string or a boolean")
    return out


def typed(datastore: str, version: str, values: dict[str, str]) -> dict[str, Any]:
    """Values as Trove shows them: integers and floats as JSON numbers, booleans as true/false."""
    rules = parameters.RULES.get((datastore, version), {})
    out: dict[str, Any] = {}
    for name, v in values.items():
        r = rules.get(name)
        try:
            if r is not None and r.type == "integer":
                out[name] = int(v)
            elif r is not None and r.type == "float":
                out[name] = float(v)
            elif r is not None and r.type == "boolean":
                out[name] = v == "ON"
            else:
                out[name] = v
        except ValueError:
            out[name] = v
    return out


def configuration(g: configuration_pb2.Configuration, request: Request) -> dict[str, Any]:
    return {"id": g.id, "name": g.display_name, "description": g.description or None,
            "datastore_name": g.datastore, "datastore_version_name": g.datastore_version,
            "datastore_version_id": g.datastore_version, "datastore_version_number": g.datastore_version,
            "values": typed(g.datastore, g.datastore_version, dict(g.values)), "instance_count": g.instance_count,
            "created": g.create_time.ToJsonString() if g.HasField("create_time") else "",
            "updated": g.update_time.ToJsonString() if g.HasField("update_time") else "",
            "links": _links(request, f"configurations/{g.id}")}


def parameter(p: configuration_pb2.ConfigurationParameter) -> dict[str, Any]:
    out: dict[str, Any] = {"name": p.parameter, "type": p.type, "restart_required": p.restart_required,
                           "datastore_version_id": p.datastore_version, "description": p.description}
    if p.HasField("min"):
        out["min"] = int(p.min) if p.type == "integer" else p.min
    if p.HasField("max"):
        out["max"] = int(p.max) if p.type == "integer" else p.max
    if p.allowed_values:
        out["allowed_values"] = list(p.allowed_values)
    return out


def create_request(body: Any) -> tuple[str, dict[str, str], str, str, str]:
    """(name, values, description, datastore, version) of a Trove create body."""
    if not isinstance(body, dict):
        raise BadInput("configuration must be an object")
    name = _str(body, "name", "configuration")
    values = values_from_json(body.get("values", {}), "configuration.values")
    ds = body.get("datastore") or {}
    if not isinstance(ds, dict):
        raise BadInput("configuration.datastore must be an object")
    version = _str(ds, "version", "configuration.datastore", False) or \
        _str(ds, "version_number", "configuration.datastore", False)
    description = body.get("description") or ""
    if not isinstance(description, str):
        raise BadInput("configuration.description must be a string")
    return name, values, description, _str(ds, "type", "configuration.datastore", False), version

"""Tags on instances and backups (RDS's key=value labels): their validation, the update-mask paths that
change them ("tags" replaces them all, "tags.<key>" sets or removes one), and the list filters on them
("key=value" or "key"), which run in SQL on the JSON column so paging stays in the database."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement
from sqlalchemy.orm import InstrumentedAttribute

from reddwarf.common.errors import InvalidArgument

MAX_TAGS = 50
MAX_KEY = 128
MAX_VALUE = 256
MAX_FILTERS = 10
# Reserved for tags the service itself may set one day, as AWS reserves "aws:".
RESERVED_PREFIX = "reddwarf:"
# Letters and digits of any script, space and `_ . : / + - @` (AWS's set). Keys have no "=" (filters split on
# it); neither has a quote or backslash, so a key is always a plain JSON path member in SQL.
_KEY = re.compile(r"[\w .:/+\-@]+")
_VALUE = re.compile(r"[\w .:/=+\-@]*")


def validate_key(key: str, field: str) -> None:
    if not key or len(key) > MAX_KEY:
        raise InvalidArgument(f"{field}: a tag key must be 1..{MAX_KEY} characters", field=field)
    if not _KEY.fullmatch(key) or key != key.strip():
        raise InvalidArgument(f"{field}: tag key {key[:40]!r} may hold only letters, digits, spaces (not at "
                              "either end) and _ . : / + - @", field=field)
    if key.lower().startswith(RESERVED_PREFIX):
        raise InvalidArgument(f"{field}: tag keys starting {RESERVED_PREFIX!r} are reserved", field=field)


def validate_value(key: str, value: str, field: str) -> None:
    if len(value) > MAX_VALUE:
        raise InvalidArgument(f"{field}: the value of tag {key!r} is longer than {MAX_VALUE} characters",
                              field=field)
    if not _VALUE.fullmatch(value):
        raise InvalidArgument(f"{field}: the value of tag {key!r} may hold only letters, digits, spaces and "
                              "_ . : / = + - @", field=field)


def validate_tags(tags: Mapping[str, str], field: str) -> dict[str, str]:
    """The tags as a plain dict, or InvalidArgument naming `field` (and the tag) for the first bad one."""
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"{field}: at most {MAX_TAGS} tags, got {len(tags)}", field=field)
    for key, value in tags.items():
        validate_key(key, field)
        validate_value(key, value, field)
    return dict(sorted(tags.items()))


def apply_paths(current: Mapping[str, Any] | None, given: Mapping[str, str], paths: Iterable[str],
                field: str) -> dict[str, str]:
    """The tags after an update: "tags" replaces them with `given`; "tags.<key>" sets that key from `given`,
    or removes it when `given` lacks it. The result is validated (count included)."""
    out = {str(k): str(v) for k, v in (current or {}).items()}
    for path in paths:
        if path == "tags":
            out = dict(given)
            continue
        key = path.removeprefix("tags.")
        validate_key(key, "update_mask")
        if key in given:
            out[key] = given[key]
        else:
            out.pop(key, None)
    return validate_tags(out, field)


def parse_filters(items: Sequence[str], field: str = "tags") -> list[tuple[str, str | None]]:
    """["env=prod", "team"] → [("env", "prod"), ("team", None)] (None: any value), validated."""
    if len(items) > MAX_FILTERS:
        raise InvalidArgument(f"{field}: at most {MAX_FILTERS} tag filters", field=field)
    out: list[tuple[str, str | None]] = []
    for n, item in enumerate(items):
        key, sep, value = item.partition("=")
        validate_key(key, f"{field}[{n}]")
        if sep:
            validate_value(key, value, f"{field}[{n}]")
        out.append((key, value if sep else None))
    return out


def tag_conditions(column: InstrumentedAttribute[dict[str, Any]], filters: Sequence[tuple[str, str | None]]
                   ) -> list[ColumnElement[bool]]:
    """SQL conditions (all must hold) for the filters on a JSON tags column: the key's value equals, or the
    key is there. Keys and values are bound parameters, never part of the statement's text."""
    conditions: list[ColumnElement[bool]] = []
    for key, value in filters:
        member = column[key].as_string()
        conditions.append(member.is_not(None) if value is None else member == value)
    return conditions


def filter_key(filters: Sequence[tuple[str, str | None]]) -> str:
    """The filters as one string, for binding a page token to them."""
    return "&".join(k if v is None else f"{k}={v}" for k, v in filters)

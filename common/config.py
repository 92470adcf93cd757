"""The one way a process loads its settings: the settings dataclass's defaults, then a file (YAML or JSON),
then REDDWARF_* environment variables, then explicit overrides (flags, keyword arguments), each value
checked against its field's type. Every error names the source and the key.

Each process keeps its own dataclass (server/settings.py, hostd/settings.py, the agent's AgentConfig,
clients/config.py) and calls `load` once at start; the object is then passed down.

Rules shared by every process:
- a key the dataclass does not have is an error (unless the caller asks to ignore unknown keys);
- None, and an empty environment variable, mean "not set here": the layer below wins;
- environment variables are <prefix><FIELD NAME UPPER-CASED> and cover the scalar fields only; a nested
  settings dataclass (the server's default_quota, hostd's bridge) comes from the file as a mapping.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

Format = Literal["yaml", "json"]
# One layer of values: (where they came from, for error messages; the values by field name).
Layer = tuple[str, Mapping[str, Any]]


class ConfigError(ValueError):
    """A setting is unusable: unknown key, wrong type, missing required key, unreadable file.

    `key` names the offending setting ("" when the whole file is at fault)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _yaml_load(text: str) -> Any:
    # Imported here: the guest agent reads JSON only, and PyYAML is a noticeable part of its start-up.
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def read_file(path: str | Path, fmt: Format = "yaml") -> dict[str, Any]:
    """The mapping at the top of a YAML or JSON settings file (an empty file is an empty mapping)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if fmt == "json" else _yaml_load(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid {fmt.upper()}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {_kind(data)}")
    return data


def env_values(cls: type[DataclassInstance], env: Mapping[str, str], prefix: str) -> dict[str, str]:
    """The scalar fields of `cls` set in `env` as <prefix><NAME> (empty values count as unset)."""
    hints = _hints(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if not f.init or _nested(hints[f.name]) is not None:
            continue
        value = env.get(f"{prefix}{f.name.upper()}")
        if value:
            out[f.name] = value
    return out


def build(cls: type[T], *layers: Layer, ignore_unknown: bool = False) -> T:
    """An instance of `cls` from its defaults overlaid by `layers` in order (later layers win)."""
    return _build(cls, layers, ignore_unknown, "")


def load(cls: type[T], *, path: str | Path | None = None, fmt: Format = "yaml",
         env: Mapping[str, str] | None = None, env_prefix: str = "REDDWARF_",
         overrides: Mapping[str, Any] | None = None, ignore_unknown: bool = False) -> T:
    """defaults < the file at `path` (if any) < `env` (default os.environ) < `overrides`."""
    env = os.environ if env is None else env
    layers: list[Layer] = []
    if path:
        layers.append((str(path), read_file(path, fmt)))
    layers.append(("environment", env_values(cls, env, env_prefix)))
    layers.append(("overrides", overrides or {}))
    return build(cls, *layers, ignore_unknown=ignore_unknown)


def _build(cls: type[T], layers: tuple[Layer, ...] | list[Layer], ignore_unknown: bool, parent: str) -> T:
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values: dict[str, Any] = {}
    for source, data in layers:
        for key, raw in data.items():
            name = parent + str(key)
            if key not in known:
                if ignore_unknown:
                    continue
                raise ConfigError(f"{source}: unknown key {name!r} (known: {', '.join(sorted(known))})",
                                  key=name)
            if raw is None:
                continue
            values[key] = _coerce(raw, hints[key], source, name, ignore_unknown)
    for key, f in known.items():
        if (key not in values and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            sources = ", ".join(source for source, _ in layers) or "no settings given"
            raise ConfigError(f"missing required key {parent + key!r} (looked in: {sources})",
                              key=parent + key)
    return cls(**values)


def _coerce(raw: Any, kind: Any, source: str, name: str, ignore_unknown: bool) -> Any:
    kind = _strip_optional(kind)
    nested = _nested(kind)
    if nested is not None:
        if isinstance(raw, nested):
            return raw
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{source}: {name} must be a mapping, got {_kind(raw)}", key=name)
        return _build(nested, [(source, raw)], ignore_unknown, name + ".")
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: {name} must be true or false, got {raw!r}", key=name)
    if kind is int:
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be an integer, got {raw!r}", key=name)
    if kind is float:
        if isinstance(raw, (int, float, str)) and not isinstance(raw, bool):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {name} must be a number, got {raw!r}", key=name)
    if kind is str:
        # Scalars a YAML file reads as numbers (name: 123) are still the string they were written as.
        # The value itself is left out of the error: it may be a token.
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(f"{source}: {name} must be a string, got {_kind(raw)}", key=name)
    return raw


def _hints(cls: type[Any]) -> dict[str, Any]:
    # The settings modules use `from __future__ import annotations`: field types are strings until resolved.
    return typing.get_type_hints(cls)


def _strip_optional(kind: Any) -> Any:
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def _nested(kind: Any) -> type[DataclassInstance] | None:
    kind = _strip_optional(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return kind
    return None


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: "a boolean"}.get(type(value), type(value).__name__)

"""Where a client finds its endpoint and credentials: explicit arguments, then the environment, then the
config file (~/.config/reddwarf/config.yaml), in that order of precedence.

The file is YAML with the same keys as `ClientConfig` (endpoint, ca, cert, key, token, server_name,
timeout), optionally under `profiles: {name: {...}}` with `profile: name` choosing one.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = Path("~/.config/reddwarf/config.yaml")

ENV_KEYS: dict[str, str] = {
    "endpoint": "REDDWARF_ENDPOINT",
    "ca": "REDDWARF_CA",
    "cert": "REDDWARF_CERT",
    "key": "REDDWARF_KEY",
    "token": "REDDWARF_TOKEN",
    "server_name": "REDDWARF_SERVER_NAME",
    "timeout": "REDDWARF_TIMEOUT",
}


class ConfigError(ValueError):
    """The configuration is unusable (missing endpoint, unreadable file, bad YAML)."""


@dataclass(frozen=True)
class ClientConfig:
    """Everything needed to open a channel. `token` is the tenant's (or an admin's) bearer token."""

    endpoint: str = ""
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str | None = None
    # TLS name to verify the server certificate against when the endpoint is an address it does not name.
    server_name: str | None = None
    # Default per-call deadline in seconds.
    timeout: float = 30.0

    def __repr__(self) -> str:  # never print the token
        return (f"ClientConfig(endpoint={self.endpoint!r}, ca={self.ca!r}, cert={self.cert!r}, key={self.key!r}, "
                f"token={'***' if self.token else None}, server_name={self.server_name!r}, timeout={self.timeout})")


_FIELDS = {f.name for f in fields(ClientConfig)}


def _coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key not in _FIELDS:
            raise ConfigError(f"{source}: unknown key {key!r} (known: {', '.join(sorted(_FIELDS))})")
        if value is None:
            continue
        if key == "timeout":
            try:
                out[key] = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{source}: timeout must be a number of seconds, got {value!r}") from None
        else:
            out[key] = str(value)
    return out


def read_config_file(path: Path, profile: str | None = None) -> dict[str, Any]:
    path = path.expanduser()
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profiles = data.pop("profiles", None)
    chosen = profile or data.pop("profile", None)
    data.pop("profile", None)
    if chosen:
        if not isinstance(profiles, dict) or chosen not in profiles:
            raise ConfigError(f"{path}: no profile named {chosen!r}")
        data.update(profiles[chosen] or {})
    return _coerce(data, str(path))


def load_config(*, path: Path | str | None = None, env: Mapping[str, str] | None = None,
                profile: str | None = None, **explicit: Any) -> ClientConfig:
    """Merges file < environment < explicit arguments (None arguments are ignored)."""
    env = os.environ if env is None else env
    file_path = Path(path) if path is not None else Path(env.get("REDDWARF_CONFIG", str(DEFAULT_CONFIG_PATH)))
    merged: dict[str, Any] = read_config_file(file_path, profile or env.get("REDDWARF_PROFILE"))
    merged.update(_coerce({k: env[v] for k, v in ENV_KEYS.items() if env.get(v)}, "environment"))
    merged.update(_coerce({k: v for k, v in explicit.items() if v is not None}, "arguments"))
    config = replace(ClientConfig(), **merged)
    if not config.endpoint:
        raise ConfigError("no endpoint: pass --endpoint, set REDDWARF_ENDPOINT, or write endpoint: in "
                          f"{file_path}")
    return config

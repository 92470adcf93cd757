"""Where a client finds its endpoint and credentials: explicit arguments, then the environment, then the
config file (~/.config/reddwarf/config.yaml), in that order of precedence.

The file is YAML with the same keys as `ClientConfig` (endpoint — one host:port or several, comma-separated
—, ca, cert, key, token, server_name, timeout), optionally under `profiles: {name: {...}}` with `profile: name` choosing one. Loading and
type checks are reddwarf.common.config's, shared with the other processes.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reddwarf.common import config
from reddwarf.common.config import ConfigError

__all__ = ["DEFAULT_CONFIG_PATH", "ClientConfig", "ConfigError", "load_config", "read_config_file"]

DEFAULT_CONFIG_PATH = Path("~/.config/reddwarf/config.yaml")

# The environment variables are REDDWARF_<FIELD> (REDDWARF_ENDPOINT, REDDWARF_TOKEN, ...), as for every process.
ENV_PREFIX = "REDDWARF_"


@dataclass(frozen=True)
class ClientConfig:
    """Everything needed to open a channel. `token` is the tenant's (or an admin's) bearer token."""

    # host:port of the API, or several comma-separated (servers sharing one state DB): see endpoints.py.
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


def read_config_file(path: Path, profile: str | None = None) -> dict[str, Any]:
    """The file's settings with the chosen profile's laid over the top level ({} if there is no file)."""
    path = path.expanduser()
    if not path.exists():
        return {}
    data = config.read_file(path, "yaml")
    profiles = data.pop("profiles", None)
    chosen = profile or data.pop("profile", None)
    data.pop("profile", None)
    if chosen:
        if not isinstance(profiles, dict) or chosen not in profiles:
            raise ConfigError(f"{path}: no profile named {chosen!r}", key="profile")
        data.update(profiles[chosen] or {})
    return data


def load_config(*, path: Path | str | None = None, env: Mapping[str, str] | None = None,
                profile: str | None = None, **explicit: Any) -> ClientConfig:
    """Merges file < environment < explicit arguments (None arguments are ignored)."""
    env = os.environ if env is None else env
    file_path = Path(path) if path is not None else Path(env.get("REDDWARF_CONFIG", str(DEFAULT_CONFIG_PATH)))
    from_file = read_config_file(file_path, profile or env.get("REDDWARF_PROFILE"))
    cfg = config.build(ClientConfig, (str(file_path.expanduser()), from_file),
                       ("environment", config.env_values(ClientConfig, env, ENV_PREFIX)), ("arguments", explicit))
    if not cfg.endpoint:
        raise ConfigError("no endpoint: pass --endpoint, set REDDWARF_ENDPOINT, or write endpoint: in "
                          f"{file_path}", key="endpoint")
    return cfg

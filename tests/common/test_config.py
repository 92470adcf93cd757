"""The one settings loader (reddwarf.common.config): defaults < file < REDDWARF_* environment < overrides,
typed, with errors naming the key; and each process's settings loaded through it."""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reddwarf.agent.main import AgentConfig
from reddwarf.common import clock, config
from reddwarf.common.config import ConfigError
from reddwarf.hostd.settings import BridgeSettings
from reddwarf.hostd.settings import Settings as HostdSettings
from reddwarf.server.settings import Quota
from reddwarf.server.settings import Settings as ServerSettings


@dataclass(frozen=True)
class Limits:
    cpus: int = 1
    memory_mb: int = 512


@dataclass(frozen=True)
class Demo:
    name: str = "demo"
    port: int = 8000
    ratio: float = 1.0
    verbose: bool = False
    token: str | None = None
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True)
class Needs:
    server: str
    port: int = 1


def test_no_layers_gives_the_dataclass_defaults() -> None:
    assert config.load(Demo, env={}) == Demo()


def test_a_yaml_file_sets_values_and_nested_mappings(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text("name: from-file\nport: 9000\nratio: 2\nlimits: {cpus: 4}\n")
    got = config.load(Demo, path=path, env={})
    assert got == Demo(name="from-file", port=9000, ratio=2.0, limits=Limits(cpus=4, memory_mb=512))
    assert isinstance(got.ratio, float)


def test_a_json_file_is_read_as_json(tmp_path: Path) -> None:
    path = tmp_path / "demo.json"
    path.write_text(json.dumps({"port": 7000, "verbose": True}))
    assert config.load(Demo, path=path, fmt="json", env={}) == Demo(port=7000, verbose=True)


def test_environment_beats_the_file_and_overrides_beat_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text("name: from-file\nport: 9000\n")
    env = {"DEMO_NAME": "from-env", "DEMO_PORT": "9100", "DEMO_VERBOSE": "yes", "OTHER_PORT": "1"}
    got = config.load(Demo, path=path, env=env, env_prefix="DEMO_", overrides={"port": 9200, "ratio": None})
    assert (got.name, got.port, got.verbose, got.ratio) == ("from-env", 9200, True, 1.0)


def test_an_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text("name: from-file\n")
    assert config.load(Demo, path=path, env={"REDDWARF_NAME": "", "REDDWARF_PORT": ""}).name == "from-file"


def test_an_unknown_key_is_refused_naming_it_and_its_file(tmp_path: Path) -> None:
    path = tmp_path / "demo.yaml"
    path.write_text("name: x\nprot: 9000\n")
    with pytest.raises(ConfigError, match=r"demo.yaml: unknown key 'prot'") as caught:
        config.load(Demo, path=path, env={})
    assert caught.value.key == "prot"
    assert isinstance(caught.value, ValueError)


def test_an_unknown_nested_key_is_named_with_its_parent() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'limits.gpus'") as caught:
        config.build(Demo, ("test", {"limits": {"gpus": 2}}))
    assert caught.value.key == "limits.gpus"


def test_unknown_keys_can_be_skipped_when_the_caller_asks() -> None:
    assert config.build(Demo, ("test", {"port": 1, "later": "x"}), ignore_unknown=True) == Demo(port=1)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("port", "eighty", r"environment: port must be an integer, got 'eighty'"),
    ("ratio", "lots", r"environment: ratio must be a number"),
    ("verbose", "perhaps", r"environment: verbose must be true or false"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_the_key(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        config.load(Demo, env={f"REDDWARF_{key.upper()}": value})
    assert caught.value.key == key


def test_a_type_error_for_a_string_leaves_the_value_out_of_the_message() -> None:
    with pytest.raises(ConfigError, match="token must be a string, got a list") as caught:
        config.build(Demo, ("arguments", {"token": ["s3cret"]}))
    assert "s3cret" not in str(caught.value)


def test_a_nested_setting_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="limits must be a mapping") as caught:
        config.build(Demo, ("test", {"limits": 4}))
    assert caught.value.key == "limits"


def test_a_missing_required_key_is_named() -> None:
    with pytest.raises(ConfigError, match="missing required key 'server'") as caught:
        config.build(Needs, ("test", {"port": 2}))
    assert caught.value.key == "server"
    assert config.build(Needs, ("test", {"server": "a:1"})) == Needs(server="a:1")


def test_an_unreadable_or_malformed_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="absent.yaml: cannot read"):
        config.read_file(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        config.read_file(bad, "json")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        config.read_file(listed)


# Each process through the loader: its own file format, environment prefix and overrides.

def test_server_settings_come_from_yaml_then_reddwarf_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(f"state_dir: {tmp_path}\nmemory_overcommit: 1.5\ndefault_quota: {{instances: 3}}\n")
    env = {"REDDWARF_CONFIG": str(path), "REDDWARF_HEARTBEAT_SECONDS": "2", "REDDWARF_API_LISTEN": "127.0.0.1:1"}
    s = ServerSettings.load(env=env, overrides={"api_listen": "127.0.0.1:2", "db_url": None})
    assert (s.heartbeat_seconds, s.api_listen, s.memory_overcommit) == (2, "127.0.0.1:2", 1.5)
    assert s.default_quota == Quota(instances=3)
    assert s.db_url == f"sqlite:///{tmp_path}/state.db"
    with pytest.raises(ConfigError, match="task_workers must be an integer"):
        ServerSettings.load(env={"REDDWARF_TASK_WORKERS": "many"})


def test_hostd_settings_come_from_json_then_reddwarf_hostd_env_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "hostd.json"
    path.write_text(json.dumps({"port_min": 40000, "bridge": {"name": "rdbr9"}}))
    s = HostdSettings.load(str(path), {"REDDWARF_HOSTD_PORT_MAX": "40100", "REDDWARF_PORT_MIN": "1"},
                           {"host_id": "h7", "log_level": None})
    assert (s.port_min, s.port_max, s.host_id) == (40000, 40100, "h7")
    assert s.bridge == BridgeSettings(name="rdbr9")
    assert s.state_dir == "/var/lib/reddwarf/hostd/h7"
    assert HostdSettings.from_file(str(path), host_id="h8").port_min == 40000
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        HostdSettings.from_mapping({"colour": "red"})


def test_the_agent_reads_firstboot_json_skipping_keys_it_does_not_know(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"server_address": "s:1", "ca_pem_path": "/ca.pem", "instance_id": "i-1",
                                "heartbeat_seconds": 5, "from_a_newer_hostd": True}))
    cfg = AgentConfig.load(str(path), env={"REDDWARF_AGENT_LOG_LEVEL": "DEBUG"})
    assert (cfg.instance_id, cfg.heartbeat_seconds, cfg.log_level) == ("i-1", 5, "DEBUG")
    path.write_text(json.dumps({"server_address": "s:1", "ca_pem_path": "/ca.pem"}))
    with pytest.raises(ConfigError, match="missing required key 'instance_id'"):
        AgentConfig.load(str(path), env={})


def test_now_is_naive_utc_and_now_aware_carries_utc() -> None:
    naive, aware = clock.now(), clock.now_aware()
    assert naive.tzinfo is None
    assert aware.tzinfo is dt.UTC
    assert abs(aware.replace(tzinfo=None) - naive) < dt.timedelta(seconds=5)

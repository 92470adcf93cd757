"""FirstBoot: what hostd writes into a new container's root filesystem so its guest agent can start.

The agreed file format (the agent engineer reads exactly this):

  /etc/reddwarf/agent.json   mode 0600, root-owned, a JSON object with keys
      server_address     str   the control server's agent endpoint, "host:port"; with several servers
                               every server's, comma-separated (the agent dials any, moves when it dies)
      ca_pem_path        str   "/etc/reddwarf/ca.pem" (the deployment CA, PEM, mode 0644)
      enrollment_token   str   one-time token; the agent makes its own key and sends a CSR with it
      instance_id        str   the instance uuid this agent serves
      heartbeat_seconds  int   seconds between heartbeats (default 10 when the request says 0)
      mysql_port         int   port mysqld must listen on (host mode: allocated by hostd per container)
      datadir            str   where the data volume is mounted, default "/var/lib/mysql"
      state_dir          str   "/var/lib/reddwarf-agent" (the agent's own key, cert, and state)
      enroll_address     str   the server's enrollment endpoint "host:port" (server-only TLS)
      bind_address       str   the address mysqld should bind ("0.0.0.0" in bridge mode, "127.0.0.1"
                               or the host's address in host mode)

  /opt/reddwarf/lib/reddwarf/{agent,common,v1}/   the agent code, copied from the host's installed
      packages (no reddwarf/__init__.py: a namespace package). Run with PYTHONPATH=/opt/reddwarf/lib by
      /opt/reddwarf/venv/bin/python (the template's venv holds grpcio, protobuf, pymysql, ... at the
      host's versions): `python -m reddwarf.agent.main --config /etc/reddwarf/agent.json`.
"""
from __future__ import annotations

import compileall
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass

from .containers import Bootstrap

AGENT_JSON = "etc/reddwarf/agent.json"
CA_PEM = "etc/reddwarf/ca.pem"
LIB_DIR = "opt/reddwarf/lib"
AGENT_STATE_DIR = "/var/lib/reddwarf-agent"
AGENT_PACKAGES = ("agent", "common", "v1")
DEFAULT_HEARTBEAT = 10
INIT_CMD = "/opt/reddwarf/venv/bin/python -m reddwarf.agent.main --config /etc/reddwarf/agent.json"
INIT_ENV = ("PYTHONPATH=/opt/reddwarf/lib", "PYTHONUNBUFFERED=1")


@dataclass(frozen=True)
class AgentConfig:
    server_address: str
    ca_pem_path: str
    enrollment_token: str
    instance_id: str
    heartbeat_seconds: int
    mysql_port: int
    datadir: str
    state_dir: str
    bind_address: str
    enroll_address: str = ""

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)


def agent_config(bootstrap: Bootstrap, mysql_port: int, datadir: str, bind_address: str) -> AgentConfig:
    return AgentConfig(server_address=bootstrap.server_address, ca_pem_path="/" + CA_PEM,
                       enrollment_token=bootstrap.enrollment_token, instance_id=bootstrap.instance_id,
                       heartbeat_seconds=bootstrap.heartbeat_seconds or DEFAULT_HEARTBEAT,
                       mysql_port=mysql_port, datadir=datadir, state_dir=AGENT_STATE_DIR,
                       bind_address=bind_address, enroll_address=bootstrap.enroll_address)


def _package_dir(sub: str) -> str | None:
    import importlib

    try:
        mod = importlib.import_module(f"reddwarf.{sub}")
    except ImportError:
        return None
    path = getattr(mod, "__file__", None)
    return os.path.dirname(path) if path else None


_compiled: set[str] = set()
_compile_lock = threading.Lock()


def _compile_once(src: str) -> None:
    """Brings the bytecode beside the agent's sources up to date, once per hostd process: copied with them,
    it spares every new agent compiling its own code at start (a fifth of its import time, and 20 agents
    start at once in a burst of creates). Python checks each .pyc against its source's mtime and size
    (copies keep both), so a stale or missing one only costs the compile it would have cost anyway; a guest
    whose Python is another version finds no bytecode of its own tag and compiles, as before."""
    with _compile_lock:
        if src in _compiled:
            return
        _compiled.add(src)
        compileall.compile_dir(src, quiet=2, workers=1)  # best effort: a read-only install is left as it is


def _copy_ignore(directory: str, names: list[str]) -> set[str]:
    """The sources, and in __pycache__ only this interpreter's plain .pyc files (no optimised or foreign ones)."""
    if os.path.basename(directory) == "__pycache__":
        keep = f".{sys.implementation.cache_tag}.pyc"
        return {n for n in names if not n.endswith(keep)}
    return {n for n in names if n.endswith(".pyc") or n == ".stamp"}


def write_firstboot(rootfs_upper: str, config: AgentConfig, ca_pem: str) -> None:
    """Writes the bootstrap and the agent code into `rootfs_upper` (the container's own layer)."""
    etc = os.path.join(rootfs_upper, "etc/reddwarf")
    os.makedirs(etc, mode=0o755, exist_ok=True)
    ca_path = os.path.join(rootfs_upper, CA_PEM)
    with open(ca_path, "w") as f:
        f.write(ca_pem)
    os.chmod(ca_path, 0o644)
    path = os.path.join(rootfs_upper, AGENT_JSON)
    # Created 0600 from the start: the enrollment token is never world-readable, not even briefly.
    fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(config.to_json())
    os.replace(path + ".tmp", path)
    lib = os.path.join(rootfs_upper, LIB_DIR, "reddwarf")
    os.makedirs(lib, exist_ok=True)
    for sub in AGENT_PACKAGES:
        src = _package_dir(sub)
        if src is None:
            continue  # the agent package may not exist yet on a development host
        _compile_once(src)
        shutil.copytree(src, os.path.join(lib, sub), dirs_exist_ok=True, ignore=_copy_ignore)
    os.makedirs(os.path.join(rootfs_upper, AGENT_STATE_DIR.lstrip("/")), mode=0o700, exist_ok=True)


def write_name_files(rootfs_upper: str, hostname: str, own_network: bool) -> None:
    """/etc/hosts naming the container itself (mariadb-install-db and mariadbd look their host name up),
    and, for a container in its own network namespace (which has no route to a DNS server), an
    /etc/resolv.conf without servers, so a lookup fails at once instead of after the resolver's timeouts."""
    etc = os.path.join(rootfs_upper, "etc")
    os.makedirs(etc, mode=0o755, exist_ok=True)
    hosts = (f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n\n"
             "::1\tlocalhost ip6-localhost ip6-loopback\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n")
    files = {"hosts": hosts}
    if own_network:
        files["resolv.conf"] = "# no DNS in this container's network namespace (reddwarf-hostd)\noptions attempts:1 timeout:1\n"
    for name, text in files.items():
        path = os.path.join(etc, name)
        if os.path.islink(path):
            os.unlink(path)
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)

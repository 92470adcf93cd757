"""Agent upgrade in place (issue 17): a new build replaces the running agent without stopping mysqld.

The agent is its container's PID 1 and mysqld's parent, so it cannot stop and be started again. Instead it
unpacks the build's reddwarf packages under its state dir (`agent-builds/<version>/`), records it as current,
answers the command (the answer is also in its results record, for a replay) and then execs itself with that
directory first on PYTHONPATH: same PID, same children (mysqld keeps running; its stdio is /dev/null and every
other descriptor is close-on-exec), same certificate and key in the state dir. The new agent adopts the running
mysqld from its pid file (supervisor.Supervisor.adopt) and says its new version on its next hello.

A container restart starts the template's agent again: `reexec_into_current` at start execs it into the
recorded build, so an upgrade outlives restarts (not a new container: that starts from the template).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path

from reddwarf.common import agent_build
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import write_atomic
from reddwarf.v1 import agent_pb2

log = logging.getLogger("reddwarf.agent.upgrade")

BUILDS = "agent-builds"
CURRENT = "current"
# Set in the exec'd agent's environment: the build it was exec'd into (guards against an exec loop).
ENV_BUILD = "REDDWARF_AGENT_BUILD"
EXEC_DELAY = 0.5  # lets the answer leave on the stream before the process image is replaced
MAX_WHEEL_BYTES = 64 * 1024 * 1024


def builds_dir(state_dir: str) -> Path:
    return Path(state_dir) / BUILDS


def unpack(state_dir: str, wheel: bytes, version: str) -> Path:
    """The build's reddwarf packages under agent-builds/<version>/ (made complete under a temporary name, then
    renamed); nothing outside reddwarf/ and no path that leaves the directory is written."""
    target = builds_dir(state_dir) / version
    if target.is_dir():
        return target
    tmp = target.with_name(f".{version}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, mode=0o700)
    with zipfile.ZipFile(io.BytesIO(wheel)) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0] != "reddwarf" or info.is_dir():
                continue
            if info.filename.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise InvalidArgument(f"the wheel holds an unsafe path {info.filename[:100]!r}",
                                      field="upgrade_agent.wheel")
            dest = tmp.joinpath(*parts)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
    os.replace(tmp, target)
    return target


def check(cmd: agent_pb2.UpgradeAgent) -> None:
    """The wheel is what the server says it is: its SHA-256 and the build it carries."""
    if not cmd.wheel or len(cmd.wheel) > MAX_WHEEL_BYTES:
        raise InvalidArgument(f"wheel must be 1..{MAX_WHEEL_BYTES} bytes", field="upgrade_agent.wheel")
    if hashlib.sha256(cmd.wheel).hexdigest() != cmd.sha256.lower():
        raise InvalidArgument("the wheel does not match its sha256", field="upgrade_agent.sha256")
    try:
        carried = agent_build.wheel_version(zipfile.ZipFile(io.BytesIO(cmd.wheel)))
    except zipfile.BadZipFile:
        raise InvalidArgument("the wheel is not a zip file", field="upgrade_agent.wheel") from None
    if carried != cmd.version:
        raise InvalidArgument(f"the wheel carries build {carried}, not {cmd.version[:40]}",
                              field="upgrade_agent.version")


def _exec_argv() -> list[str]:
    return [sys.executable, "-m", "reddwarf.agent.main", *sys.argv[1:]]


def exec_into(build: Path, version: str) -> None:
    """Replaces this process's image with the agent of `build` (never returns)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(build), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env[ENV_BUILD] = version
    log.warning("exec into agent build", extra={"version": version})
    for h in logging.getLogger().handlers:
        h.flush()
    os.execve(sys.executable, _exec_argv(), env)


async def upgrade(state_dir: str, cmd: agent_pb2.UpgradeAgent) -> None:
    """Checks and unpacks the build, records it as current and schedules the exec; a build already running
    answers at once (a replay after the exec lands here)."""
    check(cmd)
    if cmd.version == agent_build.installed_version():
        return
    build = await asyncio.to_thread(unpack, state_dir, cmd.wheel, cmd.version)
    write_atomic(builds_dir(state_dir) / CURRENT, cmd.version.encode(), 0o600)
    asyncio.get_running_loop().call_later(EXEC_DELAY, exec_into, build, cmd.version)


def reexec_into_current(state_dir: str) -> None:
    """At start: a recorded build other than the one running is exec'd into (after a container restart)."""
    try:
        version = (builds_dir(state_dir) / CURRENT).read_text().strip()
    except OSError:
        return
    build = builds_dir(state_dir) / version
    if not version or not build.is_dir() or os.environ.get(ENV_BUILD) == version:
        return
    if version == agent_build.installed_version():
        return
    exec_into(build, version)

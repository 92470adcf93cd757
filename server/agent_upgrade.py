"""Guest agent upgrades (issue 17, part 4): the `upgrade_agent` task and its maintenance action.

  upgrade_agent   send → reconnect
                  send: the build (a reddwarf wheel, its version computed here from the wheel, never taken
                  from the guest) goes to the agent, which unpacks it and execs itself into it, mysqld left
                  running (agent/upgrade.py); reconnect: the agent's next hello says the new version.

An agent older than the UpgradeAgent command answers "unknown command": the task fails with that and the
agent runs on as it was; every other command is understood by both builds, so a roll-out may take weeks.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from reddwarf.common import agent_build
from reddwarf.common.errors import DeadlineExceeded, FailedPrecondition
from reddwarf.v1 import agent_pb2

from . import maintenance, models, tasks
from .agents import AgentRegistry
from .settings import Settings
from .wheelhouse import Wheelhouse

RECONNECT_TIMEOUT = 120.0
SEND_TIMEOUT = 120.0


@dataclass(frozen=True)
class Build:
    wheel: bytes
    sha256: str
    version: str


def load_build(settings: Settings) -> Build:
    """The build to ship: agent_wheel, else the wheelhouse's reddwarf wheel (built from the checkout)."""
    path = Path(settings.agent_wheel) if settings.agent_wheel else \
        Wheelhouse(settings.enroll_wheelhouse, settings.enroll_source_dir or None).own_wheel()
    if not path.is_file():
        raise FailedPrecondition(f"the agent wheel {path} does not exist", field="agent_wheel")
    data = path.read_bytes()
    return Build(data, hashlib.sha256(data).hexdigest(), agent_build.wheel_version(path))


def _submit(s: Session, row: models.Instance, action: models.PendingMaintenance, task_id: str) -> None:
    tasks.submit(s, "upgrade_agent", f"instances/{row.id}", {"maintenance": action.id}, task_id=task_id)


maintenance.register_action("agent_upgrade", _submit)


@dataclass(eq=False)
class AgentUpgrades:
    settings: Settings
    registry: AgentRegistry

    def kinds(self) -> list[tasks.TaskKind]:
        S = tasks.Step
        return [tasks.TaskKind("upgrade_agent", (S("send", self.step_send), S("reconnect", self.step_reconnect)),
                               max_attempts=3)]

    async def step_send(self, ctx: tasks.StepContext) -> None:
        build = await asyncio.to_thread(load_build, self.settings)
        await ctx.save(version=build.version)
        if self.registry.agent_version(ctx.resource_id) == build.version:
            return  # already there (a resumed task, or nothing to do)
        await self.registry.call(ctx.resource_id, agent_pb2.Command(
            command_id=f"{ctx.task_id}:upgrade_agent",
            upgrade_agent=agent_pb2.UpgradeAgent(wheel=build.wheel, sha256=build.sha256, version=build.version)),
            timeout=SEND_TIMEOUT)

    async def step_reconnect(self, ctx: tasks.StepContext) -> None:
        want = str(ctx.params["version"])
        deadline = time.monotonic() + RECONNECT_TIMEOUT
        while self.registry.agent_version(ctx.resource_id) != want:
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"the agent of {ctx.resource_id} did not come back as {want} within "
                                       f"{RECONNECT_TIMEOUT:.0f}s (it says "
                                       f"{self.registry.agent_version(ctx.resource_id)!r})", field="instance")
            await asyncio.sleep(0.2)

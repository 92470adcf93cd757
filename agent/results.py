"""The record of finished commands: one file per command id (written atomically, 0600), so a command
replayed after a reconnect or an agent restart is answered from the record instead of acting twice, and a
marker per running command, so one cut off by the agent's death is known after the restart."""
from __future__ import annotations

import contextlib
import os

from google.rpc import code_pb2

from reddwarf.common.errors import FailedPrecondition, to_status_pb
from reddwarf.v1 import agent_pb2

# Results that say "try again" rather than answer: never recorded, so a retry of the same id runs afresh.
RETRYABLE = frozenset({code_pb2.UNAVAILABLE, code_pb2.ABORTED, code_pb2.DEADLINE_EXCEEDED})


class ResultStore:
    """Finished commands' results, one file per command id (written atomically, 0600)."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, command_id: str) -> str:
        safe = "".join(c for c in command_id if c.isalnum() or c in "-_")[:128]
        return os.path.join(self.dir, f"{safe}.pb")

    def _marker(self, command_id: str) -> str:
        return self._path(command_id)[:-3] + ".running"

    def get(self, command_id: str) -> agent_pb2.CommandResult | None:
        try:
            with open(self._path(command_id), "rb") as f:
                return agent_pb2.CommandResult.FromString(f.read())
        except FileNotFoundError:
            return None

    def forget(self, command_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._marker(command_id))

    def begin(self, command_id: str, kind: str) -> None:
        """Marks a command as started: a marker without a result after a restart means it was cut off."""
        with open(self._marker(command_id), "w") as f:
            f.write(f"{kind}\n{command_id}")

    def take_interrupted(self) -> dict[str, str]:
        """Command ids (→ kind) that were running when the agent last died; their markers are removed."""
        out = {}
        for name in os.listdir(self.dir):
            if name.endswith(".running"):
                path = os.path.join(self.dir, name)
                with open(path) as f:
                    kind, _, command_id = f.read().partition("\n")
                out[command_id or name[: -len(".running")]] = kind
                os.unlink(path)
        return out

    def put(self, result: agent_pb2.CommandResult) -> None:
        if result.status.code in RETRYABLE:
            # Not an answer but "not now": a retry with the same id must run the command again.
            self.forget(result.command_id)
            return
        stored = agent_pb2.CommandResult()
        stored.CopyFrom(result)
        if stored.HasField("root_credentials"):
            # The password exists once, in the reply in flight; a replay gets a clear refusal instead.
            stored.ClearField("root_credentials")
            stored.status.CopyFrom(to_status_pb(FailedPrecondition(
                "root was already enabled by this command; its password is shown only once "
                "(enable root again for a new one)", field="command_id")))
        path = self._path(result.command_id)
        fd = os.open(path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(stored.SerializeToString())
        os.replace(path + ".tmp", path)
        self.forget(result.command_id)

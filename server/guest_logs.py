"""The Logs service: a tenant's view of its instance's datastore logs, read by the instance's own guest agent
(agent/logs.py) in pieces: list, enable/disable, tail (a stream that can follow the log), and save into
the backup store under the tenant's key.

Log names come from a fixed set and are checked here and again in the guest, which maps them to its own
files: nothing the caller sends becomes a path.
"""
from __future__ import annotations

import asyncio
import codecs
import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

from reddwarf.common.clock import now as utcnow
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, grpc_edge
from reddwarf.v1 import agent_pb2, observe_pb2, observe_pb2_grpc

from .agents import AgentRegistry
from .app import App, Context
from .auth import current_principal
from .backup_store import BackupStore
from .guest import split_child
from .instance_views import owned_instance

LOG_NAMES = ("error", "slow_query", "general")
MAX_TAIL_LINES = 10000
DEFAULT_TAIL_LINES = 50
READ_TIMEOUT = 30.0
FOLLOW_SECONDS = 1.0
# Each following tail asks the guest once a second for as long as it is open: a few per instance at once.
MAX_FOLLOWS_PER_INSTANCE = 4
# What one SaveLog may store: every log is bounded in the guest (current file + rotated generations).
SAVE_MAX_BYTES = 256 << 20


def split_log(name: str, field: str = "name") -> tuple[str, str]:
    """"instances/<id>/logs/<log>" → ("instances/<id>", log), the log from the fixed set."""
    inst, log = split_child(name, "logs", field)
    if log not in LOG_NAMES:
        raise InvalidArgument(f"{field} must name one of the logs {', '.join(LOG_NAMES)}; got {log[:64]!r}",
                              field=field)
    return inst, log


def guest_log_pb(iid: str, info: agent_pb2.LogInfo) -> observe_pb2.GuestLog:
    return observe_pb2.GuestLog(name=f"instances/{iid}/logs/{info.log}", log=info.log, type=info.type,
                                status="Enabled" if info.enabled else "Disabled", size_bytes=info.size_bytes,
                                max_bytes=info.max_bytes, long_query_time=info.long_query_time)


class LogsServicer(observe_pb2_grpc.LogsServicer):
    def __init__(self, app: App, registry: AgentRegistry, store: BackupStore) -> None:
        self.app = app
        self.registry = registry
        self.store = store
        self._follows: dict[str, int] = {}

    def _guest(self, context: Context, name: str, field: str) -> tuple[str, str]:
        """(instance id, tenant) of the caller's instance whose agent is connected: logs are most wanted when
        the datastore is down, so any status will do as long as the guest answers."""
        p = current_principal(context)
        with self.app.sessions() as s:
            row = owned_instance(s, p, name, field)
            iid, tenant = row.id, row.tenant_id
        if not self.registry.is_connected(iid):
            raise FailedPrecondition(f"the guest agent of instance {iid} is not connected; its logs cannot be "
                                     "read now", field=field)
        return iid, tenant

    async def _call(self, iid: str, **command: Any) -> agent_pb2.CommandResult:
        return await self.registry.call(iid, agent_pb2.Command(**command), timeout=READ_TIMEOUT)

    async def _logs(self, iid: str) -> list[agent_pb2.LogInfo]:
        return list((await self._call(iid, list_logs=agent_pb2.ListLogs())).log_list.logs)

    @grpc_edge
    async def ListLogs(self, request: observe_pb2.ListLogsRequest, context: Context) -> observe_pb2.ListLogsResponse:
        iid, _ = self._guest(context, request.parent, "parent")
        return observe_pb2.ListLogsResponse(logs=[guest_log_pb(iid, i) for i in await self._logs(iid)])

    @grpc_edge
    async def GetLog(self, request: observe_pb2.GetLogRequest, context: Context) -> observe_pb2.GuestLog:
        inst, log = split_log(request.name)
        iid, _ = self._guest(context, inst, "name")
        for info in await self._logs(iid):
            if info.log == log:
                return guest_log_pb(iid, info)
        raise FailedPrecondition(f"the guest does not keep the {log} log", field="name")

    async def _set(self, context: Context, name: str, enabled: bool, long_query_time: float) -> observe_pb2.GuestLog:
        inst, log = split_log(name)
        if log == "error" and not enabled:
            raise InvalidArgument("the error log is a SYS log and cannot be disabled", field="name")
        if long_query_time and log != "slow_query":
            raise InvalidArgument("long_query_time applies to the slow_query log only", field="long_query_time")
        if long_query_time and not 0 < long_query_time <= 3600:
            raise InvalidArgument("long_query_time must be more than 0 and at most 3600 seconds",
                                  field="long_query_time")
        iid, _ = self._guest(context, inst, "name")
        res = await self._call(iid, set_log=agent_pb2.SetLog(log=log, enabled=enabled,
                                                              long_query_time=long_query_time))
        return guest_log_pb(iid, res.log_list.logs[0])

    @grpc_edge
    async def EnableLog(self, request: observe_pb2.EnableLogRequest, context: Context) -> observe_pb2.GuestLog:
        return await self._set(context, request.name, True, request.long_query_time)

    @grpc_edge
    async def DisableLog(self, request: observe_pb2.DisableLogRequest, context: Context) -> observe_pb2.GuestLog:
        return await self._set(context, request.name, False, 0.0)

    @grpc_edge
    async def TailLog(self, request: observe_pb2.TailLogRequest,
                      context: Context) -> AsyncIterator[observe_pb2.LogChunk]:
        inst, log = split_log(request.name)
        if not 0 <= request.lines <= MAX_TAIL_LINES:
            raise InvalidArgument(f"lines must be 0..{MAX_TAIL_LINES}", field="lines")
        iid, _ = self._guest(context, inst, "name")
        if request.follow:
            if self._follows.get(iid, 0) >= MAX_FOLLOWS_PER_INSTANCE:
                raise ResourceExhausted(f"instance {iid} already has {MAX_FOLLOWS_PER_INSTANCE} logs followed; "
                                        "stop one first", field="follow")
            self._follows[iid] = self._follows.get(iid, 0) + 1
        try:
            # A multi-byte character may be split between two pieces: decoded as one stream.
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            read = agent_pb2.ReadLog(log=log) if request.from_start else \
                agent_pb2.ReadLog(log=log, tail_lines=request.lines or DEFAULT_TAIL_LINES)
            while True:
                data = (await self._call(iid, read_log=read)).log_data
                text = decoder.decode(data.data)
                if text:
                    yield observe_pb2.LogChunk(data=text)
                read = agent_pb2.ReadLog(log=log, file_id=data.file_id, offset=data.next_offset)
                if not data.eof:
                    continue
                if not request.follow:
                    return
                await asyncio.sleep(FOLLOW_SECONDS)
        finally:
            if request.follow:
                left = self._follows.get(iid, 1) - 1
                if left > 0:
                    self._follows[iid] = left
                else:
                    self._follows.pop(iid, None)

    @grpc_edge
    async def SaveLog(self, request: observe_pb2.SaveLogRequest, context: Context) -> observe_pb2.SavedLog:
        inst, log = split_log(request.name)
        iid, tenant = self._guest(context, inst, "name")
        first = (await self._call(iid, read_log=agent_pb2.ReadLog(log=log, max_bytes=1))).log_data
        object_id = f"log-{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        async with self.store.open_writer(object_id, tenant, max_bytes=SAVE_MAX_BYTES) as writer:
            # Oldest generation first, each file followed by its identity until its end; a file that rotates
            # on meanwhile is finished where it went, and the next generation is read after it.
            for generation in range(first.generations, -1, -1):
                piece = (await self._call(iid, read_log=agent_pb2.ReadLog(log=log, generation=generation))).log_data
                file_id = piece.file_id
                while True:
                    digest.update(piece.data)
                    await writer.write(piece.data)
                    if piece.eof or not file_id:
                        break
                    piece = (await self._call(iid, read_log=agent_pb2.ReadLog(
                        log=log, file_id=file_id, offset=piece.next_offset))).log_data
                    if piece.file_id != file_id:
                        break  # it moved on to a newer file: that one is read as its own generation
            stored = await writer.commit(digest.hexdigest())
        out = observe_pb2.SavedLog(name=f"instances/{iid}/logs/{log}", object_id=object_id,
                                   location=stored.location, size_bytes=stored.size_bytes, sha256=stored.sha256)
        out.create_time.FromDatetime(utcnow())
        return out

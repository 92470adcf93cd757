"""The datastore driver interface: what the agent's command loop asks of a datastore (MySQL/MariaDB first,
others side by side). Messages in and out are the agent API's own protobufs; errors are domain errors."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from reddwarf.v1 import agent_pb2, common_pb2, database_pb2

ProgressFn = Callable[[int, str], Awaitable[None]]


async def no_progress(percent: int, message: str) -> None:
    return None


class DatastoreDriver(ABC):
    name: str = "datastore"
    capabilities: tuple[str, ...] = ()

    @abstractmethod
    async def prepare(self, spec: agent_pb2.Prepare, progress: ProgressFn = no_progress) -> None: ...

    async def resume(self) -> None:
        """Called at agent start: restart what an earlier prepare set up (no-op if never prepared)."""

    @abstractmethod
    async def create_databases(self, databases: list[common_pb2.Database]) -> None: ...

    @abstractmethod
    async def delete_database(self, database: str) -> None: ...

    @abstractmethod
    async def list_databases(self, page_size: int, page_token: str) -> agent_pb2.DatabaseList: ...

    @abstractmethod
    async def create_users(self, users: list[common_pb2.User]) -> None: ...

    @abstractmethod
    async def delete_user(self, user: str, host: str) -> None: ...

    @abstractmethod
    async def get_user(self, user: str, host: str) -> common_pb2.User: ...

    @abstractmethod
    async def update_user(self, req: agent_pb2.UpdateUser) -> None: ...

    @abstractmethod
    async def grant_access(self, user: str, host: str, databases: list[str]) -> None: ...

    @abstractmethod
    async def revoke_access(self, user: str, host: str, database: str) -> None: ...

    @abstractmethod
    async def list_users(self, page_size: int, page_token: str) -> agent_pb2.UserList: ...

    @abstractmethod
    async def enable_root(self) -> database_pb2.RootCredentials: ...

    @abstractmethod
    async def disable_root(self) -> None: ...

    @abstractmethod
    async def root_status(self) -> database_pb2.RootStatus: ...

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @abstractmethod
    async def apply_limits(self, limits: common_pb2.Limits) -> None: ...

    @abstractmethod
    async def health(self) -> common_pb2.GuestHealth: ...

    async def close(self) -> None:
        """Stops supervised children at agent shutdown."""

"""The datastore driver interface: what the agent's command table asks of a datastore (MySQL/MariaDB first,
others side by side), and of its backups. Values in and out are the agent's own (agent/model.py), never
protobufs; errors are domain errors."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

from reddwarf.common.errors import FailedPrecondition

from . import model
from .logs import GuestLogs

ProgressFn = Callable[[int, str], Awaitable[None]]


async def no_progress(percent: int, message: str) -> None:
    return None


class Backups(Protocol):
    """Backups and restores of a datastore; the bytes go through `upload` and come back by `download`."""

    async def backup(self, backup_id: str, incremental_from_lsn: str, upload: model.Upload,
                     progress: model.Progress) -> model.BackupResult: ...

    async def restore(self, backup_ids: Sequence[str], sha256s: Sequence[str], download: model.Download,
                      progress: model.Progress) -> None: ...

    async def table_checksums(self) -> list[model.TableChecksum]: ...


class DatastoreDriver(ABC):
    name: str = "datastore"
    capabilities: tuple[str, ...] = ()

    @abstractmethod
    async def prepare(self, spec: model.Prepare, progress: ProgressFn = no_progress) -> None: ...

    async def resume(self) -> None:
        """Called at agent start: restart what an earlier prepare set up (no-op if never prepared)."""

    def backups(self) -> Backups | None:
        """The datastore's backups, or None where this driver has none."""
        return None

    def logs(self) -> GuestLogs | None:
        """The datastore's logs (error, slow_query, general), or None where this driver keeps none."""
        return None

    async def mysql_tls_request(self) -> model.TlsCsr:
        """A CSR for the datastore's TLS key (made once, kept in the guest); "" where it serves no TLS."""
        return model.TlsCsr(csr_pem="")

    async def install_mysql_tls(self, cert_pem: str, ca_pem: str) -> None:
        """A renewed certificate for the datastore's TLS key, served from the next connection on."""
        raise FailedPrecondition("this datastore serves no TLS", field="tls_cert_pem")

    @abstractmethod
    async def create_databases(self, databases: Sequence[model.Database]) -> None: ...

    @abstractmethod
    async def delete_database(self, database: str) -> None: ...

    @abstractmethod
    async def list_databases(self, page_size: int, page_token: str) -> model.DatabasePage: ...

    @abstractmethod
    async def create_users(self, users: Sequence[model.User]) -> None: ...

    @abstractmethod
    async def delete_user(self, user: str, host: str) -> None: ...

    @abstractmethod
    async def get_user(self, user: str, host: str) -> model.User: ...

    @abstractmethod
    async def update_user(self, update: model.UserUpdate) -> None: ...

    @abstractmethod
    async def grant_access(self, user: str, host: str, databases: Sequence[str]) -> None: ...

    @abstractmethod
    async def revoke_access(self, user: str, host: str, database: str) -> None: ...

    @abstractmethod
    async def list_users(self, page_size: int, page_token: str) -> model.UserPage: ...

    @abstractmethod
    async def enable_root(self) -> model.RootCredentials: ...

    @abstractmethod
    async def disable_root(self) -> None: ...

    @abstractmethod
    async def root_status(self) -> model.RootStatus: ...

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @abstractmethod
    async def apply_limits(self, limits: model.Limits) -> None: ...

    @abstractmethod
    async def health(self) -> model.GuestHealth: ...

    async def apply_configuration(self, values: Mapping[str, str]) -> model.ConfigurationApplied:
        """Makes `values` the datastore's whole set of configuration overrides (validated first, then all or
        nothing); FAILED_PRECONDITION where the datastore has none."""
        raise FailedPrecondition(f"{self.name} takes no configuration groups", field="configuration")

    async def close(self) -> None:
        """Stops supervised children at agent shutdown."""

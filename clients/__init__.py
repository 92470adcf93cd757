"""Red Dwarf clients: the SDK (`Client`, `AsyncClient`), the `reddwarf` CLI and the Trove REST gateway."""
from .aio import AsyncClient
from .config import ClientConfig, ConfigError, load_config
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ClientError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InstanceFailed,
    InstanceGone,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    WaitTimeout,
)
from .resources import DatabaseSpec, UserSpec
from .sdk import Client

__all__ = [
    "Aborted", "AlreadyExists", "AsyncClient", "Cancelled", "Client", "ClientConfig", "ClientError",
    "ConfigError", "DataLoss", "DatabaseSpec", "DeadlineExceeded", "FailedPrecondition", "FieldViolation",
    "InstanceFailed", "InstanceGone", "Internal", "InvalidArgument", "NotFound", "OutOfRange",
    "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable", "Unimplemented", "Unknown",
    "UserSpec", "WaitTimeout", "load_config",
]

"""The SDK's exceptions: one class per gRPC status code, built from the status and its google.rpc details.

Callers catch `reddwarf.client.NotFound` etc.; `InvalidArgument.field_violations` names the offending fields
the server put into a google.rpc.BadRequest detail.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ClientError(Exception):
    """Any failed call. `code` is the gRPC status code name ("NOT_FOUND")."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, field_violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.field_violations = field_violations

    @property
    def code_name(self) -> str:
        return self.code.name

    @property
    def field(self) -> str | None:
        """The first field named by the server, if any."""
        return self.field_violations[0].field if self.field_violations else None

    def one_line(self) -> str:
        """`NOT_FOUND: instance x not found (field: name)`: the CLI's error line."""
        text = f"{self.code_name}: {self.message}"
        if self.field_violations:
            text += " (field: " + ", ".join(v.field for v in self.field_violations) + ")"
        return text

    def __str__(self) -> str:
        return self.one_line()


class Cancelled(ClientError):
    code = grpc.StatusCode.CANCELLED


class Unknown(ClientError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(ClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(ClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(ClientError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(ClientError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(ClientError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(ClientError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(ClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(ClientError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class WaitTimeout(DeadlineExceeded):
    """wait_for gave up before the instance reached the wanted status."""


class InstanceGone(NotFound):
    """wait_for's watch ended because the instance was deleted."""


class InstanceFailed(FailedPrecondition):
    """wait_for saw the instance go to ERROR/FAILED instead of the wanted status."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.code: cls for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
        ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable,
        DataLoss, Unauthenticated)
}
_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def error_class(code: grpc.StatusCode) -> type[ClientError]:
    return _BY_CODE.get(code, Unknown)


def _violations_of(status: status_pb2.Status) -> tuple[FieldViolation, ...]:
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return tuple(found)


def _status_details(trailing: Any) -> status_pb2.Status | None:
    # Sync calls give a tuple of _Metadatum, aio calls a grpc.aio.Metadata; both iterate as (key, value).
    for item in trailing or ():
        key, value = item[0], item[1]
        if key == _STATUS_DETAILS_KEY:
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """The SDK exception for a failed sync or asyncio call, with the server's field violations."""
    code: grpc.StatusCode = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message: str = (exc.details() if hasattr(exc, "details") else "") or code.name  # type: ignore[attr-defined]
    violations: tuple[FieldViolation, ...] = ()
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None  # type: ignore[attr-defined]
    status = _status_details(trailing)
    if status is not None:
        violations = _violations_of(status)
        code = _BY_NUMBER.get(status.code, code)
        message = status.message or message
    return error_class(code)(message, violations)

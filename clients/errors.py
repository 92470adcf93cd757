"""The SDK's exceptions: one class per gRPC status code, built from the status and its google.rpc details.

Each class is the SDK's side of a row of the one error table (reddwarf.common.errors): it subclasses that
row, so its gRPC `code` and `http_status` are the table's, and `except reddwarf.common.errors.NotFound`
catches `reddwarf.client.NotFound` too. Callers catch `reddwarf.client.NotFound` etc.;
`InvalidArgument.field_violations` names the offending fields the server put into a google.rpc.BadRequest
detail.
"""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from reddwarf.common import errors


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class ClientError(errors.RedDwarfError):
    """Any failed call. `code` is the gRPC status code (`code_name` its name, "NOT_FOUND")."""

    code = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, field_violations: tuple[FieldViolation, ...] = ()) -> None:
        super().__init__(message, violations=[(v.field, v.description) for v in field_violations])
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


# One for each row of the table; the row first, so its code and http_status win over ClientError's.
class Cancelled(errors.Cancelled, ClientError): ...
class Unknown(errors.Unknown, ClientError): ...
class InvalidArgument(errors.InvalidArgument, ClientError): ...
class DeadlineExceeded(errors.DeadlineExceeded, ClientError): ...
class NotFound(errors.NotFound, ClientError): ...
class AlreadyExists(errors.AlreadyExists, ClientError): ...
class PermissionDenied(errors.PermissionDenied, ClientError): ...
class ResourceExhausted(errors.ResourceExhausted, ClientError): ...
class FailedPrecondition(errors.FailedPrecondition, ClientError): ...
class Aborted(errors.Aborted, ClientError): ...
class OutOfRange(errors.OutOfRange, ClientError): ...
class Unimplemented(errors.Unimplemented, ClientError): ...
class Internal(errors.Internal, ClientError): ...
class Unavailable(errors.Unavailable, ClientError): ...
class DataLoss(errors.DataLoss, ClientError): ...
class Unauthenticated(errors.Unauthenticated, ClientError): ...


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


def error_class(code: grpc.StatusCode) -> type[ClientError]:
    return _BY_CODE.get(code, Unknown)


def from_rpc_error(exc: grpc.RpcError) -> ClientError:
    """The SDK exception for a failed sync or asyncio call, with the server's field violations."""
    code, message, violations = errors.call_status(exc)
    err = error_class(code)(message, tuple(FieldViolation(f, d) for f, d in violations))
    err.retry_after = errors.call_retry_after(exc)  # a rate limit's RetryInfo: when to try again
    return err

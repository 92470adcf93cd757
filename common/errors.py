"""Domain errors raised inside every process, and the one table that carries them onto the wire.

Code deep inside raises a specific `RedDwarfError`; the servicer edge (the `grpc_edge` decorator, or
`abort`) turns it into a google.rpc.Status with google.rpc.BadRequest field violations that name
the offending field. Nothing returns error strings inside success responses.

Each class below is one row of the table (as in googleapis python-api-core's exceptions.py): it carries
its gRPC status code and the HTTP status the REST gateway answers with (Trove's choices: 413 for a quota,
422 for a precondition, 500 for anything the caller cannot act on). The SDK's exceptions
(`reddwarf.client.NotFound`, ...) subclass these rows, so every layer reads the same table:

    domain error         gRPC status           HTTP   SDK exception (reddwarf.client)
    Cancelled            CANCELLED             500    Cancelled
    Unknown              UNKNOWN               500    Unknown
    InvalidArgument      INVALID_ARGUMENT      400    InvalidArgument
    DeadlineExceeded     DEADLINE_EXCEEDED     503    DeadlineExceeded (WaitTimeout)
    NotFound             NOT_FOUND             404    NotFound (InstanceGone)
    AlreadyExists        ALREADY_EXISTS        409    AlreadyExists
    PermissionDenied     PERMISSION_DENIED     403    PermissionDenied
    ResourceExhausted    RESOURCE_EXHAUSTED    413*   ResourceExhausted
    FailedPrecondition   FAILED_PRECONDITION   422    FailedPrecondition (InstanceFailed)
    Aborted              ABORTED               500    Aborted
    OutOfRange           OUT_OF_RANGE          500    OutOfRange
    Unimplemented        UNIMPLEMENTED         500    Unimplemented
    Internal             INTERNAL              500    Internal
    Unavailable          UNAVAILABLE           503    Unavailable
    DataLoss             DATA_LOSS             500    DataLoss
    Unauthenticated      UNAUTHENTICATED       401    Unauthenticated

* 413 (Trove's overLimit) for a size or a quota, which retrying will not fix; 429 with Retry-After when the
  error carries `retry_after` (a google.rpc.RetryInfo detail on the wire): a rate limit, which waiting
  fixes. `http_status_of(err)` says which.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger("reddwarf.errors")

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class RedDwarfError(Exception):
    """A failure with a status: `code` (gRPC) and `http_status` (REST) come from the class, `violations`
    name the offending fields as (field, description) pairs."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    http_status: ClassVar[int] = 500

    def __init_subclass__(cls, *, code: grpc.StatusCode | None = None, http_status: int | None = None,
                          **kwargs: Any) -> None:
        """A row of the table: `class NotFound(RedDwarfError, code=NOT_FOUND, http_status=404)`."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status

    def __init__(self, message: str, *, field: str | None = None,
                 violations: Sequence[tuple[str, str]] = (), retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Seconds after which the same call may succeed (a rate limit); google.rpc.RetryInfo on the wire.
        self.retry_after = retry_after
        self.violations: list[tuple[str, str]] = list(violations)
        if field is not None:
            self.violations.insert(0, (field, message))


# One row a line: the class, its gRPC status, and the HTTP status when it is not 500.
class Cancelled(RedDwarfError, code=grpc.StatusCode.CANCELLED): ...
class Unknown(RedDwarfError, code=grpc.StatusCode.UNKNOWN): ...
class InvalidArgument(RedDwarfError, code=grpc.StatusCode.INVALID_ARGUMENT, http_status=400): ...
class DeadlineExceeded(RedDwarfError, code=grpc.StatusCode.DEADLINE_EXCEEDED, http_status=503): ...
class NotFound(RedDwarfError, code=grpc.StatusCode.NOT_FOUND, http_status=404): ...
class AlreadyExists(RedDwarfError, code=grpc.StatusCode.ALREADY_EXISTS, http_status=409): ...
class PermissionDenied(RedDwarfError, code=grpc.StatusCode.PERMISSION_DENIED, http_status=403): ...
class ResourceExhausted(RedDwarfError, code=grpc.StatusCode.RESOURCE_EXHAUSTED, http_status=413): ...
class FailedPrecondition(RedDwarfError, code=grpc.StatusCode.FAILED_PRECONDITION, http_status=422): ...
class Aborted(RedDwarfError, code=grpc.StatusCode.ABORTED): ...
class OutOfRange(RedDwarfError, code=grpc.StatusCode.OUT_OF_RANGE): ...
class Unimplemented(RedDwarfError, code=grpc.StatusCode.UNIMPLEMENTED): ...
class Internal(RedDwarfError, code=grpc.StatusCode.INTERNAL): ...
class Unavailable(RedDwarfError, code=grpc.StatusCode.UNAVAILABLE, http_status=503): ...
class DataLoss(RedDwarfError, code=grpc.StatusCode.DATA_LOSS): ...
class Unauthenticated(RedDwarfError, code=grpc.StatusCode.UNAUTHENTICATED, http_status=401): ...


# The table, one row per status code but OK, in the codes' order.
TABLE: tuple[type[RedDwarfError], ...] = (
    Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists, PermissionDenied,
    ResourceExhausted, FailedPrecondition, Aborted, OutOfRange, Unimplemented, Internal, Unavailable, DataLoss,
    Unauthenticated)

_BY_CODE: dict[grpc.StatusCode, type[RedDwarfError]] = {cls.code: cls for cls in TABLE}
_CODE_BY_NUMBER: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status code number (UNKNOWN for a number gRPC does not define)."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_class(code: grpc.StatusCode) -> type[RedDwarfError]:
    """The table's row for a status code (Unknown for OK, which is no error)."""
    return _BY_CODE.get(code, Unknown)


def http_status(code: grpc.StatusCode) -> int:
    return error_class(code).http_status


def http_status_of(err: RedDwarfError) -> int:
    """The HTTP status for err: its row's, except 429 for a ResourceExhausted that says when to retry."""
    return 429 if isinstance(err, ResourceExhausted) and err.retry_after is not None else err.http_status


def _cap(text: str, limit: int = 1000) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def to_status_pb(err: RedDwarfError) -> status_pb2.Status:
    """The google.rpc.Status for err, with a BadRequest detail when it names fields."""
    # Messages may quote the offending input: cap them, so a 10 kB hostile value cannot blow the status
    # past gRPC's metadata limit (which would turn a clear INVALID_ARGUMENT into an opaque transport error).
    st = status_pb2.Status(code=err.code.value[0], message=_cap(err.message))
    if err.violations:
        br = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=_cap(f, 200), description=_cap(d))
            for f, d in err.violations[:20]])
        detail = any_pb2.Any()
        detail.Pack(br)
        st.details.append(detail)
    if err.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, int(err.retry_after * 1e9)))
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        st.details.append(detail)
    return st


def retry_after_of(st: status_pb2.Status) -> float | None:
    """The seconds of the status's google.rpc.RetryInfo detail, if it has one."""
    for detail in st.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def violations_of(st: status_pb2.Status) -> list[tuple[str, str]]:
    """The (field, description) pairs of the google.rpc.BadRequest details in a status."""
    found: list[tuple[str, str]] = []
    for detail in st.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            found.extend((v.field, v.description) for v in br.field_violations)
    return found


def from_status_pb(st: status_pb2.Status) -> RedDwarfError | None:
    """The error a google.rpc.Status carries (None for OK): used on results relayed from agents."""
    if st.code == code_pb2.OK:
        return None
    return error_class(status_code(st.code))(st.message, violations=violations_of(st),
                                             retry_after=retry_after_of(st))


def _details_of(exc: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call's trailing metadata carries, if the server sent one."""
    # Sync calls give a tuple of _Metadatum, aio calls a grpc.aio.Metadata: at run time both iterate as
    # (key, value) pairs, which the stubs do not say of _Metadatum.
    trailing = cast(Iterable[tuple[str, str | bytes]] | None,
                    exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None)
    for key, value in trailing or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            return status_pb2.Status.FromString(value)
    return None


def call_retry_after(exc: grpc.RpcError) -> float | None:
    """The RetryInfo delay of a failed call (None when the server sent none)."""
    st = _details_of(exc)
    return None if st is None else retry_after_of(st)


def call_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, list[tuple[str, str]]]:
    """(code, message, field violations) of a failed sync or asyncio call, from its google.rpc.Status
    details when the server sent them. Unlike grpc_status.rpc_status.from_call this never raises: a
    status that disagrees with the call's own code is read as the status says."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    message = (exc.details() if hasattr(exc, "details") else None) or code.name
    st = _details_of(exc)
    if st is not None:
        return status_code(st.code), st.message or message, violations_of(st)
    return code, message, []


def from_rpc_error(exc: grpc.RpcError) -> RedDwarfError:
    """Turns a failed call's status (with its details) back into a domain error."""
    code, message, violations = call_status(exc)
    return error_class(code)(message, violations=violations, retry_after=call_retry_after(exc))


def ok_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)


F = TypeVar("F", bound=Callable[..., Any])


async def abort(context: grpc.aio.ServicerContext[Any, Any], err: RedDwarfError) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status_pb(err)))


def grpc_edge(fn: F) -> F:
    """Decorates an async servicer method (unary or server-streaming): domain errors become rich statuses;
    anything unexpected is logged and becomes INTERNAL without leaking its text."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                async for item in fn(self, request, context):
                    yield item
            except RedDwarfError as err:
                await abort(context, err)
            except (grpc.aio.AbortError, grpc.aio.UsageError):
                raise
            except Exception:
                log.exception("unhandled error method=%s", fn.__qualname__)
                await abort(context, Internal("internal error; see the server log"))
        return gen_wrapper  # type: ignore[return-value]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await fn(self, request, context)
        except RedDwarfError as err:
            await abort(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:
            log.exception("unhandled error method=%s", fn.__qualname__)
            await abort(context, Internal("internal error; see the server log"))
    return wrapper  # type: ignore[return-value]

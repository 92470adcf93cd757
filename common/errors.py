"""Domain errors raised inside every process, and their one mapping to gRPC status at the edge.

Code deep inside raises a specific `RedDwarfError`; the servicer edge (`grpc_edge` decorator or
`to_rpc_status`) turns it into a google.rpc.Status with google.rpc.BadRequest field violations that name
the offending field. Nothing returns error strings inside success responses.
"""
from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

log = logging.getLogger("reddwarf.errors")


class RedDwarfError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, field: str | None = None,
                 violations: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.violations: list[tuple[str, str]] = list(violations)
        if field is not None:
            self.violations.insert(0, (field, message))


class InvalidArgument(RedDwarfError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RedDwarfError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RedDwarfError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RedDwarfError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(RedDwarfError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(RedDwarfError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(RedDwarfError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(RedDwarfError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RedDwarfError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(RedDwarfError):
    code = grpc.StatusCode.ABORTED


class Internal(RedDwarfError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[int, type[RedDwarfError]] = {
    cls.code.value[0]: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, ResourceExhausted,
                PermissionDenied, Unauthenticated, Unavailable, DeadlineExceeded, Aborted, Internal)
}


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
    return st


def from_status_pb(st: status_pb2.Status) -> RedDwarfError | None:
    """The error a google.rpc.Status carries (None for OK): used on results relayed from agents."""
    if st.code == code_pb2.OK:
        return None
    violations: list[tuple[str, str]] = []
    for detail in st.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            violations.extend((v.field, v.description) for v in br.field_violations)
    cls = _BY_CODE.get(st.code, Internal)
    return cls(st.message, violations=violations)


def from_rpc_error(exc: grpc.RpcError) -> RedDwarfError:
    """Turns a failed call's status (with its details) back into a domain error."""
    st = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if st is not None:
        err = from_status_pb(st)
        if err is not None:
            return err
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code.value[0], Unavailable if code == grpc.StatusCode.UNAVAILABLE else Internal)
    return cls(exc.details() if hasattr(exc, "details") else str(exc))


def ok_status() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)


F = TypeVar("F", bound=Callable[..., Any])


async def abort(context: grpc.aio.ServicerContext, err: RedDwarfError) -> None:
    await context.abort_with_status(rpc_status.to_status(to_status_pb(err)))


def grpc_edge(fn: F) -> F:
    """Decorates an async servicer method (unary or server-streaming): domain errors become rich statuses;
    anything unexpected is logged and becomes INTERNAL without leaking its text."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def gen_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
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
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
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

"""The one error table (reddwarf.common.errors): domain error → gRPC status → HTTP status → SDK exception."""
from __future__ import annotations

import grpc
import pytest

from reddwarf import client
from reddwarf.client import errors as sdk
from reddwarf.common import errors


def test_every_status_code_but_ok_has_one_row() -> None:
    assert {row.code for row in errors.TABLE} == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert len(errors.TABLE) == len(grpc.StatusCode) - 1


@pytest.mark.parametrize("row", errors.TABLE, ids=lambda row: row.__name__)
def test_each_sdk_exception_is_its_row_with_the_rows_codes(row: type[errors.RedDwarfError]) -> None:
    cls = sdk.error_class(row.code)
    assert issubclass(cls, row) and issubclass(cls, client.ClientError)
    assert cls.__name__ == row.__name__ and getattr(client, row.__name__) is cls
    assert (cls.code, cls.http_status) == (row.code, row.http_status)


def test_http_statuses_are_troves() -> None:
    """The REST gateway answers these (python-troveclient maps them onto its own exceptions)."""
    assert {row.code.name: row.http_status for row in errors.TABLE if row.http_status != 500} == {
        "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
        "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 413, "FAILED_PRECONDITION": 422, "UNAVAILABLE": 503,
        "DEADLINE_EXCEEDED": 503}


def test_wait_errors_keep_their_rows() -> None:
    assert sdk.WaitTimeout.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert issubclass(sdk.InstanceGone, errors.NotFound)
    assert issubclass(sdk.InstanceFailed, errors.FailedPrecondition)


def test_a_status_round_trips_with_its_field_violations() -> None:
    err = errors.ResourceExhausted("no room", field="instance.flavor")
    back = errors.from_status_pb(errors.to_status_pb(err))
    assert type(back) is errors.ResourceExhausted
    assert back.message == "no room" and back.violations == [("instance.flavor", "no room")]


class _FailedCall(grpc.RpcError):
    """What a sync call raises: an RpcError that is also the call, trailing metadata as (key, value)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple[tuple[str, bytes], ...]) -> None:
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, bytes], ...]:  # type: ignore[override]  # what sync calls give
        return self._trailing


def test_a_failed_call_becomes_the_domain_error_and_the_sdk_exception_of_one_row() -> None:
    status = errors.to_status_pb(errors.InvalidArgument("bad name", field="name"))
    call = _FailedCall(grpc.StatusCode.INVALID_ARGUMENT, "bad name",
                       ((errors.STATUS_DETAILS_KEY, status.SerializeToString()),))
    domain = errors.from_rpc_error(call)
    assert type(domain) is errors.InvalidArgument and domain.violations == [("name", "bad name")]
    raised = sdk.from_rpc_error(call)
    assert type(raised) is sdk.InvalidArgument and raised.field == "name"
    assert isinstance(raised, errors.InvalidArgument)
    assert str(raised) == "INVALID_ARGUMENT: bad name (field: name)"


def test_a_failed_call_without_details_keeps_its_code() -> None:
    call = _FailedCall(grpc.StatusCode.UNAVAILABLE, "", ())
    assert type(errors.from_rpc_error(call)) is errors.Unavailable
    raised = sdk.from_rpc_error(call)
    assert type(raised) is sdk.Unavailable and raised.message == "UNAVAILABLE"

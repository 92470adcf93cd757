"""Counts every API call by method and gRPC status code (and times the unary ones): the outermost
interceptor of the API port, so calls refused by authentication or the rate limiter are counted too.

The hot path is a dictionary lookup, one counter increment and one histogram observation: each method's
labelled children are made once, at the first call of that method. Only methods the server has are
labelled (an unknown method gets no handler and is not counted), so the label set is bounded by the code.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import Counter, Histogram

from .app import Context

_OK = grpc.StatusCode.OK
_UNKNOWN = grpc.StatusCode.UNKNOWN
_CANCELLED = grpc.StatusCode.CANCELLED
_BY_VALUE = {c.value[0]: c for c in grpc.StatusCode}


def _code_of(context: Context, failed: BaseException | None) -> grpc.StatusCode:
    """The status the call ends with: what the servicer or an interceptor set (an abort sets it before it
    raises), else OK, or UNKNOWN/CANCELLED for an exception that carries none."""
    code: object = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio hands back the raw integer of the status it will send
        return _BY_VALUE.get(code, _UNKNOWN)
    if failed is None:
        return _OK
    return _CANCELLED if isinstance(failed, asyncio.CancelledError) else _UNKNOWN


class ApiMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, calls: Counter, seconds: Histogram) -> None:
        self.calls = calls
        self.seconds = seconds
        # method -> (its duration child, {code: its counter child})
        self._children: dict[str, tuple[Any, dict[grpc.StatusCode, Any]]] = {}

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        by_code = self._children[method][1]
        child = by_code.get(code)
        if child is None:
            child = by_code[code] = self.calls.labels(method, code.name)
        child.inc()

    async def intercept_service(self, continuation: Callable[..., Any],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if method not in self._children:
            self._children[method] = (self.seconds.labels(method), {})
        timer = self._children[method][0]
        count = self._count

        def unary(behavior: Callable[..., Any], timed: bool) -> Callable[..., Any]:
            async def wrapper(request: Any, context: Context) -> Any:
                start = time.perf_counter()
                try:
                    response = behavior(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                except BaseException as exc:
                    count(method, _code_of(context, exc))
                    raise
                finally:
                    if timed:
                        timer.observe(time.perf_counter() - start)
                count(method, _code_of(context, None))
                return response
            return wrapper

        def stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
            async def wrapper(request: Any, context: Context) -> Any:
                try:
                    async for item in behavior(request, context):
                        yield item
                except BaseException as exc:
                    count(method, _code_of(context, exc))
                    raise
                count(method, _code_of(context, None))
            return wrapper

        de, ser = handler.request_deserializer, handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary, True), de, ser)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(stream(handler.unary_stream), de, ser)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary, False), de, ser)
        if handler.stream_stream:
            return grpc.stream_stream_rpc_method_handler(stream(handler.stream_stream), de, ser)
        return handler

"""The gateway's routes dispatched from a dict: the request's path split at '/' is looked up by its length and
its fixed segments, and only the few routes of that bucket are compared, segment by segment. Starlette's Router
tries every route's regex in turn (about fifty here) and passes four middleware layers first.

The answer is Starlette's own: among the routes whose path matches, in the order they were declared, the first
whose methods allow the request's runs; anything else (no match, a match for another method: 404 / 405, a path
with a trailing slash, a sync endpoint) goes to the Starlette app as before, so its handlers answer. A path
parameter matches one non-empty segment, as Starlette's default `str` convertor does.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

Endpoint = Callable[[Request], Awaitable[Response]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


@dataclass(frozen=True)
class _Entry:
    parts: tuple[str | None, ...]   # a fixed segment, or None where a parameter stands
    names: tuple[str, ...]          # the parameters' names, in the order they stand
    methods: frozenset[str]
    endpoint: Endpoint | None       # None: not async, Starlette runs it (in its thread pool)


def _key(parts: tuple[str | None, ...]) -> tuple[int, str | None, str | None]:
    return len(parts), parts[1] if len(parts) > 1 else None, parts[3] if len(parts) > 3 else None


class DictRouter:
    """ASGI app: the routes of `app` from a dict, `app` itself for whatever the dict does not settle."""

    def __init__(self, app: Starlette, errors: dict[int, ErrorHandler]) -> None:
        self.app, self.errors = app, errors
        self.buckets: dict[tuple[int, str | None, str | None], list[_Entry]] = {}
        for r in app.routes:
            if not isinstance(r, Route):
                raise TypeError(f"{r!r}: only plain routes are dispatched from the dict")
            parts = tuple(None if p.startswith("{") else p for p in r.path.split("/"))
            names = tuple(p.strip("{}") for p in r.path.split("/") if p.startswith("{"))
            if any(":" in n for n in names):
                raise ValueError(f"{r.path}: typed path parameters are not dispatched from the dict")
            if (len(parts) > 1 and parts[1] is None) or (len(parts) > 3 and parts[3] is None):
                # The bucket key is the fixed 2nd and 4th segments: a parameter there would need every bucket.
                raise ValueError(f"{r.path}: the 2nd and 4th segments must be fixed")
            endpoint = r.endpoint if inspect.iscoroutinefunction(r.endpoint) else None
            self.buckets.setdefault(_key(parts), []).append(
                _Entry(parts, names, frozenset(r.methods or {"GET", "HEAD"}), endpoint))

    def match(self, method: str, path: str) -> tuple[_Entry, dict[str, str]] | None:
        """The route Starlette would run for a full match, with its path parameters; None for anything else."""
        segments = path.split("/")
        for e in self.buckets.get(_key(tuple(segments)), ()):
            params = []
            for want, got in zip(e.parts, segments, strict=True):
                if want is None:
                    if not got:
                        break
                    params.append(got)
                elif want != got:
                    break
            else:
                if method in e.methods:
                    return e, dict(zip(e.names, params, strict=True))
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = self.match(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if found is None or found[0].endpoint is None:
            await self.app(scope, receive, send)
            return
        entry, params = found
        scope["app"] = self.app
        scope["router"] = self.app.router
        scope["endpoint"] = entry.endpoint
        scope["path_params"] = params
        request = Request(scope, receive, send)
        started = False

        async def sent(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            assert entry.endpoint is not None
            response = await entry.endpoint(request)
            await response(scope, receive, sent)
        except HTTPException as exc:  # what Starlette's ExceptionMiddleware does with one
            if started:
                raise
            handler = self.errors.get(exc.status_code)
            if handler is not None:
                response = await handler(request, exc)
            else:
                response = PlainTextResponse(exc.detail, status_code=exc.status_code, headers=exc.headers)
            await response(scope, receive, send)
        except Exception:  # what Starlette's ServerErrorMiddleware does: a bare 500, and the server logs it
            if not started:
                await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
            raise

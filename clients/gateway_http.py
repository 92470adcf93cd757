"""The gateway's HTTP/1.1 protocol: uvicorn's httptools protocol (llhttp, C) with the protections uvicorn does not
have, and its two writes per response made one.

- a request head (request line and headers) at most max_header_bytes: 431 and the connection closed, whether the
  head is still arriving or came whole in one read;
- a request head complete within header_seconds of the connection or of the first byte of its next request,
  else the connection is closed (uvicorn only times out idle keep-alive connections, and a byte resets that);
- the body of a request already answered (a 413, say) still arriving drain_seconds after the answer: closed
  (uvicorn's httptools protocol drops such bytes, and would take them forever);
- exactly one Host header in an HTTP/1.1 request (400 otherwise), as h11 required; llhttp itself refuses a
  doubled or malformed Content-Length and Content-Length with Transfer-Encoding (400).

httptools gives no parser state, so the protocol keeps its own: `_in_head` from the start of a request to its
headers (parser callbacks on_message_begin / on_headers_complete), `_in_body` from there to on_message_complete.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from . import trove


class HeadTooLarge(Exception):
    """Raised from a parser callback: the head that just completed is over the cap."""


class BadHost(Exception):
    """Raised from a parser callback: no Host header in an HTTP/1.1 request, or more than one."""


class _Corked:
    """The connection's transport as the request cycle sees it: writes made in one turn of the event loop go out
    as one. uvicorn writes a response's head and its body separately; both come from the same Response call
    without a pause between them, so they leave in one send (one syscall, one segment for the client to read)
    at the end of the turn. close() and anything else go to the transport, close after what is held."""

    __slots__ = ("_t", "_held", "_loop")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._t, self._loop = transport, loop
        self._held: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(bytes(data))

    def flush(self) -> None:
        if self._held:
            data = b"".join(self._held) if len(self._held) > 1 else self._held[0]
            self._held = []
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


def _refusal(status: int, reason: bytes, message: str) -> bytes:
    body = json.dumps(trove.fault(status, message)).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))) + body


def guarded_protocol(max_header_bytes: int, header_seconds: float, drain_seconds: float) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn.Config(http=...), with these limits."""
    too_large = _refusal(431, b"Request Header Fields Too Large",
                         f"request line and headers larger than {max_header_bytes} bytes")

    class GuardedHttpTools(HttpToolsProtocol):
        _head_timer: asyncio.TimerHandle | None = None
        _drain_timer: asyncio.TimerHandle | None = None
        _drain_cycle: object = None
        _in_head = True       # a head is awaited or arriving: from connection / message complete to headers
        _in_body = False      # headers seen, the message not yet complete
        _head_bytes = 0       # bytes received while _in_head (at most one read's worth low: see data_received)
        _corked: _Corked

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn narrows it to Transport
            self._corked = _Corked(self.transport, self.loop)
            self._head_started()

        # -- the head deadline ------------------------------------------------------------------
        # One timer per connection, not one per request: a head that starts records its start time, and the
        # timer, when it fires, closes the connection if a head is still incomplete past its deadline, sets
        # itself again for the head in progress, or lapses while none is (on_message_begin arms it anew).
        _head_since = 0.0

        def _head_started(self) -> None:
            self._head_since = self.loop.time()
            if self._head_timer is None:
                self._head_timer = self.loop.call_at(self._head_since + header_seconds, self._head_due)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_due(self) -> None:
            self._head_timer = None
            if not self._in_head or self._head_since == 0.0 or self.transport.is_closing():
                return
            due = self._head_since + header_seconds
            if self.loop.time() < due:
                self._head_timer = self.loop.call_at(due, self._head_due)
                return
            self.logger.warning("request head not complete within %s s; closing %s", header_seconds, self.client)
            self._corked.close()

        def _refuse_head(self) -> None:
            self.logger.warning("request head over %s bytes from %s; closing", max_header_bytes, self.client)
            self._disarm()
            self._corked.flush()
            self.transport.write(too_large)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():  # refused already; what is still in flight is not parsed
                return
            self._unset_keepalive_if_required()
            if self._in_head:
                # Counted before parsing: a read that completes a head (and carries body bytes) resets it in
                # on_headers_complete, where the head's exact size is checked. A head that begins in the
                # middle of a read (pipelining) is counted from the next read on: low by one read at most.
                self._head_bytes += len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                self._unsupported_upgrade_warning()  # ws="none": answered as plain HTTP, as uvicorn does
            except httptools.HttpParserError:  # a callback's error too (HeadTooLarge: _head_bytes says so)
                self._invalid()
                return
            if self._in_head and self._head_bytes > max_header_bytes:
                self._refuse_head()

        def _invalid(self) -> None:
            if self._in_head and self._head_bytes > max_header_bytes:
                self._refuse_head()
                return
            self.logger.warning("Invalid HTTP request received.")
            self._corked.flush()
            self.send_400_response("Invalid HTTP request received.")

        # -- parser callbacks -------------------------------------------------------------------
        def on_message_begin(self) -> None:
            # The first byte of a request: its head's deadline runs from here, or from the connection for
            # the first request.
            self._in_head = True
            if self._head_since == 0.0:
                self._head_started()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            size, hosts = len(self.url), 0
            for k, v in self.headers:
                size += len(k) + len(v) + 4
                hosts += k == b"host"
            if size > max_header_bytes:
                self._head_bytes = size
                raise HeadTooLarge  # feed_data stops and raises HttpParserCallbackError: 431
            if hosts > 1 or (hosts == 0 and self.parser.get_http_version() == "1.1"):
                # RFC 9112 3.2: exactly one Host in HTTP/1.1, as h11 (the protocol before this one) required.
                raise BadHost  # 400, as any other malformed request
            self._in_head, self._in_body, self._head_bytes, self._head_since = False, True, 0, 0.0
            super().on_headers_complete()
            if self.cycle is not None:
                self.cycle.transport = self._corked  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            self._in_body = False
            self._in_head = True  # the next request's head, whenever its first byte comes (on_message_begin)
            super().on_message_complete()

        # -- the rest of an answered request's body ---------------------------------------------
        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self._in_body and self._drain_timer is None:
                self._drain_cycle = self.cycle
                self._drain_timer = self.loop.call_later(drain_seconds, self._drain_late)

        def _drain_late(self) -> None:
            self._drain_timer = None
            # Only the answered request's body: a later request on the connection has a cycle of its own.
            if self.cycle is self._drain_cycle and self._in_body and not self.transport.is_closing():
                self.logger.warning("body of an answered request still arriving after %s s; closing %s",
                                    drain_seconds, self.client)
                self._corked.close()

        def shutdown(self) -> None:
            self._corked.flush()  # a response held this turn goes out before uvicorn closes an idle connection
            super().shutdown()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._drain_timer is not None:
                self._drain_timer.cancel()
                self._drain_timer = None
            super().connection_lost(exc)

    return GuardedHttpTools

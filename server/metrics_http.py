"""The /metrics listener: plain HTTP on a loopback address only; anywhere else (or with metrics_tls = on)
HTTPS with the server's own certificate, which must be answered with a client certificate from the
deployment CA of role `monitor` (or `admin`), not revoked. Guests hold instance certificates from the same
CA: they are refused, so a guest cannot read the other tenants' series.

It runs in threads of its own (prometheus_client renders in the calling thread), never on the event loop;
a renewed server certificate is served from the next handshake on, as the gRPC ports do.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import socketserver
import ssl
import threading
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler

from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import Identity, TlsFiles, identity_from_cert

log = logging.getLogger("reddwarf.server.metrics")

SCRAPER_ROLES = ("monitor", "admin")
MAX_CONNECTIONS = 8          # scrapers at once; more are closed at once
HANDSHAKE_TIMEOUT = 10.0
# Answers with a reason to refuse that identity, or None to let it scrape.
Authorize = Callable[[Identity], str | None]


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def needs_tls(address: str, mode: str) -> bool:
    return mode == "on" or not is_loopback(split_address(address)[0])


class _ReloadingContext:
    """An SSL context for the current server certificate files, rebuilt when they change (renewal)."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._ctx = self._build()

    def _build(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(self.files.cert), str(self.files.key))
        ctx.load_verify_locations(cafile=str(self.files.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._stamp = (os.stat(self.files.cert).st_mtime_ns, os.stat(self.files.key).st_mtime_ns)
        return ctx

    def current(self) -> ssl.SSLContext:
        with self._lock:
            try:
                stamp = (os.stat(self.files.cert).st_mtime_ns, os.stat(self.files.key).st_mtime_ns)
                if stamp != self._stamp:
                    self._ctx = self._build()
                    log.info("metrics listener serves a renewed certificate")
            except (OSError, ssl.SSLError) as exc:  # mid-renewal: keep the last good one
                log.warning("metrics certificate reload failed", extra={"error": str(exc)[:200]})
            return self._ctx


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    tls: _ReloadingContext | None = None
    authorize: Authorize | None = None

    def __init__(self, address: tuple[str, int], handler: type[MetricsHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's would look our name up in DNS
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = self.socket.accept()
        if self.tls is not None:
            # The handshake runs in the connection's own thread (setup), so a slow peer holds no one else up.
            sock = self.tls.current().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("metrics connection failed", exc_info=True)


class _Handler(MetricsHandler):
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(HANDSHAKE_TIMEOUT)
        if isinstance(self.request, ssl.SSLSocket):
            self.request.do_handshake()
        super().setup()

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._refuse(404, "only /metrics is served here")
            return
        if isinstance(self.connection, ssl.SSLSocket):
            reason = self._refusal()
            if reason is not None:
                self._refuse(403, reason)
                return
        super().do_GET()

    def _refusal(self) -> str | None:
        assert isinstance(self.connection, ssl.SSLSocket)
        der = self.connection.getpeercert(binary_form=True)
        if der is None:
            return "a client certificate from the deployment CA is required"
        try:
            ident = identity_from_cert(ssl.DER_cert_to_PEM_cert(der))
        except InvalidArgument as err:
            return err.message
        if ident.role not in SCRAPER_ROLES:
            return f"{ident.uri} may not scrape metrics: a monitor (or admin) certificate is required"
        return self.server.authorize(ident) if self.server.authorize is not None else None

    def _refuse(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("metrics request " + format, *args)


class MetricsListener:
    """Serves `registry` at http(s)://address/metrics from a daemon thread until stop()."""

    def __init__(self, address: str, registry: CollectorRegistry, tls: TlsFiles | None = None,
                 authorize: Authorize | None = None) -> None:
        handler = type("RegistryHandler", (_Handler,), {"registry": registry})
        self._server = _Server(split_address(address), handler)
        self._server.tls = _ReloadingContext(tls) if tls is not None else None
        self._server.authorize = authorize
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

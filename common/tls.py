"""mTLS for every gRPC port: credentials, channels, and the caller's identity from its verified certificate.

gRPC verifies the chain against our CA (and, with require_client_auth, refuses peers without a
certificate); what it does not do is read our identity or honour a CRL, so `peer_identity` and
`RevocationList` do that for the servicers.
"""
from __future__ import annotations

import ipaddress
import os
import threading
from pathlib import Path

import grpc

from .errors import InvalidArgument
from .pki import Identity, TlsFiles, identity_from_cert, revoked_in_crl

__all__ = [
    "SERVER_OPTIONS",
    "RevocationList",
    "TlsFiles",
    "aio_channel",
    "channel_credentials",
    "channel_options",
    "peer_identity",
    "server_credentials",
    "sync_channel",
]

# Certificates of servers and hosts always carry DNS "localhost" (see pki.issue): when we dial an IP
# literal we ask gRPC to verify that name, so a certificate for another role cannot pose as the server.
_SERVER_NAME = "localhost"
_KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
              ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


# Servers accept the clients' keepalive pings (every 20 s, also between calls: idle agent streams), instead
# of answering them with GOAWAY "too_many_pings".
SERVER_OPTIONS = [("grpc.keepalive_permit_without_calls", 1),
                  ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                  ("grpc.http2.max_ping_strikes", 0)]


def server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None,
                       require_client_auth: bool = True) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=require_client_auth)


def channel_credentials(ca_pem: bytes, cert_pem: bytes | None = None,
                        key_pem: bytes | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)


def channel_options(address: str, server_name: str | None = None) -> list[tuple[str, object]]:
    host = address.rsplit(":", 1)[0].strip("[]")
    opts: list[tuple[str, object]] = list(_KEEPALIVE)
    name = server_name
    if name is None:
        try:
            ipaddress.ip_address(host)
            name = _SERVER_NAME
        except ValueError:
            name = None
    if name:
        opts.append(("grpc.ssl_target_name_override", name))
    return opts


def _creds(files_or_creds: TlsFiles | grpc.ChannelCredentials) -> grpc.ChannelCredentials:
    if isinstance(files_or_creds, TlsFiles):
        cert, key, ca = files_or_creds.read()
        return channel_credentials(ca, cert, key)
    return files_or_creds


def aio_channel(address: str, files_or_creds: TlsFiles | grpc.ChannelCredentials,
                server_name: str | None = None) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, _creds(files_or_creds),
                                   options=channel_options(address, server_name))


def sync_channel(address: str, files_or_creds: TlsFiles | grpc.ChannelCredentials,
                 server_name: str | None = None) -> grpc.Channel:
    return grpc.secure_channel(address, _creds(files_or_creds),
                               options=channel_options(address, server_name))


def peer_identity(context: grpc.ServicerContext | grpc.aio.ServicerContext) -> Identity | None:
    """The identity proven by the peer's verified client certificate, or None (no cert, or not ours)."""
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert") or []
    if not pems:
        return None
    try:
        return identity_from_cert(pems[0])
    except (ValueError, InvalidArgument):  # a CA-signed cert without our URI: no identity
        return None


class RevocationList:
    """Revoked serials from a CA-signed crl.pem, reloaded when the file changes (hostd has no DB)."""

    def __init__(self, crl_path: str | Path | None, ca_pem: bytes) -> None:
        self._path = Path(crl_path) if crl_path else None
        self._ca_pem = ca_pem
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    def is_revoked(self, serial: int) -> bool:
        if self._path is None:
            return False
        with self._lock:
            try:
                st = os.stat(self._path)
            except FileNotFoundError:
                return False
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._serials = revoked_in_crl(self._path.read_bytes(), self._ca_pem)
                self._stamp = stamp
            return serial in self._serials

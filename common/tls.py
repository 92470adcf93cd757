"""mTLS for every gRPC port: credentials, channels, and the caller's identity from its verified certificate.

gRPC verifies the chain against our CA (and, with require_client_auth, refuses peers without a
certificate); what it does not do is read our identity or honour a CRL, so `peer_identity` and
`RevocationList` do that for the servicers.

Every channel names the peer it expects, `server/*` (the default: SDK, CLI, gateway, agents) or
`host/<id>` (the server dialling one hostd), and gRPC verifies the matching role name
(`server.reddwarf`, `<id>.host.reddwarf`, see pki.role_dns_names) during the handshake, whatever address
was dialled: a host or instance certificate, or another host's, fails the handshake.
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import threading
from pathlib import Path
from typing import Any

import grpc

from .errors import FailedPrecondition, InvalidArgument, Unauthenticated
from .pki import (
    Crl,
    Identity,
    TlsFiles,
    identity_from_cert,
    load_crl,
    role_dns_names,
    validate_role_id,
    write_atomic,
)

log = logging.getLogger("reddwarf.tls")

__all__ = [
    "AGENT_MAX_CONCURRENT_STREAMS",
    "MAX_CONCURRENT_STREAMS",
    "SERVER_OPTIONS",
    "SERVER_PEER",
    "RevocationList",
    "TlsFiles",
    "agent_server_options",
    "aio_channel",
    "channel_credentials",
    "channel_options",
    "host_peer",
    "peer_identity",
    "peer_name",
    "reloading_server_credentials",
    "server_credentials",
    "sync_channel",
]

SERVER_PEER = "server/*"


def host_peer(host_id: str) -> str:
    return f"host/{host_id}"


def peer_name(expect: str) -> str:
    """The DNS name gRPC must verify for the expected peer: `server/*` (any control server) or
    `host/<id>` (exactly that host)."""
    role, _, id = expect.partition("/")
    if role == "server" and id in ("*", ""):
        return role_dns_names("server", "x")[0]
    if role in ("server", "host") and id:
        validate_role_id(role, id)
        return role_dns_names(role, id)[-1]
    raise InvalidArgument(f"expected peer must be server/* or host/<id>, got {expect!r}", field="peer")

_KEEPALIVE = [("grpc.keepalive_time_ms", 20_000), ("grpc.keepalive_timeout_ms", 10_000),
              ("grpc.keepalive_permit_without_calls", 1), ("grpc.http2.max_pings_without_data", 0)]


# Every gRPC server (API, agent, enrollment, hostd) limits each connection:
# - at most MAX_CONCURRENT_STREAMS calls open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS: a client
#   asking for more waits for one to end; it cannot open thousands);
# - keepalive pings are accepted every 10 s or slower, also between calls (the clients of _KEEPALIVE ping
#   every 20 s, idle agent streams included), and a peer pinging faster is sent GOAWAY "too_many_pings"
#   after 2 strikes (gRPC's default) instead of being answered for ever. Sending data resets the strikes.
MAX_CONCURRENT_STREAMS = 100
SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_concurrent_streams", MAX_CONCURRENT_STREAMS),
    ("grpc.keepalive_permit_without_calls", 1),
    # (gRPC core's name for GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; an unknown name is ignored
    # silently and the 5-minute default made every call longer than a minute end in "too_many_pings")
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 2)]

# A guest agent holds one Connect stream and uploads or downloads one backup at a time.
AGENT_MAX_CONCURRENT_STREAMS = 8


def agent_server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """SERVER_OPTIONS for the agent port: fewer streams per connection, and no message larger than
    max_message_bytes (a backup upload chunk is 1 MiB; everything else an agent sends is far smaller)."""
    opts = dict(SERVER_OPTIONS)
    opts["grpc.max_concurrent_streams"] = AGENT_MAX_CONCURRENT_STREAMS
    opts["grpc.max_receive_message_length"] = max_message_bytes
    return list(opts.items())


def server_credentials(cert_pem: bytes, key_pem: bytes, ca_pem: bytes | None,
                       require_client_auth: bool = True) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem,
                                       require_client_auth=require_client_auth)


def channel_credentials(ca_pem: bytes, cert_pem: bytes | None = None,
                        key_pem: bytes | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                        certificate_chain=cert_pem)


def key_matches(cert_pem: bytes, key_pem: bytes) -> bool:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key = serialization.load_pem_private_key(key_pem, password=None)
    return bool(key.public_key().public_bytes(*spki)
                == x509.load_pem_x509_certificate(cert_pem).public_key().public_bytes(*spki))


def reloading_server_credentials(files: TlsFiles, require_client_auth: bool = True,
                                 client_ca: bool = True) -> grpc.ServerCredentials:
    """Server credentials that follow `files`: a renewed certificate (the same paths rewritten) is served
    from the next handshake on, without a restart. client_ca=False serves without asking for client
    certificates (the enrollment port)."""
    stamp: list[tuple[int, int, int, int] | None] = [None]

    def current() -> tuple[tuple[int, int, int, int], grpc.ServerCertificateConfiguration]:
        st_c, st_k = os.stat(files.cert), os.stat(files.key)
        cert, key, ca = files.read()
        if not key_matches(cert, key):  # caught mid-renewal (key written, certificate not yet)
            raise ValueError("certificate and key do not match")
        config = grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca if client_ca else None)
        return (st_c.st_mtime_ns, st_c.st_size, st_k.st_mtime_ns, st_k.st_size), config

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            st_c, st_k = os.stat(files.cert), os.stat(files.key)
            if (st_c.st_mtime_ns, st_c.st_size, st_k.st_mtime_ns, st_k.st_size) == stamp[0]:
                return None
            stamp[0], config = current()
            log.info("serving a renewed certificate", extra={"cert": str(files.cert)})
            return config
        except (OSError, ValueError) as exc:  # keep serving the last good certificate
            log.warning("certificate reload failed", extra={"cert": str(files.cert), "error": str(exc)})
            return None

    stamp[0], initial = current()
    # types-grpcio wants the fetcher to always return a configuration; gRPC documents None as "no change".
    return grpc.dynamic_ssl_server_credentials(initial, fetch,  # type: ignore[arg-type]
                                               require_client_authentication=require_client_auth)


def channel_options(address: str, peer: str = SERVER_PEER) -> list[tuple[str, object]]:
    """Keepalives, and the role name gRPC verifies on the peer's certificate (see peer_name). `address` is
    kept for callers; the name checked never depends on it."""
    opts: list[tuple[str, object]] = list(_KEEPALIVE)
    opts.append(("grpc.ssl_target_name_override", peer_name(peer)))
    return opts


def _creds(files_or_creds: TlsFiles | grpc.ChannelCredentials) -> grpc.ChannelCredentials:
    if isinstance(files_or_creds, TlsFiles):
        cert, key, ca = files_or_creds.read()
        return channel_credentials(ca, cert, key)
    return files_or_creds


def aio_channel(address: str, files_or_creds: TlsFiles | grpc.ChannelCredentials,
                peer: str = SERVER_PEER) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, _creds(files_or_creds), options=channel_options(address, peer))


def sync_channel(address: str, files_or_creds: TlsFiles | grpc.ChannelCredentials,
                 peer: str = SERVER_PEER) -> grpc.Channel:
    return grpc.secure_channel(address, _creds(files_or_creds), options=channel_options(address, peer))


def peer_identity(context: grpc.aio.ServicerContext[Any, Any]) -> Identity | None:
    """The identity proven by the peer's verified client certificate, or None (no cert, or not ours)."""
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        return None
    try:
        return identity_from_cert(pems[0])
    except (ValueError, InvalidArgument):  # a CA-signed cert without our URI: no identity
        return None


class RevocationList:
    """The newest current CA-signed CRL hostd holds, and the only judge of revoked serials there.

    Sources: `path`, where pushed lists are kept (they survive a restart), and optionally `seed`, a file an
    operator distributes; both are re-read when they change. It fails closed: with no valid, unexpired
    CRL, `check` refuses every caller (FAILED_PRECONDITION naming the field `crl`). A pushed list older than
    the one held (lower CRL number) is refused, so a replay cannot un-revoke a certificate.
    """

    def __init__(self, path: str | Path | None, ca_pem: bytes, seed: str | Path | None = None) -> None:
        self._path = Path(path) if path else None
        self._seed = Path(seed) if seed else None
        self._ca_pem = ca_pem
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._loaded: dict[Path, Crl] = {}
        self._lock = threading.Lock()

    def _reload(self) -> None:
        for p in (self._path, self._seed):
            if p is None:
                continue
            try:
                st = os.stat(p)
            except FileNotFoundError:
                self._loaded.pop(p, None)
                self._stamps.pop(p, None)
                continue
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamps.get(p):
                self._stamps[p] = stamp
                try:
                    self._loaded[p] = load_crl(p.read_bytes(), self._ca_pem, check_time=False)
                except (InvalidArgument, ValueError) as exc:
                    log.warning("revocation list refused", extra={"path": str(p), "error": str(exc)})
                    self._loaded.pop(p, None)

    def current(self, now: dt.datetime | None = None) -> Crl | None:
        """The newest held CRL that has not expired, or None."""
        now = now or dt.datetime.now(dt.UTC)
        with self._lock:
            self._reload()
            live = [c for c in self._loaded.values() if c.next_update > now]
        return max(live, key=lambda c: c.number) if live else None

    def check(self, ident: Identity) -> None:
        """Raises unless a current CRL is held and does not list this certificate."""
        crl = self.current()
        if crl is None:
            raise FailedPrecondition("this host holds no current revocation list from the CA; every call is "
                                     "refused until the server pushes one", field="crl")
        if ident.serial in crl.serials:
            raise Unauthenticated(f"certificate of {ident.uri} is revoked")

    def is_revoked(self, serial: int) -> bool:
        """True when listed, or when there is no current CRL to tell (fail closed)."""
        crl = self.current()
        return crl is None or serial in crl.serials

    def install(self, crl_pem: bytes) -> Crl:
        """Verifies a pushed CRL (signed by the CA, current, not older than the held one) and keeps it."""
        crl = load_crl(crl_pem, self._ca_pem)
        if self._path is None:
            raise FailedPrecondition("this host has nowhere to keep a revocation list", field="crl")
        with self._lock:
            self._reload()
            held = max((c.number for c in self._loaded.values()), default=-1)
            if crl.number < held:
                raise InvalidArgument(f"revocation list {crl.number} is older than the held {held}",
                                      field="crl")
            if crl.number == held and self._path in self._loaded:
                return crl
            self._path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self._path, crl_pem)
            self._loaded[self._path] = crl
            st = os.stat(self._path)
            self._stamps[self._path] = (st.st_mtime_ns, st.st_size)
        return crl


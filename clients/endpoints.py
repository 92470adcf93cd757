"""Several control servers behind one channel, and what a client may retry when one of them goes away.

`endpoint` may list several servers ("10.0.0.1:8779,10.0.0.2:8779"). The channel gets them all as one
static address list (gRPC's ipv4:/ipv6: target) balanced round-robin, so calls spread over the servers and
a dead one is skipped. Retries are gRPC's own, declared in the channel's service config (one methodConfig
per method): reads are retried on UNAVAILABLE, and so are the creates that carry a request id (the server
returns the first attempt's resource for a repeated id, server/idempotency.py; the SDK always fills one in).
Every other mutation is not retried: the client cannot know whether a call cut off by a dying server ran.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Iterable, Sequence
from typing import Any

from google.protobuf.descriptor import FileDescriptor

from reddwarf.common.errors import InvalidArgument
from reddwarf.v1 import admin_pb2, configuration_pb2, database_pb2, observe_pb2

__all__ = ["RETRIED_CREATES", "channel_target", "is_read", "retry_service_config", "split_endpoints"]

# Mutations that are safe to repeat because their request carries a request id (the SDK sets one).
RETRIED_CREATES = frozenset({"reddwarf.v1.Instances/CreateInstance", "reddwarf.v1.Backups/CreateBackup"})

# A method that changes nothing: its name says so. (Watch* streams are reads too; a retry happens only
# before the first message arrives, as gRPC never replays a stream whose response has started.)
_READ_PREFIXES = ("Get", "List", "Watch", "Describe", "Check", "Read", "Show")

_FILES: tuple[FileDescriptor, ...] = (database_pb2.DESCRIPTOR, admin_pb2.DESCRIPTOR, configuration_pb2.DESCRIPTOR,
                                      observe_pb2.DESCRIPTOR)

# Short: a retry is meant to land on another server (round-robin skips the one that went away), and the
# backoffs together (at most 0.1 + 0.2 + 0.4 s, jittered) stay well inside a short deadline, so a server that
# refuses every attempt (a TLS failure) still answers UNAVAILABLE rather than DEADLINE_EXCEEDED.
# CANCELLED too: a server that stops answers CANCELLED (not UNAVAILABLE) to a call that reached it but was not
# yet handed to a handler (gRPC core, grpc/grpc#41785), which a rolling restart hits now and then. These methods
# are safe to repeat whatever the server did, and a cancel by the caller itself is never retried by gRPC.
RETRY_POLICY: dict[str, Any] = {"maxAttempts": 4, "initialBackoff": "0.1s", "maxBackoff": "1s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]}


def split_endpoints(endpoint: str | Iterable[str]) -> list[str]:
    """The endpoints in a comma-separated string (or a list of them), blanks dropped, order kept."""
    parts = endpoint.split(",") if isinstance(endpoint, str) else [p for e in endpoint for p in e.split(",")]
    out = [p.strip() for p in parts if p.strip()]
    if not out:
        raise InvalidArgument("endpoint is empty", field="endpoint")
    return out


def _host_port(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise InvalidArgument(f"endpoint {endpoint!r} is not host:port", field="endpoint")
    return host.strip("[]"), int(port)


def channel_target(endpoint: str) -> str:
    """The gRPC target for one or several endpoints. One is passed as it is (DNS as usual); several become a
    static address list, so names are resolved here, once (the certificate check never uses the address)."""
    endpoints = split_endpoints(endpoint)
    if len(endpoints) == 1:
        return endpoints[0]
    v4: list[str] = []
    v6: list[str] = []
    for e in endpoints:
        host, port = _host_port(e)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise InvalidArgument(f"endpoint {e!r}: {host} does not resolve ({exc})", field="endpoint") from None
            addresses = [ipaddress.ip_address(i[4][0]) for i in infos[:1]]
        for a in addresses:
            (v4 if a.version == 4 else v6).append(f"{a}:{port}" if a.version == 4 else f"[{a}]:{port}")
    if v4 and v6:  # one target URI has one scheme; mixing families is not worth a resolver of our own
        raise InvalidArgument("endpoints must all be IPv4 or all IPv6", field="endpoint")
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


def is_read(method: str) -> bool:
    return method.startswith(_READ_PREFIXES)


def retried_methods() -> list[tuple[str, str]]:
    """(service, method) of every public method a client may retry on UNAVAILABLE or a server's CANCELLED."""
    out = []
    for f in _FILES:
        for service in f.services_by_name.values():
            for m in service.methods:
                if is_read(m.name) or f"{service.full_name}/{m.name}" in RETRIED_CREATES:
                    out.append((service.full_name, m.name))
    return out


def retry_service_config(several: bool) -> str:
    """The channel's service config: retries for the safe methods, round-robin over several endpoints."""
    cfg: dict[str, Any] = {"methodConfig": [
        {"name": [{"service": s, "method": m}], "retryPolicy": RETRY_POLICY} for s, m in retried_methods()]}
    if several:
        cfg["loadBalancingConfig"] = [{"round_robin": {}}]
    return json.dumps(cfg)


def channel_options(endpoint: str) -> Sequence[tuple[str, str | int]]:
    # A restarted server is dialled again within 2 s (gRPC's default backoff grows to 120 s): otherwise the
    # channel would still hold it as failed when the other server goes away next, as in a rolling restart.
    return [("grpc.enable_retries", 1), ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.service_config", retry_service_config(len(split_endpoints(endpoint)) > 1))]

"""Concurrent hostd calls push the CA's revocation list in order: 20 tasks revoking certificates at once (a
burst of deletes) made the server push lists read at different moments, and hostd refused an older one that
arrived after a newer one, failing that task. A stand-in hostd here refuses an older list exactly as
RevocationList.install does."""
from __future__ import annotations

import asyncio
import types

import grpc

from reddwarf.server import hosts


class Ca:
    def __init__(self) -> None:
        self.crl_listeners: list = []
        self.number = 1

    def crl_pem(self) -> bytes:
        return f"CRL {self.number}".encode()

    def revoke(self) -> None:
        self.number += 1
        for listener in self.crl_listeners:
            listener()


class Hostd:
    """PushRevocations as hostd answers it: an older list than the held one is refused."""

    def __init__(self) -> None:
        self.held = 0
        self.refused = 0

    async def PushRevocations(self, request, timeout: float = 0):  # noqa: N802 - the stub's name
        number = int(request.crl_pem.split()[1])
        await asyncio.sleep(0.01 * (number % 3))  # calls overtake each other on the wire
        if number < self.held:
            self.refused += 1
            raise grpc.aio.AioRpcError(grpc.StatusCode.INVALID_ARGUMENT, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details=f"revocation list {number} is older than the held {self.held}")
        self.held = number


async def test_concurrent_calls_never_push_an_older_list_after_a_newer_one(monkeypatch):
    ca, hostd = Ca(), Hostd()
    pool = hosts.HostPool(types.SimpleNamespace(ca=ca))  # type: ignore[arg-type]
    monkeypatch.setattr(pool, "_channel", lambda host_id: ("127.0.0.1:1", None))
    monkeypatch.setattr(hosts.host_pb2_grpc, "HostAgentStub", lambda channel: hostd)

    async def call_after_revoking() -> None:
        ca.revoke()  # what each delete's revoke step does, while other tasks call the host
        await pool.ensure_crl("h1")

    await asyncio.gather(*(call_after_revoking() for _ in range(20)))
    assert hostd.refused == 0
    await pool.ensure_crl("h1")
    assert hostd.held == ca.number  # and the host ends up with the newest list

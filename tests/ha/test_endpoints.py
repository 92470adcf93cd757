"""Clients that know several servers (clients/endpoints.py): the SDK and the gateway keep working when one of
them is dead or goes away, and the channel's retry policy covers exactly the calls that are safe to repeat."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reddwarf.client import Client, ClientConfig, endpoints
from tests.fixtures.gateway import start_gateway
from tests.fixtures.mariadb import free_port
from tests.fixtures.server import RunningServer, start_server
from tests.ha.servers import Pair, two_servers


def sdk(server: RunningServer, endpoint: str, token: str | None = None) -> Client:
    f = server.client_files
    return Client(ClientConfig(endpoint=endpoint, ca=str(f.ca), cert=str(f.cert), key=str(f.key),
                               token=token or server.admin_token, timeout=20))


def test_the_retry_policy_covers_reads_and_creates_with_request_ids_only() -> None:
    cfg = json.loads(endpoints.retry_service_config(several=True))
    retried = {f"{n['service']}/{n['method']}" for mc in cfg["methodConfig"] for n in mc["name"]}
    assert {"reddwarf.v1.Instances/GetInstance", "reddwarf.v1.Instances/ListInstances",
            "reddwarf.v1.Instances/CreateInstance", "reddwarf.v1.Backups/CreateBackup",
            "reddwarf.v1.Catalog/ListFlavors"} <= retried
    for unsafe in ("DeleteInstance", "RestartInstance", "ResizeInstance", "UpdateInstance", "StopInstance"):
        assert f"reddwarf.v1.Instances/{unsafe}" not in retried
    assert "reddwarf.v1.Databases/CreateDatabase" not in retried  # no request id: a repeat is not known safe
    assert all(mc["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE", "CANCELLED"]
               for mc in cfg["methodConfig"])
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert "loadBalancingConfig" not in json.loads(endpoints.retry_service_config(several=False))


def test_a_server_side_cancelled_is_retried_for_safe_methods_only() -> None:
    """A stopping server answers CANCELLED to calls it had not yet handed to a handler (grpc/grpc#41785): the
    channel repeats a read, and never a call that is not known safe to repeat."""
    import asyncio

    import grpc

    seen: dict[str, int] = {"reddwarf.v1.Catalog/ListFlavors": 0, "reddwarf.v1.Instances/DeleteInstance": 0}

    async def run() -> tuple[bytes, str]:
        def handler_for(name: str) -> grpc.RpcMethodHandler:
            async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                seen[name] += 1
                if seen[name] == 1:
                    await context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
                return b"ok"
            return grpc.unary_unary_rpc_method_handler(handler)

        class Generic(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
                name = details.method.lstrip("/")
                return handler_for(name) if name in seen else None

        server = grpc.aio.server()
        server.add_generic_rpc_handlers((Generic(),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            target = f"127.0.0.1:{port}"
            async with grpc.aio.insecure_channel(target, options=endpoints.channel_options(target)) as ch:
                read = await ch.unary_unary("/reddwarf.v1.Catalog/ListFlavors")(b"", timeout=10)
                try:
                    await ch.unary_unary("/reddwarf.v1.Instances/DeleteInstance")(b"", timeout=10)
                    delete = "OK"
                except grpc.aio.AioRpcError as exc:
                    delete = exc.code().name
                return read, delete
        finally:
            await server.stop(0)

    read, delete = asyncio.run(run())
    assert read == b"ok" and seen["reddwarf.v1.Catalog/ListFlavors"] == 2
    assert delete == "CANCELLED" and seen["reddwarf.v1.Instances/DeleteInstance"] == 1


def test_several_endpoints_become_one_address_list() -> None:
    assert endpoints.channel_target("10.0.0.1:8779") == "10.0.0.1:8779"
    assert endpoints.channel_target("10.0.0.1:8779, 10.0.0.2:8779") == "ipv4:10.0.0.1:8779,10.0.0.2:8779"
    assert endpoints.channel_target("localhost:1,127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    with pytest.raises(Exception, match="endpoint"):
        endpoints.channel_target("10.0.0.1:8779,nonsense")


def test_the_sdk_with_a_dead_and_a_live_endpoint_works(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with start_server(tmp_path) as server:
        for order in ([dead, server.api], [server.api, dead]):
            with sdk(server, ",".join(order)) as rd:
                for _ in range(6):  # round-robin would land on the dead one by now, were it picked
                    assert rd.list_flavors()
                    assert rd.get_caller().admin
        # The CLI takes the same list (--endpoint or REDDWARF_ENDPOINT).
        f = server.client_files
        env = {**os.environ, "REDDWARF_CA": str(f.ca), "REDDWARF_CERT": str(f.cert), "REDDWARF_KEY": str(f.key),
               "REDDWARF_TOKEN": server.admin_token, "REDDWARF_CONFIG": str(tmp_path / "none.yaml")}
        out = subprocess.run([sys.executable, "-m", "reddwarf.client.cli", "--json", "--endpoint",
                              f"{dead},{server.api}", "flavor", "list"], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "small" in out.stdout


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    with two_servers(tmp_path_factory.mktemp("pair")) as p:
        yield p


def test_the_gateway_with_two_servers_keeps_answering_when_one_stops(pair: Pair, tmp_path: Path) -> None:
    with start_gateway(pair.endpoint, pair.first.gateway_files, log=tmp_path / "gw.log") as base:
        headers = {"X-Auth-Token": pair.token}
        url = f"{base}/v1.0/{pair.tenant}/flavors"
        assert httpx.get(url, headers=headers, timeout=30).status_code == 200
        pair.stop(0)
        try:
            deadline = time.monotonic() + 15
            codes = []
            while time.monotonic() < deadline:
                codes.append(httpx.get(url, headers=headers, timeout=30).status_code)
            assert len(codes) > 10 and set(codes) == {200}, codes
        finally:
            pair.start(0)
        # And when the other one stops instead, the first (restarted) carries it, once the gateway's channel has
        # dialled it again (within its 2 s reconnect backoff).
        time.sleep(4)
        pair.stop(1)
        try:
            assert all(httpx.get(url, headers=headers, timeout=30).status_code == 200 for _ in range(10))
        finally:
            pair.start(1)

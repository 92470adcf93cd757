"""The agent's stream against the server's registry: the REAL agent process (fake datastore driver, so no
mysqld is needed here; the MySQL driver is tested on its own and end to end in a container), a real
grpc.aio server holding AgentGatewayServicer and EnrollmentServicer, real mTLS."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from reddwarf.common import tls
from reddwarf.common.errors import Aborted, AlreadyExists
from reddwarf.server.agents import AgentGatewayServicer, AgentRegistry, EnrollmentServicer
from reddwarf.v1 import agent_pb2, agent_pb2_grpc, common_pb2
from tests.fixtures.mariadb import free_port


class Harness:
    def __init__(self, pki, tmp_path: Path) -> None:
        self.pki, self.tmp = pki, tmp_path
        self.silent: list[str] = []
        self.health: list[str] = []
        self.tokens: dict[str, str] = {}
        self.agent_port, self.enroll_port = free_port(), free_port()
        self.server: grpc.aio.Server | None = None
        self.enroll_server: grpc.aio.Server | None = None
        self.procs: list[subprocess.Popen] = []

    async def start(self) -> None:
        async def on_health(iid, h):
            self.health.append(iid)

        async def on_silent(iid):
            self.silent.append(iid)

        async def verify(iid, token):
            return self.tokens.pop(iid, None) == token

        def sign(csr, iid):
            return self.pki.ca.sign_csr(csr, "instance", iid).cert_pem, self.pki.ca.cert_pem

        self.registry = AgentRegistry(on_health, on_silent, heartbeat_seconds=1, heartbeat_expiry=3)
        self.watchdog = asyncio.create_task(self.registry.run())
        cert, key, ca = self.pki.files("server", "control").read()
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(AgentGatewayServicer(self.registry), self.server)
        self.server.add_secure_port(f"127.0.0.1:{self.agent_port}", tls.server_credentials(cert, key, ca))
        await self.server.start()
        self.enroll_server = grpc.aio.server()
        agent_pb2_grpc.add_EnrollmentServicer_to_server(EnrollmentServicer(verify, sign), self.enroll_server)
        self.enroll_server.add_secure_port(f"127.0.0.1:{self.enroll_port}",
                                           tls.server_credentials(cert, key, None, require_client_auth=False))
        await self.enroll_server.start()

    async def restart_gateway(self) -> None:
        await self.server.stop(None)
        cert, key, ca = self.pki.files("server", "control").read()
        self.server = grpc.aio.server()
        agent_pb2_grpc.add_AgentGatewayServicer_to_server(AgentGatewayServicer(self.registry), self.server)
        self.server.add_secure_port(f"127.0.0.1:{self.agent_port}", tls.server_credentials(cert, key, ca))
        await self.server.start()

    def spawn_agent(self, iid: str, state: Path | None = None) -> tuple[subprocess.Popen, Path]:
        state = state or self.tmp / f"agent-{iid}"
        state.mkdir(exist_ok=True)
        token = uuid.uuid4().hex
        self.tokens[iid] = token
        cfg = {"server_address": f"127.0.0.1:{self.agent_port}", "enroll_address": f"127.0.0.1:{self.enroll_port}",
               "ca_pem_path": str(self.pki.files("server", "control").ca), "enrollment_token": token,
               "instance_id": iid, "heartbeat_seconds": 1, "state_dir": str(state), "driver": "fake"}
        (state / "agent.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "reddwarf.agent.main", "--config", str(state / "agent.json")],
                                stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc, state

    def respawn_agent(self, state: Path) -> subprocess.Popen:
        """The same agent started again on its state dir (its key and its records; no new token needed)."""
        cfg = json.loads((state / "agent.json").read_text())
        cfg["enrollment_token"] = ""
        (state / "agent.json").write_text(json.dumps(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "reddwarf.agent.main", "--config", str(state / "agent.json")],
                                stdout=open(state / "agent.log", "ab"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    async def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.watchdog.cancel()
        await self.server.stop(None)
        await self.enroll_server.stop(None)


@pytest.fixture
async def h(pki, tmp_path):
    harness = Harness(pki, tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


def create_db(name: str, cid: str = "") -> agent_pb2.Command:
    return agent_pb2.Command(command_id=cid, create_databases=agent_pb2.CreateDatabases(
        databases=[common_pb2.Database(database=name)]))


async def test_enroll_hello_command_result_and_heartbeats(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    _, state = h.spawn_agent(iid)
    hello = await h.registry.wait_for_hello(iid, 30)
    assert hello.instance_id == iid
    # the key was made in the guest, 0600, and the certificate names this instance
    assert oct((state / "agent.key").stat().st_mode & 0o777) == "0o600"
    res = await h.registry.call(iid, create_db("shop"), timeout=10)
    assert res.status.code == 0
    lst = await h.registry.call(iid, agent_pb2.Command(list_databases=agent_pb2.ListDatabases()), timeout=10)
    assert [d.database for d in lst.databases.databases] == ["shop"]
    with pytest.raises(AlreadyExists):
        await h.registry.call(iid, create_db("shop"), timeout=10)
    await asyncio.sleep(2.5)
    assert h.health.count(iid) >= 2
    assert h.registry.last_health(iid).accepting_connections


async def test_enrollment_token_is_one_time(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    h.spawn_agent(iid)
    await h.registry.wait_for_hello(iid, 30)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        ch = grpc.aio.secure_channel(f"127.0.0.1:{h.enroll_port}", tls.channel_credentials(h.pki.ca.cert_pem),
                                     options=tls.channel_options("127.0.0.1:1"))
        from reddwarf.common.pki import make_key_and_csr
        _, csr = make_key_and_csr("x")
        await agent_pb2_grpc.EnrollmentStub(ch).Enroll(agent_pb2.EnrollRequest(
            instance_id=iid, enrollment_token="guess", csr_pem=csr.decode()))
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_replayed_command_after_agent_restart_does_not_run_twice(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    proc, state = h.spawn_agent(iid)
    await h.registry.wait_for_hello(iid, 30)
    await h.registry.call(iid, create_db("once", "cmd-1"), timeout=10)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    h.respawn_agent(state)  # same state dir: its key and its record of finished commands
    await asyncio.sleep(0.5)
    res = await h.registry.call(iid, create_db("once", "cmd-1"), timeout=30)  # same id: a replay
    assert res.status.code == 0
    actions = (state / "fake-actions.log").read_text().splitlines()
    assert actions.count("create_database once") == 1


async def test_a_command_cut_off_by_an_agent_restart_is_reported_aborted_then_runs_afresh(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    proc, state = h.spawn_agent(iid)
    await h.registry.wait_for_hello(iid, 30)
    call = asyncio.create_task(h.registry.call(iid, create_db("slow_cut", "task-1:cut"), timeout=60))
    await asyncio.sleep(1.5)  # the command is running (it takes 3 s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((state / "results").glob("*.running")), "no started-command marker on disk"
    h.respawn_agent(state)
    with pytest.raises(Aborted) as e:  # the server re-sends the pending command; the agent knows it was cut
        await call
    assert "restarted while running create_databases" in str(e.value)
    assert not list((state / "results").glob("*.running"))
    res = await h.registry.call(iid, create_db("slow_cut", "task-1:cut"), timeout=60)  # a retry runs afresh
    assert res.status.code == 0
    res = await h.registry.call(iid, create_db("slow_cut", "task-1:cut"), timeout=60)  # and is recorded now
    assert res.status.code == 0
    assert (state / "fake-actions.log").read_text().count("create_database slow_cut") == 2


async def test_command_survives_a_server_side_stream_cut(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    _, state = h.spawn_agent(iid)
    await h.registry.wait_for_hello(iid, 30)
    call = asyncio.create_task(h.registry.call(iid, create_db("slow_one", "cmd-slow"), timeout=60))
    await asyncio.sleep(1)
    await h.restart_gateway()  # the stream dies mid-command; the agent reconnects with backoff
    res = await call
    assert res.status.code == 0
    assert (state / "fake-actions.log").read_text().count("create_database slow_one") == 1


async def test_a_certificate_of_instance_a_cannot_claim_instance_b(h):
    files = h.pki.files("instance", "inst-a")

    async def msgs():
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id="inst-b"))
        await asyncio.sleep(5)

    async with tls.aio_channel(f"127.0.0.1:{h.agent_port}", files) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in agent_pb2_grpc.AgentGatewayStub(ch).Connect(msgs()):
                pass
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not h.registry.is_connected("inst-b") and not h.registry.is_connected("inst-a")


@pytest.mark.parametrize("role", ["admin", "host", "client"])
async def test_only_instance_certificates_may_connect(h, role):
    async def msgs():
        yield agent_pb2.AgentMessage(hello=agent_pb2.Hello(instance_id="x"))
        await asyncio.sleep(5)

    async with tls.aio_channel(f"127.0.0.1:{h.agent_port}", h.pki.files(role, "x")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in agent_pb2_grpc.AgentGatewayStub(ch).Connect(msgs()):
                pass
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_silent_guest_is_reported(h):
    iid = f"i-{uuid.uuid4().hex[:8]}"
    proc, _ = h.spawn_agent(iid)
    await h.registry.wait_for_hello(iid, 30)
    os.kill(proc.pid, signal.SIGSTOP)  # alive but mute: the TCP stream stays up, the heartbeats stop
    try:
        for _ in range(40):
            if iid in h.silent:
                break
            await asyncio.sleep(0.25)
        assert iid in h.silent
    finally:
        os.kill(proc.pid, signal.SIGCONT)


async def test_commands_for_an_unknown_instance_time_out_cleanly(h):
    from reddwarf.common.errors import DeadlineExceeded
    with pytest.raises(DeadlineExceeded):
        await h.registry.call("nobody", create_db("x"), timeout=0.5)

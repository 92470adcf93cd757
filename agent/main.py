"""`reddwarf-agent`: the guest agent, PID 1 of an instance's container.

It reads the FirstBoot file hostd wrote (/etc/reddwarf/agent.json, see reddwarf.hostd.firstboot), makes
its own key and enrolls once with the one-time token (the private key never leaves the guest), brings
back a datastore it prepared before (after a container restart), then keeps the stream to the server.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from reddwarf.common import config
from reddwarf.common.log import setup as setup_logging
from reddwarf.common.pki import TlsFiles, identity_from_cert, make_key_and_csr
from reddwarf.common.tls import channel_credentials, channel_options
from reddwarf.v1 import agent_pb2, agent_pb2_grpc

from .commands import CommandRunner
from .datastore import DatastoreDriver
from .stream import AgentStream, StreamSettings

log = logging.getLogger("reddwarf.agent")


@dataclass(frozen=True)
class AgentConfig:
    server_address: str
    ca_pem_path: str
    instance_id: str
    enrollment_token: str = ""
    enroll_address: str = ""
    heartbeat_seconds: int = 10
    mysql_port: int = 3306
    datadir: str = "/var/lib/mysql"
    state_dir: str = "/var/lib/reddwarf-agent"
    bind_address: str = "127.0.0.1"
    run_as: str = "mysql"
    driver: str = "mysql"  # "fake" only for tests and benchmarks of the stream itself
    log_level: str = "INFO"

    @classmethod
    def load(cls, path: str, env: Mapping[str, str] | None = None) -> AgentConfig:
        """The FirstBoot JSON hostd wrote < REDDWARF_AGENT_<NAME>. Keys this agent does not know are skipped."""
        return config.load(cls, path=path, fmt="json", env=env, env_prefix="REDDWARF_AGENT_",
                           ignore_unknown=True)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(str(path) + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(str(path) + ".tmp", path)


async def enroll(cfg: AgentConfig) -> TlsFiles:
    """Returns the agent's certificate files, enrolling first if it has none yet."""
    state = Path(cfg.state_dir)
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    files = TlsFiles(state / "agent.pem", state / "agent.key", Path(cfg.ca_pem_path))
    if files.cert.exists() and files.key.exists():
        ident = identity_from_cert(files.cert.read_bytes())
        if ident.role == "instance" and ident.id == cfg.instance_id:
            return files
    if not cfg.enrollment_token:
        raise SystemExit("no certificate and no enrollment token: cannot join the server")
    address = cfg.enroll_address or cfg.server_address
    key_pem, csr_pem = make_key_and_csr(f"instance/{cfg.instance_id}")
    ca_pem = Path(cfg.ca_pem_path).read_bytes()
    delay = 0.5
    while True:
        try:
            # Server-only TLS: we verify the server; our one-time token is our credential.
            async with grpc.aio.secure_channel(address, channel_credentials(ca_pem),
                                               options=channel_options(address)) as ch:
                resp = await agent_pb2_grpc.EnrollmentStub(ch).Enroll(agent_pb2.EnrollRequest(
                    enrollment_token=cfg.enrollment_token, instance_id=cfg.instance_id,
                    csr_pem=csr_pem.decode()), timeout=30)
            break
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.INVALID_ARGUMENT):
                raise SystemExit(f"enrollment refused: {exc.code().name}: {exc.details()}") from None
            log.warning("enrollment failed, retrying", extra={"code": exc.code().name})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15)
    _write_private(files.key, key_pem)
    _write_private(files.cert, resp.certificate_pem.encode())
    log.info("enrolled", extra={"instance": cfg.instance_id})
    return files


def make_driver(cfg: AgentConfig) -> DatastoreDriver:
    if cfg.driver == "fake":
        from .fake import FakeDriver
        return FakeDriver(cfg.state_dir)
    from .mysql import MysqlDriver, MysqlSettings
    return MysqlDriver(MysqlSettings(state_dir=os.path.join(cfg.state_dir, "mysql"), datadir=cfg.datadir,
                                     port=cfg.mysql_port, bind_address=cfg.bind_address, run_as=cfg.run_as))


async def amain(cfg: AgentConfig) -> None:
    files = await enroll(cfg)
    driver = make_driver(cfg)
    try:
        await driver.resume()  # a container restart: bring back the mysqld prepared earlier
    except Exception:  # noqa: BLE001 - reported in health; the server can re-prepare or restart it
        log.exception("resume failed")
    runner = CommandRunner(driver, driver.backups())
    stream = AgentStream(StreamSettings(server_address=cfg.server_address, instance_id=cfg.instance_id,
                                        tls=files, state_dir=cfg.state_dir,
                                        heartbeat_seconds=cfg.heartbeat_seconds), runner, driver.health)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stream.stop)
    try:
        await stream.run_forever()
    finally:
        await driver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-agent")
    parser.add_argument("--config", default="/etc/reddwarf/agent.json")
    args = parser.parse_args(argv)
    cfg = AgentConfig.load(args.config)
    setup_logging("reddwarf-agent", cfg.log_level, instance=cfg.instance_id)
    asyncio.run(amain(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

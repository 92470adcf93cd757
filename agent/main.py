"""`reddwarf-agent`: the guest agent, PID 1 of an instance's container.

It reads the FirstBoot file hostd wrote (/etc/reddwarf/agent.json, see reddwarf.hostd.firstboot), makes
its own key and enrolls once with the one-time token (the private key never leaves the guest), brings
back a datastore it prepared before (after a container restart), then keeps the stream to the server.

It renews its certificate before it expires: at start and every renew_check_seconds it checks whether less
than renew_fraction of the certificate's life is left; then it makes a NEW key here, sends only a CSR
(AgentGateway.RenewCertificate, over mTLS with the current certificate), checks what comes back (our CA,
our instance, our new key, current), installs key and certificate and reconnects the stream with them.
The install survives a crash at any point: both files are written complete under `.new` names first,
then renamed, and `recover_renewal` finishes (or discards) a half-done install at the next start.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from reddwarf.common import config
from reddwarf.common.errors import InvalidArgument
from reddwarf.common.log import setup as setup_logging
from reddwarf.common.pki import RENEW_FRACTION, TlsFiles, identity_from_cert, make_key_and_csr, write_atomic
from reddwarf.common.tls import aio_channel, channel_credentials, channel_options
from reddwarf.v1 import agent_pb2, agent_pb2_grpc

from .commands import CommandRunner
from .datastore import DatastoreDriver
from .logs import rotate_loop
from .stream import AgentStream, StreamSettings, endpoints
from .upgrade import reexec_into_current

log = logging.getLogger("reddwarf.agent")


@dataclass(frozen=True)
class AgentConfig:
    server_address: str  # "host:port", or every server's agent endpoint comma-separated
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
    # Renew the certificate when less than this part of its life is left; checked at start and this often.
    renew_fraction: float = RENEW_FRACTION
    renew_check_seconds: float = 3600.0

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
    recover_renewal(files)
    if files.cert.exists() and files.key.exists():
        ident = identity_from_cert(files.cert.read_bytes())
        if ident.role == "instance" and ident.id == cfg.instance_id:
            return files
    if not cfg.enrollment_token:
        raise SystemExit("no certificate and no enrollment token: cannot join the server")
    # Several servers: any of them enrolls us (the token is in the shared state DB); a dead one is skipped.
    addresses = endpoints(cfg.enroll_address or cfg.server_address)
    attempt = 0
    key_pem, csr_pem = make_key_and_csr(f"instance/{cfg.instance_id}")
    ca_pem = Path(cfg.ca_pem_path).read_bytes()
    delay = 0.5
    while True:
        address = addresses[attempt % len(addresses)]
        attempt += 1
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
            log.warning("enrollment failed, retrying", extra={"code": exc.code().name, "server": address})
            if attempt % len(addresses) == 0:  # every server tried: back off before the next round
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15)
    _write_private(files.key, key_pem)
    _write_private(files.cert, resp.certificate_pem.encode())
    log.info("enrolled", extra={"instance": cfg.instance_id})
    return files


# ---------------------------------------------------------------------------- certificate renewal

def _pending(path: Path) -> Path:
    return path.with_name(path.name + ".new")


def renewal_due(cert_pem: bytes, fraction: float, now: dt.datetime | None = None) -> bool:
    """Whether less than `fraction` of the certificate's lifetime is left."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return end - (now or dt.datetime.now(dt.UTC)) <= (end - start) * fraction


def recover_renewal(files: TlsFiles) -> None:
    """Finishes an install a crash cut off, or discards a key whose certificate never arrived. Both `.new`
    files are complete before the first rename, so a pending certificate means the pair is good."""
    key_new, cert_new = _pending(files.key), _pending(files.cert)
    if cert_new.exists():
        if key_new.exists():
            os.replace(key_new, files.key)
        os.replace(cert_new, files.cert)
        log.info("finished installing a renewed certificate")
    elif key_new.exists():
        key_new.unlink()


def _public_der(cert_or_key: x509.Certificate | bytes) -> bytes:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if isinstance(cert_or_key, x509.Certificate):
        return cert_or_key.public_key().public_bytes(der, spki)
    return serialization.load_pem_private_key(cert_or_key, password=None).public_key().public_bytes(der, spki)


def check_renewed(files: TlsFiles, instance_id: str, key_pem: bytes, cert_pem: bytes) -> None:
    """What the server sent must be signed by our CA, name exactly this instance, be current and carry the
    public key of the key we just made; InvalidArgument otherwise (nothing is installed)."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidArgument(f"not a PEM certificate: {e}", field="certificate_pem") from None
    try:
        cert.verify_directly_issued_by(x509.load_pem_x509_certificate(files.ca.read_bytes()))
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidArgument("certificate is not signed by this deployment's CA", field="certificate_pem") from None
    ident = identity_from_cert(cert_pem)
    if (ident.role, ident.id) != ("instance", instance_id):
        raise InvalidArgument(f"certificate names {ident.uri}, not instance/{instance_id}", field="certificate_pem")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise InvalidArgument("certificate is not currently valid", field="certificate_pem")
    if _public_der(cert) != _public_der(key_pem):
        raise InvalidArgument("certificate is not for the key this agent made", field="certificate_pem")


def install_renewed(files: TlsFiles, key_pem: bytes, cert_pem: bytes) -> None:
    """Key and certificate (0600) written complete under `.new` names, then renamed into place."""
    key_new, cert_new = _pending(files.key), _pending(files.cert)
    write_atomic(key_new, key_pem, 0o600)
    write_atomic(cert_new, cert_pem, 0o600)
    os.replace(key_new, files.key)
    os.replace(cert_new, files.cert)


async def renew_certificate(cfg: AgentConfig, files: TlsFiles, force: bool = False) -> bool:
    """Renews when due (or forced): a fresh key made here, only its CSR sent. True when renewed."""
    if not force and not renewal_due(files.cert.read_bytes(), cfg.renew_fraction):
        return False
    key_pem, csr_pem = make_key_and_csr(f"instance/{cfg.instance_id}")
    addresses = endpoints(cfg.server_address)
    for n, address in enumerate(addresses):
        try:
            async with aio_channel(address, files) as ch:
                resp = await agent_pb2_grpc.AgentGatewayStub(ch).RenewCertificate(
                    agent_pb2.RenewCertificateRequest(csr_pem=csr_pem.decode()), timeout=30)
            break
        except grpc.aio.AioRpcError as exc:  # a server that is down: any other signs as well
            if exc.code() != grpc.StatusCode.UNAVAILABLE or n == len(addresses) - 1:
                raise
    cert_pem = resp.certificate_pem.encode()
    check_renewed(files, cfg.instance_id, key_pem, cert_pem)
    install_renewed(files, key_pem, cert_pem)
    log.info("certificate renewed", extra={"serial": format(identity_from_cert(cert_pem).serial, "x")})
    return True


async def _try_renew(cfg: AgentConfig, files: TlsFiles) -> bool | None:
    """renew_certificate, its failure logged (None): the current certificate still has a third of its life."""
    try:
        return await renew_certificate(cfg, files)
    except (grpc.aio.AioRpcError, InvalidArgument, OSError, ValueError) as exc:
        detail = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
        log.warning("certificate renewal failed", extra={"error": detail[:300]})
        return None


async def renew_loop(cfg: AgentConfig, files: TlsFiles, stream: AgentStream, last: bool | None) -> None:
    """Checks every renew_check_seconds after the start's check (whose result is `last`; a failure is
    retried within a minute); after a renewal the stream reconnects with the new certificate. The old
    certificate is not revoked (see AgentGatewayServicer.RenewCertificate): it lapses on its own."""
    while True:
        await asyncio.sleep(cfg.renew_check_seconds if last is not None else min(cfg.renew_check_seconds, 60))
        last = await _try_renew(cfg, files)
        if last:
            stream.reconnect()


def make_driver(cfg: AgentConfig) -> DatastoreDriver:
    if cfg.driver == "fake":
        from .fake import FakeDriver
        return FakeDriver(cfg.state_dir)
    from .mycnf import server_id_for
    from .mysql import MysqlDriver, MysqlSettings
    return MysqlDriver(MysqlSettings(state_dir=os.path.join(cfg.state_dir, "mysql"), datadir=cfg.datadir,
                                     port=cfg.mysql_port, bind_address=cfg.bind_address, run_as=cfg.run_as,
                                     server_id=server_id_for(cfg.instance_id)))


async def amain(cfg: AgentConfig) -> None:
    # The driver (and the modules it imports) is made in a thread while enrollment waits on the server: a
    # create waits on both.
    files, driver = await asyncio.gather(enroll(cfg), asyncio.to_thread(make_driver, cfg))
    try:
        await driver.resume()  # a container restart: bring back the mysqld prepared earlier
    except Exception:  # noqa: BLE001 - reported in health; the server can re-prepare or restart it
        log.exception("resume failed")
    runner = CommandRunner(driver, driver.backups(), cfg.state_dir)
    stream = AgentStream(StreamSettings(server_address=cfg.server_address, instance_id=cfg.instance_id,
                                        tls=files, state_dir=cfg.state_dir,
                                        heartbeat_seconds=cfg.heartbeat_seconds), runner, driver.health)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stream.stop)
    # The first check runs before the stream dials, so a due certificate is replaced before it is used.
    renewer = asyncio.create_task(renew_loop(cfg, files, stream, await _try_renew(cfg, files)))
    logs = driver.logs()
    rotator = asyncio.create_task(rotate_loop(logs)) if logs is not None else None
    try:
        await stream.run_forever()
    finally:
        renewer.cancel()
        if rotator is not None:
            rotator.cancel()
        await driver.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reddwarf-agent")
    parser.add_argument("--config", default="/etc/reddwarf/agent.json")
    args = parser.parse_args(argv)
    cfg = AgentConfig.load(args.config)
    setup_logging("reddwarf-agent", cfg.log_level, instance=cfg.instance_id)
    # An upgraded build recorded before a container restart runs instead of the template's (agent/upgrade.py).
    reexec_into_current(cfg.state_dir)
    asyncio.run(amain(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())

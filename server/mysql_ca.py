"""The tenant-facing MySQL CA: it signs each instance's mysqld certificate (on a key the guest made, from
its CSR) for the instance's address, and tenants verify their MySQL connections with its certificate
(Instances.GetInstanceCa). It is not the deployment's internal mTLS CA (server/app.py's `ca`): a
certificate it signs proves nothing to Red Dwarf's own services, and its certificate can be handed to
anyone. Kept in <pki_dir>/mysql-ca/ (ca.pem, ca.key 0600), made on first use. Certificates are renewed
before they expire (renew_loop) and loaded by mysqld without a restart."""
from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import threading
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import select

from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import CertificateAuthority, needs_renewal
from reddwarf.v1 import agent_pb2

from . import models
from .agents import AgentRegistry
from .app import App

log = logging.getLogger("reddwarf.server.mysql_ca")

CA_NAME = "Red Dwarf MySQL CA"
CERT_DAYS = 825

_lock = threading.Lock()
_cas: dict[Path, CertificateAuthority] = {}


def mysql_ca_dir(app: App) -> Path:
    return Path(app.settings.pki_dir) / "mysql-ca"


def mysql_ca(app: App) -> CertificateAuthority:
    """The deployment's MySQL CA, created (once, whatever the thread) if absent."""
    d = mysql_ca_dir(app)
    with _lock:
        ca = _cas.get(d)
        if ca is None:
            try:
                ca = CertificateAuthority.load(d) if (d / "ca.key").exists() else CertificateAuthority.init(d, CA_NAME)
            except InvalidArgument:  # another server process sharing the state dir made it just now
                ca = CertificateAuthority.load(d)
            _cas[d] = ca
        return ca


def server_names(instance_id: str, address: str) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) an instance's mysqld certificate names: its address, as a client dials it."""
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return ([address] if address else [f"{instance_id}.mysql.invalid"]), []
    return [], [address]


def sign_instance_csr(app: App, csr_pem: str, instance_id: str, address: str) -> tuple[str, str]:
    """(certificate PEM, CA PEM) for the instance's mysqld key."""
    ca = mysql_ca(app)
    dns, ips = server_names(instance_id, address)
    issued = ca.sign_tls_server_csr(csr_pem.encode(), f"mysql/{instance_id}", dns, ips, CERT_DAYS)
    return issued.cert_pem.decode(), ca.cert_pem.decode()


# -- renewal ---------------------------------------------------------------------------------------------
# An instance's mysqld certificate is renewed on the same key (the guest's, which never leaves it) once it is
# in the last third of its life (common/pki.py: needs_renewal), and mysqld loads it with FLUSH SSL: no
# restart, open sessions keep theirs. The server that holds an instance's agent stream renews it.

RENEW_EVERY = 3600.0
CallAgent = Callable[[agent_pb2.Command], Awaitable[agent_pb2.CommandResult]]


async def renew_instance_tls(app: App, call: CallAgent, instance_id: str, address: str,
                             now: dt.datetime | None = None, force: bool = False) -> bool:
    """Asks the guest for a CSR and its current certificate; when that is due (or `force`), signs a new one
    and has the guest install it. True if renewed; False for a guest that serves no TLS or is not due."""
    tag = uuid.uuid4().hex[:12]
    res = await call(agent_pb2.Command(command_id=f"mysql-tls-renew:{instance_id}:{tag}",
                                       mysql_tls_request=agent_pb2.MysqlTlsRequest()))
    csr, current = res.mysql_tls_csr.csr_pem, res.mysql_tls_csr.current_cert_pem
    if not csr or not current:
        return False  # no TLS, or the first certificate is still prepare's to install
    if not force and not needs_renewal(current.encode(), now):
        return False
    cert_pem, ca_pem = await asyncio.to_thread(sign_instance_csr, app, csr, instance_id, address or "127.0.0.1")
    await call(agent_pb2.Command(command_id=f"mysql-tls-install:{instance_id}:{tag}",
                                 install_mysql_tls=agent_pb2.InstallMysqlTls(tls_cert_pem=cert_pem,
                                                                             tls_ca_pem=ca_pem)))
    log.info("mysqld certificate renewed", extra={"instance": instance_id})
    return True


async def renew_due(app: App, registry: AgentRegistry, now: dt.datetime | None = None) -> list[str]:
    """One round over the instances whose agent is connected to this server; returns those renewed. A guest
    that fails is tried again next round (its current certificate keeps serving)."""
    with app.sessions() as s:
        rows = s.execute(select(models.Instance.id, models.Instance.address).where(
            models.Instance.deleted_at.is_(None))).all()
    renewed = []
    for iid, address in rows:
        if not registry.is_connected(iid):
            continue

        async def call(cmd: agent_pb2.Command, iid: str = iid) -> agent_pb2.CommandResult:
            return await registry.call(iid, cmd, timeout=120)
        try:
            if await renew_instance_tls(app, call, iid, address, now):
                renewed.append(iid)
        except Exception as exc:  # noqa: BLE001 - one guest's failure does not stop the round
            log.warning("mysqld certificate renewal failed", extra={"instance": iid, "error": str(exc)[:200]})
    return renewed


async def renew_loop(app: App, registry: AgentRegistry, every: float = RENEW_EVERY) -> None:
    while True:
        await asyncio.sleep(every)
        await renew_due(app, registry)

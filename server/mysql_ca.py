"""The tenant-facing MySQL CA: it signs each instance's mysqld certificate (on a key the guest made, from
its CSR) for the instance's address, and tenants verify their MySQL connections with its certificate
(Instances.GetInstanceCa). It is not the deployment's internal mTLS CA (server/app.py's `ca`): a
certificate it signs proves nothing to Red Dwarf's own services, and its certificate can be handed to
anyone. Kept in <pki_dir>/mysql-ca/ (ca.pem, ca.key 0600), made on first use."""
from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

from reddwarf.common.errors import InvalidArgument
from reddwarf.common.pki import CertificateAuthority

from .app import App

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

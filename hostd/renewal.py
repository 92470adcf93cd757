"""hostd's side of certificate renewal (the server drives it, server/hosts.py): a fresh key made and kept
here, a CSR for it handed out, and the certificate the server signed checked and installed in place of the
old one. The listener serves the new files from the next handshake on (tls.reloading_server_credentials).

What is installed must be signed by our CA, name exactly host/<this host's id>, be current, and carry the
public key of the pending key: a server (or anyone holding a server certificate) cannot make this host
serve a certificate whose key it knows.
"""
from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.common.pki import TlsFiles, identity_from_cert, make_key_and_csr, needs_renewal, write_atomic


def _public_der(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class CertificateRenewer:
    def __init__(self, files: TlsFiles, host_id: str, state_dir: str | Path) -> None:
        self.files = files
        self.host_id = host_id
        self.pending = Path(state_dir) / "renew.key"
        self._lock = threading.Lock()

    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.files.cert.read_bytes()).not_valid_after_utc

    def request(self, force: bool = False) -> tuple[dt.datetime, bytes]:
        """(expiry of the served certificate, a CSR for a fresh pending key or b"" when not due)."""
        with self._lock:
            current = self.files.cert.read_bytes()
            expiry = x509.load_pem_x509_certificate(current).not_valid_after_utc
            if not force and not needs_renewal(current):
                return expiry, b""
            key_pem, csr_pem = make_key_and_csr(f"host/{self.host_id}")
            self.pending.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.pending, key_pem, 0o600)
            return expiry, csr_pem

    def install(self, cert_pem: bytes) -> dt.datetime:
        with self._lock:
            if not self.pending.exists():
                raise FailedPrecondition("no renewal is pending on this host", field="certificate_pem")
            try:
                cert = x509.load_pem_x509_certificate(cert_pem)
            except ValueError as e:
                raise InvalidArgument(f"not a PEM certificate: {e}", field="certificate_pem") from None
            ca = x509.load_pem_x509_certificate(self.files.ca.read_bytes())
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                raise InvalidArgument("certificate is not signed by this deployment's CA",
                                      field="certificate_pem") from None
            ident = identity_from_cert(cert_pem)
            if (ident.role, ident.id) != ("host", self.host_id):
                raise InvalidArgument(f"certificate names {ident.uri}, not host/{self.host_id}",
                                      field="certificate_pem")
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
                raise InvalidArgument("certificate is not currently valid", field="certificate_pem")
            key_pem = self.pending.read_bytes()
            key = serialization.load_pem_private_key(key_pem, password=None)
            if _public_der(key.public_key()) != _public_der(cert.public_key()):
                raise InvalidArgument("certificate is not for this host's pending key", field="certificate_pem")
            # Key first, then certificate: the listener only switches once the two match.
            write_atomic(self.files.key, key_pem, 0o600)
            write_atomic(self.files.cert, cert_pem, 0o644)
            os.unlink(self.pending)
            return cert.not_valid_after_utc

"""A throwaway CA with server and client certificates for the client tests' loopback mTLS (the spine's
tests/fixtures/pki.py does the same for the real server; this keeps the client tests independent of it)."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reddwarf.common.pki import role_dns_names


@dataclass(frozen=True)
class TestPki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(folder: Path) -> TestPki:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client-tests CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def issue(cn: str, uri: str, server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        if server:
            names += [x509.DNSName(n) for n in role_dns_names("server", "test")]
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(names), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    paths = TestPki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                    folder / "client.key")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert, key = issue("server", "spiffe://reddwarf/server/test", True)
    paths.server_cert.write_bytes(cert)
    paths.server_key.write_bytes(key)
    cert, key = issue("client", "spiffe://reddwarf/client/test", False)
    paths.client_cert.write_bytes(cert)
    paths.client_key.write_bytes(key)
    return paths

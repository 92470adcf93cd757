"""The deployment's certificate authority: every process proves who it is with a certificate from it.

Identity lives in one place only, the URI SAN `spiffe://reddwarf/<role>/<id>` of a certificate signed by
this CA; nothing a peer *says* (a header, a Hello field, a CSR subject) is trusted over it. Keys are EC
P-256. The CA directory holds:

    ca.pem          the CA certificate (distributed to every process)
    ca.key          the CA key, mode 0600, never leaves the control server's host
    crl.pem         the signed revocation list, rewritten on every revoke
    revoked.json    serials revoked so far (the source of crl.pem)

Serial numbers are random 159-bit integers (RFC 5280 §4.1.2.2 allows up to 20 octets), so two servers
sharing a CA never need shared bookkeeping to avoid collisions.

Certificates name their role, never "localhost": a server certificate carries the DNS name
`server.reddwarf` (and `<id>.server.reddwarf`), a host certificate `<host-id>.host.reddwarf`, and no other
role carries a name in the `reddwarf` zone. Every TLS client asks gRPC to verify exactly the name of the
peer it expects (`common.tls.peer_name`), so a host or instance certificate cannot pose as the server and
one host cannot pose as another.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .clock import now_aware
from .errors import InvalidArgument, NotFound

# monitor: a scraper of the server's /metrics (Prometheus); it can do nothing else.
ROLES = ("server", "host", "instance", "admin", "client", "gateway", "monitor")
SPIFFE_PREFIX = "spiffe://reddwarf/"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_URI = re.compile(r"spiffe://reddwarf/([a-z]+)/([A-Za-z0-9][A-Za-z0-9._-]{0,127})")
ZONE = "reddwarf"  # the private DNS zone of role names; only _sign puts names in it
SERVER_DNS = f"server.{ZONE}"
# Renew a certificate when less than this part of its lifetime is left (and at most 30 days before).
RENEW_FRACTION = 1 / 3
CRL_DAYS = 7


def role_dns_names(role: str, id: str) -> list[str]:
    """The names a certificate of (role, id) carries and a client expecting that peer verifies."""
    if role == "server":
        return [SERVER_DNS, f"{id}.{SERVER_DNS}"]
    if role == "host":
        return [f"{id}.host.{ZONE}"]
    return []


@dataclass(frozen=True)
class Identity:
    role: str
    id: str
    serial: int = 0

    @property
    def uri(self) -> str:
        return f"{SPIFFE_PREFIX}{self.role}/{self.id}"


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes  # empty when signing a CSR: the requester kept its key
    serial: int
    not_after: dt.datetime


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one process's certificate, key and the CA that vouches for peers."""
    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()


def validate_role_id(role: str, id: str) -> None:
    if role not in ROLES:
        raise InvalidArgument(f"role must be one of {', '.join(ROLES)}", field="role")
    if not _ID.fullmatch(id or ""):
        raise InvalidArgument("id must be 1-128 characters of letters, digits, '.', '_' or '-'",
                              field="id")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomic write with the final mode set before the file becomes visible."""
    # A temporary name of its own per write: two threads writing the same file must not share one (the
    # second rename would find the first's temporary file gone).
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


write_atomic = _write


def make_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A fresh key and a CSR for it: what a guest agent makes so its private key never leaves the guest."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
           .sign(key, hashes.SHA256()))
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def csr_for_key(key_pem: bytes, common_name: str) -> bytes:
    """A CSR for a key already held (a guest's mysqld key, kept across replays of its request)."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument("key must be an EC key", field="key")
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def identity_from_cert(pem: bytes | str) -> Identity:
    """The identity a certificate proves. Raises InvalidArgument if it carries none (or several)."""
    if isinstance(pem, str):
        pem = pem.encode()
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidArgument("certificate has no subject alternative name", field="certificate") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(SPIFFE_PREFIX)]
    if len(uris) != 1:
        raise InvalidArgument("certificate must carry exactly one spiffe://reddwarf/ URI",
                              field="certificate")
    m = _URI.fullmatch(uris[0])
    if not m or m.group(1) not in ROLES:
        raise InvalidArgument(f"certificate identity {uris[0]!r} is not a Red Dwarf identity",
                              field="certificate")
    return Identity(m.group(1), m.group(2), cert.serial_number)


def csr_public_key(csr_pem: bytes) -> ec.EllipticCurvePublicKey:
    """The EC public key of a well-formed, self-signed CSR; INVALID_ARGUMENT naming csr_pem otherwise.
    Nothing else in the CSR is read: the CA decides what the certificate names."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise InvalidArgument(f"not a PEM certificate request: {e}", field="csr_pem") from None
    if not csr.is_signature_valid:
        raise InvalidArgument("certificate request signature is invalid", field="csr_pem")
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise InvalidArgument("certificate request must use an EC key", field="csr_pem")
    return public_key


class CertificateAuthority:
    def __init__(self, directory: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.dir = directory
        self._cert = cert
        self._key = key
        self.cert_pem: bytes = cert.public_bytes(serialization.Encoding.PEM)
        # Called (from whatever thread wrote it) after every new crl.pem: the server pushes it to hosts.
        self.crl_listeners: list[Callable[[], None]] = []
        self._revoke_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    def init(cls, directory: str | Path, name: str = "Red Dwarf CA", days: int = 3650
             ) -> CertificateAuthority:
        d = Path(directory)
        if (d / "ca.key").exists():
            raise InvalidArgument(f"a CA already exists in {d}", field="directory")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Red Dwarf")])
        now = now_aware()
        cert = (x509.CertificateBuilder()
                .subject_name(subject).issuer_name(subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5))
                .not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        _write(d / "ca.key", _key_pem(key), 0o600)
        _write(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
        ca = cls(d, cert, key)
        ca._write_crl([])
        return ca

    @classmethod
    def load(cls, directory: str | Path) -> CertificateAuthority:
        d = Path(directory)
        if not (d / "ca.key").exists():
            raise NotFound(f"no CA in {d} (run `reddwarf pki init` or `reddwarf-server init`)",
                           field="directory")
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(d, cert, key)

    @classmethod
    def ensure(cls, directory: str | Path) -> CertificateAuthority:
        d = Path(directory)
        return cls.load(d) if (d / "ca.key").exists() else cls.init(d)

    # -- issuing ---------------------------------------------------------------------------------
    def issue(self, role: str, id: str, days: int = 365, dns_names: Iterable[str] = (),
              ip_addresses: Iterable[str] = (), not_before: dt.datetime | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = self._sign(key.public_key(), role, id, days, dns_names, ip_addresses, not_before)
        return Issued(issued.cert_pem, _key_pem(key), issued.serial, issued.not_after)

    def sign_csr(self, csr_pem: bytes, role: str, id: str, days: int = 365) -> Issued:
        """Sign the CSR's public key for (role, id); whatever identity the CSR names is ignored."""
        public_key = csr_public_key(csr_pem)
        return self._sign(public_key, role, id, days, (), (), None)

    def sign_tls_server_csr(self, csr_pem: bytes, common_name: str, dns_names: Iterable[str] = (),
                            ip_addresses: Iterable[str] = (), days: int = 365) -> Issued:
        """A plain TLS server certificate (no Red Dwarf identity, serverAuth only) for the CSR's key, naming
        exactly the given DNS names and addresses: what a tenant-facing CA (MySQL's) issues."""
        public_key = csr_public_key(csr_pem)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ip_addresses]
        if not sans:
            raise InvalidArgument("a server certificate needs a name or an address", field="dns_names")
        start = now_aware() - dt.timedelta(minutes=5)
        end = start + dt.timedelta(days=days)
        return self._certificate(public_key, common_name, sans, [ExtendedKeyUsageOID.SERVER_AUTH], start, end)

    def _sign(self, public_key: ec.EllipticCurvePublicKey, role: str, id: str, days: int,
              dns_names: Iterable[str], ip_addresses: Iterable[str],
              not_before: dt.datetime | None) -> Issued:
        validate_role_id(role, id)
        if not 1 <= days <= 3650:
            raise InvalidArgument("days must be between 1 and 3650", field="days")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(f"{SPIFFE_PREFIX}{role}/{id}")]
        extra = [n.lower().rstrip(".") for n in dns_names]
        for n in extra:
            # The role names are ours to give: an extra name in the zone (or a wildcard) could let this
            # certificate answer for another peer.
            if "*" in n or n == ZONE or n.endswith("." + ZONE):
                raise InvalidArgument(f"DNS name {n!r} is reserved (the {ZONE} zone names roles)",
                                      field="dns_names")
        dns = role_dns_names(role, id) + [n for n in extra if n not in role_dns_names(role, id)]
        ips = list(ip_addresses)
        sans += [x509.DNSName(n) for n in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        start = not_before or (now_aware() - dt.timedelta(minutes=5))
        end = start + dt.timedelta(days=days)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if role in ("server", "host", "gateway"):  # the gateway also serves HTTPS (reddwarf-gateway --tls-cert)
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        return self._certificate(public_key, f"{role}/{id}", sans, usages, start, end)

    def _certificate(self, public_key: ec.EllipticCurvePublicKey, common_name: str, sans: list[x509.GeneralName],
                     usages: list[x509.ObjectIdentifier], start: dt.datetime, end: dt.datetime) -> Issued:
        """A leaf certificate signed by this CA (the public key only: the private key is the caller's)."""
        serial = x509.random_serial_number()
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:64])]))
                .issuer_name(self._cert.subject)
                .public_key(public_key)
                .serial_number(serial)
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                               critical=False)
                .sign(self._key, hashes.SHA256()))
        return Issued(cert.public_bytes(serialization.Encoding.PEM), b"", serial, end)

    def write_identity(self, directory: str | Path, name: str, role: str, id: str, days: int = 365,
                       dns_names: Iterable[str] = (), ip_addresses: Iterable[str] = ()) -> TlsFiles:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        issued = self.issue(role, id, days, dns_names, ip_addresses)
        files = TlsFiles(d / f"{name}.pem", d / f"{name}.key", d / "ca.pem")
        _write(files.key, issued.key_pem, 0o600)
        _write(files.cert, issued.cert_pem)
        _write(files.ca, self.cert_pem)
        return files

    def renew_identity(self, files: TlsFiles, role: str, id: str, days: int = 365,
                       now: dt.datetime | None = None) -> Issued | None:
        """Re-issues (role, id) into `files` when the certificate there is missing, names another
        identity or role names, or is due for renewal (`needs_renewal`). Returns what was issued, or None
        when the certificate is still good."""
        if files.cert.exists():
            pem = files.cert.read_bytes()
            try:
                ident = identity_from_cert(pem)
                cert = x509.load_pem_x509_certificate(pem)
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names_ok = set(role_dns_names(role, id)) <= set(san.get_values_for_type(x509.DNSName))
            except (ValueError, InvalidArgument, x509.ExtensionNotFound):
                ident, names_ok = None, False
            if (ident is not None and (ident.role, ident.id) == (role, id) and names_ok
                    and not needs_renewal(pem, now)):
                return None
        issued = self.issue(role, id, days)
        files.cert.parent.mkdir(parents=True, exist_ok=True)
        _write(files.key, issued.key_pem, 0o600)
        _write(files.cert, issued.cert_pem)
        _write(files.ca, self.cert_pem)
        return issued

    # -- revocation ------------------------------------------------------------------------------
    def revoked_serials(self) -> list[int]:
        path = self.dir / "revoked.json"
        return [int(s) for s in json.loads(path.read_text())] if path.exists() else []

    def revoke(self, serial: int) -> None:
        # Read, add, write and re-sign under one lock (threads of this process and, by flock, any other
        # process sharing the directory): two deletes revoking at once must not lose either serial.
        with self._revocation_locked():
            serials = self.revoked_serials()
            if serial not in serials:
                serials.append(serial)
                _write(self.dir / "revoked.json", json.dumps([str(s) for s in serials]).encode())
            self._write_crl(serials)

    @contextlib.contextmanager
    def _revocation_locked(self) -> Iterator[None]:
        with self._revoke_lock, open(self.dir / ".revoked.lock", "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            yield

    def crl_pem(self) -> bytes:
        return (self.dir / "crl.pem").read_bytes()

    def refresh_crl(self, now: dt.datetime | None = None) -> bool:
        """Re-signs the CRL when less than half its validity is left (hosts refuse to work without a
        current one). True when it was rewritten."""
        now = now or now_aware()
        try:
            crl = x509.load_pem_x509_crl(self.crl_pem())
            next_update = crl.next_update_utc
        except (FileNotFoundError, ValueError):
            next_update = None
        if next_update is not None and next_update - now > dt.timedelta(days=CRL_DAYS / 2):
            return False
        with self._revocation_locked():
            self._write_crl(self.revoked_serials())
        return True

    def _write_crl(self, serials: list[int]) -> None:
        now = now_aware()
        # The CRL number only grows (microseconds since the epoch): hosts refuse an older list than the
        # one they hold, so a replayed CRL cannot un-revoke anything.
        number = int(now.timestamp() * 1_000_000)
        try:
            number = max(number, load_crl(self.crl_pem(), self.cert_pem, check_time=False).number + 1)
        except (FileNotFoundError, ValueError, InvalidArgument):
            pass
        builder = (x509.CertificateRevocationListBuilder()
                   .issuer_name(self._cert.subject)
                   .last_update(now - dt.timedelta(minutes=5))
                   .next_update(now + dt.timedelta(days=CRL_DAYS))
                   .add_extension(x509.CRLNumber(number), critical=False))
        for s in serials:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build())
        crl = builder.sign(self._key, hashes.SHA256())
        _write(self.dir / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
        for listener in list(self.crl_listeners):
            listener()


def needs_renewal(cert_pem: bytes, now: dt.datetime | None = None) -> bool:
    """Whether a certificate is within the last third of its lifetime (at most 30 days before expiry)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or now_aware()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    margin = min((end - start) * RENEW_FRACTION, dt.timedelta(days=30))
    return end - now <= margin


@dataclass(frozen=True)
class Crl:
    pem: bytes
    serials: frozenset[int]
    number: int
    last_update: dt.datetime
    next_update: dt.datetime


def load_crl(crl_pem: bytes, ca_pem: bytes, now: dt.datetime | None = None, check_time: bool = True) -> Crl:
    """A CRL after checking it was signed by the CA (a forged CRL is refused) and, with check_time, that it
    is still current (a stale list could miss revocations: refused too)."""
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
    except ValueError as e:
        raise InvalidArgument(f"not a PEM revocation list: {e}", field="crl") from None
    ca = x509.load_pem_x509_certificate(ca_pem)
    public_key = ca.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(public_key):
        raise InvalidArgument("revocation list is not signed by the CA", field="crl")
    next_update = crl.next_update_utc
    if next_update is None:
        raise InvalidArgument("revocation list has no next update time", field="crl")
    if check_time and next_update <= (now or now_aware()):
        raise InvalidArgument(f"revocation list expired at {next_update.isoformat()}", field="crl")
    try:
        number = int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        number = 0
    return Crl(crl_pem, frozenset(r.serial_number for r in crl), number, crl.last_update_utc, next_update)


def revoked_in_crl(crl_pem: bytes, ca_pem: bytes) -> frozenset[int]:
    """Serials listed in a CRL, after checking the CRL was signed by the CA (a forged CRL is refused)."""
    return load_crl(crl_pem, ca_pem, check_time=False).serials

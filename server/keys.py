"""Backup encryption keys: a random 256-bit data key per tenant, kept in the state DB only wrapped
(AES-256-GCM, bound to the tenant's id) by a key-encryption key (KEK) that the server holds in a file of its
own (0600, `Settings.backup_kek_file`).

Deleting a tenant deletes its wrapped key row (crypto-shredding): every object ever encrypted under it is
then unreadable, whatever copies of the store survive. Keys are fetched per object and never cached, so a
destroyed key is gone for every server sharing the state DB at once.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import stat
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common.errors import FailedPrecondition, NotFound

from . import models

KEY_BYTES = 32
_NONCE_BYTES = 12
_WRAP_AAD = b"reddwarf/tenant-data-key/v1\0"


class DataKeys(Protocol):
    """Where the backup store gets a tenant's data key."""

    def key_for_write(self, tenant_id: str) -> bytes:
        """The tenant's data key, made on first use; refused for a deleted tenant."""

    def key_for_read(self, tenant_id: str) -> bytes:
        """The tenant's data key; NotFound once it was destroyed (or never made)."""


# ---------------------------------------------------------------------------- the KEK


def kek_id(kek: bytes) -> str:
    """A short public name of a KEK (not the key): recorded beside each wrapped key, so a wrong KEK file
    is reported as such rather than as corrupt keys."""
    return hashlib.sha256(b"reddwarf/kek-id\0" + kek).hexdigest()[:16]


def load_kek(path: str) -> bytes:
    """Reads a KEK file, refusing one that others may read or that is not 32 bytes."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FailedPrecondition(f"the key-encryption key {path} does not exist", field="backup_kek_file") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FailedPrecondition(f"the key-encryption key {path} is mode {stat.S_IMODE(st.st_mode):04o}; it must be "
                                 "0600 (readable by the server's user only)", field="backup_kek_file")
    with open(path, "rb") as f:
        kek = f.read()
    if len(kek) != KEY_BYTES:
        raise FailedPrecondition(f"the key-encryption key {path} holds {len(kek)} bytes, not {KEY_BYTES}",
                                 field="backup_kek_file")
    return kek


def ensure_kek(path: str, sessions: sessionmaker[Session]) -> bytes:
    """Loads the KEK, creating it (0600) if absent — but only while no tenant key is wrapped yet: a
    missing KEK with wrapped keys in the DB is a lost or misplaced file, and a fresh one would silently
    make every stored backup unreadable."""
    if not os.path.exists(path):
        with sessions() as s:
            wrapped = s.scalar(select(func.count()).select_from(models.TenantKey)) or 0
            ids = sorted(set(s.scalars(select(models.TenantKey.kek_id)).all())) if wrapped else []
        if wrapped:
            raise FailedPrecondition(
                f"the key-encryption key {path} is missing but {wrapped} tenant data key(s) are wrapped by KEK "
                f"{', '.join(ids)}: restore that file (without it those tenants' backups cannot be read)",
                field="backup_kek_file")
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return load_kek(path)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(KEY_BYTES))
            f.flush()
            os.fsync(f.fileno())
    return load_kek(path)


# ---------------------------------------------------------------------------- wrapping


def wrap(kek: bytes, tenant_id: str, data_key: bytes) -> bytes:
    """nonce || AES-256-GCM(KEK, data key), the tenant id as associated data: a wrapped key copied onto
    another tenant's row does not unwrap."""
    if len(data_key) != KEY_BYTES:
        raise ValueError("a data key is 32 bytes")
    nonce = secrets.token_bytes(_NONCE_BYTES)
    return nonce + AESGCM(kek).encrypt(nonce, data_key, _WRAP_AAD + tenant_id.encode())


def unwrap(kek: bytes, tenant_id: str, wrapped: bytes) -> bytes:
    try:
        key = AESGCM(kek).decrypt(wrapped[:_NONCE_BYTES], wrapped[_NONCE_BYTES:], _WRAP_AAD + tenant_id.encode())
    except (InvalidTag, ValueError):
        raise FailedPrecondition(f"the data key of tenant {tenant_id} does not unwrap with this server's "
                                 "key-encryption key (wrong KEK file, or the key row was altered)",
                                 field="tenant") from None
    if len(key) != KEY_BYTES:
        raise FailedPrecondition(f"the data key of tenant {tenant_id} is malformed", field="tenant")
    return key


# ---------------------------------------------------------------------------- per-tenant keys


class TenantKeys:
    """Tenant data keys in the state DB (table tenant_keys), wrapped by `kek`."""

    def __init__(self, sessions: sessionmaker[Session], kek: bytes) -> None:
        if len(kek) != KEY_BYTES:
            raise ValueError("a KEK is 32 bytes")
        self.sessions = sessions
        self._kek = kek
        self.kek_id = kek_id(kek)

    def _unwrap_row(self, row: models.TenantKey) -> bytes:
        if row.kek_id != self.kek_id:
            raise FailedPrecondition(f"the data key of tenant {row.tenant_id} is wrapped by KEK {row.kek_id}; "
                                     f"this server holds KEK {self.kek_id}", field="tenant")
        return unwrap(self._kek, row.tenant_id, row.wrapped_key)

    def key_for_read(self, tenant_id: str) -> bytes:
        with self.sessions() as s:
            row = s.get(models.TenantKey, tenant_id)
            if row is None:
                raise NotFound(f"tenant {tenant_id} has no data key (the tenant was deleted: its backups are "
                               "unreadable by design)", field="tenant")
            return self._unwrap_row(row)

    def key_for_write(self, tenant_id: str) -> bytes:
        with self.sessions() as s:
            row = s.get(models.TenantKey, tenant_id)
            if row is not None:
                return self._unwrap_row(row)
        key = secrets.token_bytes(KEY_BYTES)
        try:
            with self.sessions() as s, s.begin():
                tenant = s.get(models.Tenant, tenant_id)
                if tenant is None or tenant.deleted_at is not None:
                    raise FailedPrecondition(f"tenant {tenant_id} does not exist or was deleted: nothing is stored "
                                             "for it", field="tenant")
                s.add(models.TenantKey(tenant_id=tenant_id, wrapped_key=wrap(self._kek, tenant_id, key),
                                       kek_id=self.kek_id))
        except IntegrityError:  # a concurrent first write made it: use that one
            return self.key_for_read(tenant_id)
        return key


def destroy_tenant_key(s: Session, tenant_id: str) -> int:
    """Crypto-shredding: deletes the tenant's wrapped data key in the caller's transaction. Returns how many
    rows went (0 if the tenant never stored anything)."""
    result = s.execute(delete(models.TenantKey).where(models.TenantKey.tenant_id == tenant_id))
    return int(getattr(result, "rowcount", 0) or 0)


class MemoryKeys:
    """Data keys held in memory only (tests, benchmarks): random per tenant, lost with the process."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def key_for_write(self, tenant_id: str) -> bytes:
        return self.keys.setdefault(tenant_id, secrets.token_bytes(KEY_BYTES))

    def key_for_read(self, tenant_id: str) -> bytes:
        try:
            return self.keys[tenant_id]
        except KeyError:
            raise NotFound(f"tenant {tenant_id} has no data key", field="tenant") from None

    def destroy(self, tenant_id: str) -> None:
        self.keys.pop(tenant_id, None)

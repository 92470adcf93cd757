"""Where backup bytes live on the server side: a local folder (default) or an S3-compatible bucket,
encrypted at rest under the owning tenant's data key (server/keys.py).

A stored object appears only through `BackupWriter.commit(expected_sha256)`, and only when the bytes
received hash to what the agent said it sent; a cut-off, corrupted or oversized upload is discarded and can
never be offered for restore. Each backup is written once, by one upload at a time. Credentials for S3 and
the keys are the server's alone: the guest never sees them.

Object format (version 1), streamed in chunks so neither side holds a whole backup in memory:

    header = MAGIC | chunk size (u32) | salt (32) | len + tenant id | len + backup id
    chunk i = AES-256-GCM(object key, nonce = i as 96 bits, plaintext[i*size:(i+1)*size],
                          associated data = header | i (u64) | final (u8))

The object key is HKDF-SHA256(tenant data key, salt), so every object has a key of its own and a counter
nonce never repeats under a key. Every chunk but the last holds exactly `chunk size` bytes; the last is
shorter (possibly empty) and flagged final. Binding the header, the index and the flag into every chunk
means a chunk cannot be altered, reordered, dropped, moved to another backup or tenant, and the object
cannot be truncated or extended, without failing authentication. The SHA-256 the system records is the
guest's, over the plaintext: checked on commit, and again (after decryption) by `verify`.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import importlib
import logging
import os
import re
import secrets
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from reddwarf.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

from .keys import DataKeys

log = logging.getLogger("reddwarf.server.backup_store")

CHUNK_BYTES = 1 << 20
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".xbstream.zst.enc"

MAGIC = b"RDWBAK\x00\x01"          # name + format version
_FIXED = struct.Struct(">8sI32s")   # magic, chunk size, salt
_TAG = 16
_MAX_CHUNK = 16 << 20              # a header asking for more is refused before any allocation
_KDF_INFO = b"reddwarf/backup-object/v1"


class DigestMismatch(FailedPrecondition):
    """The bytes received do not hash to the digest the sender announced; nothing was stored."""


class CorruptObject(FailedPrecondition):
    """A stored object failed authentication (altered, truncated, reordered or not ours): refused."""


@dataclass(frozen=True)
class StoredObject:
    backup_id: str
    size_bytes: int   # plaintext bytes: what the guest sent
    sha256: str       # over the plaintext
    # Operator-facing location: a path or s3://bucket/key.
    location: str


@dataclass(frozen=True)
class VerifyOutcome:
    ok: bool
    size_bytes: int
    sha256: str
    detail: str = ""


def check_backup_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not _ID_RE.fullmatch(backup_id):
        raise InvalidArgument("backup id must be 1..64 letters, digits, '-' or '_'", field="backup_id")
    return backup_id


def check_sha256(sha256: str, field: str = "sha256") -> str:
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise InvalidArgument("sha256 must be 64 lowercase hex digits", field=field)
    return sha256


def upload_cap(volume_size_gb: int, factor: float, margin_mb: int) -> int:
    """The most bytes one backup of an instance may upload: `factor` × its volume plus a margin."""
    return int(max(0, volume_size_gb) * (1 << 30) * factor) + max(0, margin_mb) * (1 << 20)


# ---------------------------------------------------------------------------- the encrypted format


def _header(tenant_id: str, backup_id: str, salt: bytes, chunk_bytes: int) -> bytes:
    t, b = tenant_id.encode(), backup_id.encode()
    if not 0 < len(t) < 256 or not 0 < len(b) < 256:
        raise InvalidArgument("tenant and backup ids must be 1..255 bytes", field="tenant")
    return _FIXED.pack(MAGIC, chunk_bytes, salt) + bytes([len(t)]) + t + bytes([len(b)]) + b


def _object_cipher(data_key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_KDF_INFO).derive(data_key))


def _nonce(index: int) -> bytes:
    return index.to_bytes(12, "big")


def _aad(header: bytes, index: int, final: bool) -> bytes:
    return header + struct.pack(">QB", index, 1 if final else 0)


class ChunkSealer:
    """Encrypts a plaintext stream into the object format, chunk by chunk."""

    def __init__(self, data_key: bytes, tenant_id: str, backup_id: str, chunk_bytes: int = CHUNK_BYTES) -> None:
        salt = secrets.token_bytes(32)
        self.chunk_bytes = chunk_bytes
        self.header = _header(tenant_id, backup_id, salt, chunk_bytes)
        self._aead = _object_cipher(data_key, salt)
        self._buf = bytearray()
        self._index = 0
        self.finished = False

    def _seal(self, data: bytes, final: bool) -> bytes:
        out = self._aead.encrypt(_nonce(self._index), data, _aad(self.header, self._index, final))
        self._index += 1
        return out

    def update(self, data: bytes) -> bytes:
        """Ciphertext for every whole chunk now available (maybe none)."""
        self._buf += data
        out = bytearray()
        while len(self._buf) >= self.chunk_bytes:  # a whole chunk is never the final one
            out += self._seal(bytes(self._buf[:self.chunk_bytes]), False)
            del self._buf[:self.chunk_bytes]
        return bytes(out)

    def finish(self) -> bytes:
        """The final chunk: what is left (shorter than a chunk, possibly nothing), flagged final."""
        self.finished = True
        out = self._seal(bytes(self._buf), True)
        self._buf.clear()
        return out


class RawObject(abc.ABC):
    """The stored bytes of one object, read sequentially."""

    @abc.abstractmethod
    async def read(self, n: int) -> bytes:
        """Up to n bytes; fewer only at the end."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = await self.read(n - len(out))
            if not data:
                break
            out += data
        return bytes(out)


async def open_sealed(raw: RawObject, backup_id: str, keys: DataKeys) -> AsyncIterator[bytes]:
    """Yields the plaintext of a stored object, authenticating each chunk before yielding it."""
    def corrupt(why: str) -> CorruptObject:
        return CorruptObject(f"stored object of backup {backup_id} is refused: {why}", field="backup_id")

    fixed = await raw.read_exact(_FIXED.size)
    if len(fixed) < _FIXED.size:
        raise corrupt("it is shorter than its header")
    magic, chunk_bytes, salt = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise corrupt("it is not an encrypted Red Dwarf backup (unknown format)")
    if not 0 < chunk_bytes <= _MAX_CHUNK:
        raise corrupt(f"its header names a chunk size of {chunk_bytes} bytes")
    ids = []
    for _ in range(2):
        n = await raw.read_exact(1)
        value = await raw.read_exact(n[0]) if n else b""
        if not n or len(value) != n[0] or not value:
            raise corrupt("its header is cut off")
        ids.append(value)
    header = fixed + bytes([len(ids[0])]) + ids[0] + bytes([len(ids[1])]) + ids[1]
    try:
        tenant_id, stored_id = ids[0].decode(), ids[1].decode()
    except UnicodeDecodeError:
        raise corrupt("its header is malformed") from None
    if stored_id != backup_id:
        raise corrupt(f"it was made for backup {stored_id!r}")
    aead = _object_cipher(keys.key_for_read(tenant_id), salt)
    index = 0
    while True:
        block = await raw.read_exact(chunk_bytes + _TAG)
        final = len(block) < chunk_bytes + _TAG
        if len(block) < _TAG:
            raise corrupt(f"it ends after chunk {index - 1} without its final chunk (truncated)")
        try:
            plain = aead.decrypt(_nonce(index), block, _aad(header, index, final))
        except InvalidTag:
            raise corrupt(f"chunk {index} fails authentication (altered, reordered, truncated or under "
                          "another key)") from None
        if plain:
            yield plain
        if final:
            return
        index += 1


# ---------------------------------------------------------------------------- writers and stores


class BackupWriter(abc.ABC):
    """One upload in progress. Use as `async with store.open_writer(id, tenant) as w:`; leaving the block
    without a successful `commit` discards everything written."""

    def __init__(self, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int = 0,
                 on_close: Callable[[], None] | None = None) -> None:
        self.backup_id = backup_id
        self.tenant_id = tenant_id
        self.size_bytes = 0
        self.max_bytes = max_bytes
        self._digest = hashlib.sha256()
        self._sealer = ChunkSealer(data_key, tenant_id, backup_id)
        self._started = False
        self._on_close = on_close
        self.committed = False
        self.closed = False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    async def _put(self, ciphertext: bytes) -> None:
        if not self._started:
            self._started = True
            ciphertext = self._sealer.header + ciphertext
        if ciphertext:
            await self._write(ciphertext)

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise FailedPrecondition("the upload is already finished", field="backup_id")
        if not data:
            return
        if self.max_bytes and self.size_bytes + len(data) > self.max_bytes:
            await self.abort()
            raise ResourceExhausted(f"backup {self.backup_id}: the upload passed its cap of {self.max_bytes} "
                                    "bytes (set by the instance's volume size); nothing was stored",
                                    field="data")
        self._digest.update(data)
        self.size_bytes += len(data)
        await self._put(self._sealer.update(data))

    async def commit(self, expected_sha256: str) -> StoredObject:
        """Publishes atomically iff the bytes hash to expected_sha256; otherwise discards and raises."""
        check_sha256(expected_sha256)
        if self.closed:
            raise FailedPrecondition("the upload is already finished", field="backup_id")
        actual = self.sha256
        if actual != expected_sha256:
            await self.abort()
            raise DigestMismatch(f"backup {self.backup_id}: received {self.size_bytes} bytes with SHA-256 "
                                 f"{actual}, the sender announced {expected_sha256}; nothing was stored",
                                 field="sha256")
        try:
            await self._put(self._sealer.finish())
            location = await self._publish()
        except BaseException:
            await self.abort()
            raise
        self.committed = self.closed = True
        self._closed()
        return StoredObject(self.backup_id, self.size_bytes, actual, location)

    async def abort(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                await self._discard()
            finally:
                self._closed()

    def _closed(self) -> None:
        if self._on_close is not None:
            self._on_close()
            self._on_close = None

    async def __aenter__(self) -> BackupWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.abort()

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _publish(self) -> str:
        """Makes the object visible under its final name; AlreadyExists if one is there."""

    @abc.abstractmethod
    async def _discard(self) -> None: ...


class BackupStore(abc.ABC):
    def __init__(self, keys: DataKeys) -> None:
        self.keys = keys
        self._uploading: set[str] = set()

    def open_writer(self, backup_id: str, tenant_id: str, max_bytes: int = 0) -> BackupWriter:
        """An upload of one backup under its tenant's key, at most `max_bytes` of plaintext (0: no cap).
        Refused ABORTED while another upload of the same backup is in progress (one at a time), and
        ALREADY_EXISTS once the backup is stored (a backup is written once)."""
        check_backup_id(backup_id)
        if backup_id in self._uploading:
            raise Aborted(f"an upload of backup {backup_id} is already in progress; one upload per backup",
                          field="backup_id")
        self._refuse_if_stored(backup_id)
        key = self.keys.key_for_write(tenant_id)
        self._uploading.add(backup_id)
        try:
            return self._writer(backup_id, key, tenant_id, max_bytes,
                                lambda: self._uploading.discard(backup_id))
        except BaseException:
            self._uploading.discard(backup_id)
            raise

    def _refuse_if_stored(self, backup_id: str) -> None:
        """A cheap early refusal where the store can tell at once (the publish refuses in any case)."""
        return None

    @abc.abstractmethod
    def _writer(self, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                on_close: Callable[[], None]) -> BackupWriter: ...

    @abc.abstractmethod
    async def _open_raw(self, backup_id: str) -> RawObject:
        """The stored bytes; NotFound if nothing was committed under this id."""

    async def open_reader(self, backup_id: str) -> AsyncIterator[bytes]:
        """Yields the plaintext in chunks, each authenticated first; NotFound if nothing was committed under
        this id, CorruptObject at the first chunk that fails authentication."""
        raw = await self._open_raw(check_backup_id(backup_id))
        try:
            async for data in open_sealed(raw, backup_id, self.keys):
                yield data
        finally:
            await raw.close()

    @abc.abstractmethod
    async def exists(self, backup_id: str) -> bool: ...

    @abc.abstractmethod
    async def delete(self, backup_id: str) -> None:
        """Removes the object; deleting what is not there is not an error (idempotent task steps)."""

    @abc.abstractmethod
    def location(self, backup_id: str) -> str: ...

    def clean_partials(self) -> int:
        """Removes what uploads cut off with a killed server left behind; the count removed. A store that
        publishes atomically (S3's multipart complete) leaves nothing to clean."""
        return 0

    async def verify(self, backup_id: str, sha256: str) -> VerifyOutcome:
        """Re-reads, authenticates, decrypts and re-hashes what is stored."""
        check_sha256(sha256)
        digest = hashlib.sha256()
        size = 0
        try:
            async for chunk in self.open_reader(backup_id):
                digest.update(chunk)
                size += len(chunk)
        except CorruptObject as err:
            return VerifyOutcome(False, size, "", f"{err.message}; recorded SHA-256 {sha256}")
        actual = digest.hexdigest()
        detail = "" if actual == sha256 else f"stored bytes of {backup_id} hash to {actual}, recorded {sha256}"
        return VerifyOutcome(actual == sha256, size, actual, detail)


# ---------------------------------------------------------------------------- local folder


class _LocalWriter(BackupWriter):
    def __init__(self, store: LocalStore, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                 on_close: Callable[[], None]) -> None:
        super().__init__(backup_id, data_key, tenant_id, max_bytes, on_close)
        self.store = store
        os.makedirs(store.partial_dir, mode=0o700, exist_ok=True)
        # A random suffix: two uploads of one id (a retry racing a stale one) never share a file.
        self.partial = os.path.join(store.partial_dir, f"{backup_id}.{secrets.token_hex(6)}.partial")
        fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._f = os.fdopen(fd, "wb")  # closed in _publish/_discard

    async def _write(self, data: bytes) -> None:
        await asyncio.to_thread(self._f.write, data)

    async def _publish(self) -> str:
        final = self.store.path(self.backup_id)

        def publish() -> None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            try:
                os.link(self.partial, final)  # atomic, and never over an object already there
            except FileExistsError:
                raise AlreadyExists(f"backup {self.backup_id} is already stored; a backup is written once",
                                    field="backup_id") from None
            os.unlink(self.partial)
            dfd = os.open(self.store.root, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

        await asyncio.to_thread(publish)
        return final

    async def _discard(self) -> None:
        self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.partial)


class _LocalObject(RawObject):
    def __init__(self, path: str) -> None:
        self._f = open(path, "rb")  # noqa: SIM115 - closed in close()

    async def read(self, n: int) -> bytes:
        return await asyncio.to_thread(self._f.read, n)

    async def close(self) -> None:
        self._f.close()


class LocalStore(BackupStore):
    """Backups as files `<root>/<id>.xbstream.zst.enc` (0600); uploads in progress under `<root>/.partial/`."""

    def __init__(self, root: str, keys: DataKeys) -> None:
        super().__init__(keys)
        self.root = os.path.abspath(root)
        self.partial_dir = os.path.join(self.root, ".partial")
        os.makedirs(self.partial_dir, mode=0o700, exist_ok=True)
        os.chmod(self.root, 0o700)

    def path(self, backup_id: str) -> str:
        return os.path.join(self.root, check_backup_id(backup_id) + SUFFIX)

    def location(self, backup_id: str) -> str:
        return self.path(backup_id)

    def _refuse_if_stored(self, backup_id: str) -> None:
        if os.path.exists(self.path(backup_id)):
            raise AlreadyExists(f"backup {backup_id} is already stored; a backup is written once", field="backup_id")

    def _writer(self, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                on_close: Callable[[], None]) -> BackupWriter:
        return _LocalWriter(self, backup_id, data_key, tenant_id, max_bytes, on_close)

    async def _open_raw(self, backup_id: str) -> RawObject:
        try:
            return _LocalObject(self.path(backup_id))
        except FileNotFoundError:
            raise NotFound(f"backup {backup_id} has no stored data", field="backup_id") from None

    async def exists(self, backup_id: str) -> bool:
        return os.path.exists(self.path(backup_id))

    async def delete(self, backup_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(backup_id))

    def clean_partials(self) -> int:
        """Removes uploads left by a crashed server (call at start, before serving)."""
        n = 0
        for name in os.listdir(self.partial_dir):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.partial_dir, name))
                n += 1
        return n


# ---------------------------------------------------------------------------- S3-compatible


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    prefix: str = "backups/"
    region: str = "us-east-1"

    def __repr__(self) -> str:  # never print the secret
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"


# S3 parts must be at least 5 MiB (except the last).
_S3_PART = 8 << 20


class _S3Writer(BackupWriter):
    """A multipart upload: invisible until CompleteMultipartUpload, which runs only if the digest matches,
    so an S3 object under the final key is always whole and correct."""

    def __init__(self, store: S3Store, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                 on_close: Callable[[], None]) -> None:
        super().__init__(backup_id, data_key, tenant_id, max_bytes, on_close)
        self.store = store
        self.key = store.key(backup_id)
        self._buf = bytearray()
        self._parts: list[dict[str, Any]] = []
        self._upload_id: str | None = None

    async def _ensure_upload(self) -> str:
        if self._upload_id is None:
            resp = await asyncio.to_thread(self.store.client.create_multipart_upload,
                                           Bucket=self.store.settings.bucket, Key=self.key)
            self._upload_id = str(resp["UploadId"])
        return self._upload_id

    async def _flush_part(self) -> None:
        upload_id = await self._ensure_upload()
        number = len(self._parts) + 1
        body = bytes(self._buf)
        self._buf.clear()
        resp = await asyncio.to_thread(self.store.client.upload_part, Bucket=self.store.settings.bucket,
                                       Key=self.key, UploadId=upload_id, PartNumber=number, Body=body)
        self._parts.append({"ETag": resp["ETag"], "PartNumber": number})

    async def _write(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) >= _S3_PART:
            await self._flush_part()

    async def _publish(self) -> str:
        if await self.store.exists(self.backup_id):  # S3 has no portable create-only put
            raise AlreadyExists(f"backup {self.backup_id} is already stored; a backup is written once",
                                field="backup_id")
        if self._buf or not self._parts:
            await self._flush_part()
        await asyncio.to_thread(self.store.client.complete_multipart_upload, Bucket=self.store.settings.bucket,
                                Key=self.key, UploadId=self._upload_id,
                                MultipartUpload={"Parts": self._parts})
        return self.store.location(self.backup_id)

    async def _discard(self) -> None:
        self._buf.clear()
        if self._upload_id is not None:
            try:
                await asyncio.to_thread(self.store.client.abort_multipart_upload,
                                        Bucket=self.store.settings.bucket, Key=self.key,
                                        UploadId=self._upload_id)
            except Exception:  # the bucket's lifecycle rule reaps it otherwise
                log.warning("could not abort multipart upload backup=%s", self.backup_id, exc_info=True)


class _S3Object(RawObject):
    def __init__(self, body: Any) -> None:
        self._body = body

    async def read(self, n: int) -> bytes:
        return bytes(await asyncio.to_thread(self._body.read, n))

    async def close(self) -> None:
        self._body.close()


class S3Store(BackupStore):
    """Objects `<prefix><id>.xbstream.zst.enc` in one bucket. boto3 is optional: imported only when used."""

    def __init__(self, settings: S3Settings, keys: DataKeys, client: Any | None = None) -> None:
        super().__init__(keys)
        self.settings = settings
        if client is None:
            try:
                boto3 = importlib.import_module("boto3")  # optional dependency
            except ImportError as exc:
                raise FailedPrecondition("the S3 backup store needs boto3 (pip install boto3)",
                                         field="backup_store") from exc
            client = boto3.client("s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
                                  aws_access_key_id=settings.access_key_id,
                                  aws_secret_access_key=settings.secret_access_key)
        self.client = client

    def key(self, backup_id: str) -> str:
        return self.settings.prefix + check_backup_id(backup_id) + SUFFIX

    def location(self, backup_id: str) -> str:
        return f"s3://{self.settings.bucket}/{self.key(backup_id)}"

    def _writer(self, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                on_close: Callable[[], None]) -> BackupWriter:
        return _S3Writer(self, backup_id, data_key, tenant_id, max_bytes, on_close)

    def _is_missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    async def _open_raw(self, backup_id: str) -> RawObject:
        try:
            resp = await asyncio.to_thread(self.client.get_object, Bucket=self.settings.bucket,
                                           Key=self.key(backup_id))
        except Exception as exc:
            if self._is_missing(exc):
                raise NotFound(f"backup {backup_id} has no stored data", field="backup_id") from None
            raise
        return _S3Object(resp["Body"])

    async def exists(self, backup_id: str) -> bool:
        try:
            await asyncio.to_thread(self.client.head_object, Bucket=self.settings.bucket, Key=self.key(backup_id))
            return True
        except Exception as exc:
            if self._is_missing(exc):
                return False
            raise

    async def delete(self, backup_id: str) -> None:
        await asyncio.to_thread(self.client.delete_object, Bucket=self.settings.bucket, Key=self.key(backup_id))

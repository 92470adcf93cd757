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
import base64
import collections
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
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from reddwarf.common import config
from reddwarf.common.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RedDwarfError,
    ResourceExhausted,
    Unavailable,
)

from .keys import DataKeys

if TYPE_CHECKING:
    from .settings import Settings

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


class ObjectPreconditionFailed(FailedPrecondition):
    """The object store refused a conditional request (If-None-Match / If-Match)."""


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
        if not self._buf and len(data) == self.chunk_bytes:
            return self._seal(data, False)  # the agent sends whole chunks: no buffering, no copies
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
        # The chunk being hashed, sealed and stored while the caller fetches the next one (at most one).
        self._pending: asyncio.Task[None] | None = None
        self.committed = False
        self.closed = False

    @property
    def sha256(self) -> str:
        """Of the bytes hashed so far: all of them after `flush` or `commit`."""
        return self._digest.hexdigest()

    async def _put(self, ciphertext: bytes) -> None:
        if not self._started:
            self._started = True
            ciphertext = self._sealer.header + ciphertext
        if ciphertext:
            await self._write(ciphertext)

    async def write(self, data: bytes) -> None:
        """Takes one chunk. Hashing, sealing and storing it run behind this call (in a thread: hashlib drops
        the GIL), one chunk at a time, so the next chunk is received meanwhile; a failure there is raised by
        the next write or the commit, and nothing is published after one."""
        if self.closed:
            raise FailedPrecondition("the upload is already finished", field="backup_id")
        if not data:
            return
        if self.max_bytes and self.size_bytes + len(data) > self.max_bytes:
            await self.abort()
            raise ResourceExhausted(f"backup {self.backup_id}: the upload passed its cap of {self.max_bytes} "
                                    "bytes (set by the instance's volume size); nothing was stored",
                                    field="data")
        self.size_bytes += len(data)
        await self._settle()
        self._pending = asyncio.create_task(self._ingest(data))

    async def _ingest(self, data: bytes) -> None:
        await self._put(await asyncio.to_thread(self._hash_and_seal, data))

    def _hash_and_seal(self, data: bytes) -> bytes:
        self._digest.update(data)
        return self._sealer.update(data)

    async def flush(self) -> None:
        """Returns once every chunk written so far is hashed and handed to the store (`sha256` covers it)."""
        await self._settle()

    async def _settle(self) -> None:
        """Waits for the chunk in flight; its error (a full disk, a refused part) is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            await pending

    async def commit(self, expected_sha256: str) -> StoredObject:
        """Publishes atomically iff the bytes hash to expected_sha256; otherwise discards and raises."""
        check_sha256(expected_sha256)
        if self.closed:
            raise FailedPrecondition("the upload is already finished", field="backup_id")
        try:
            await self._settle()
        except BaseException:
            await self.abort()
            raise
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
                if self._pending is not None:
                    pending, self._pending = self._pending, None
                    try:
                        # Its thread cannot be stopped: let it end before the partial object goes.
                        await asyncio.wait([pending])
                    finally:
                        if pending.done() and not pending.cancelled():
                            pending.exception()  # retrieved: the caller already has the failure that matters
                        await self._discard()
                else:
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
    # TLS: verify the endpoint's certificate (against ca_file when given, else the system's CAs).
    verify_tls: bool = True
    ca_file: str = ""
    part_bytes: int = 8 << 20
    # Parts uploading at once while the next fills (memory: this many parts plus the one filling). One at a
    # time left the store idle between a part's answer and the next request.
    parts_in_flight: int = 3
    # An incomplete multipart upload older than this is a crashed server's leftover: clean_partials aborts
    # it. Younger ones may be another server's upload in progress (the bucket is shared) and are left alone.
    stale_upload_seconds: float = 86400.0
    # How long an upload keeps retrying a part (or its completion) while the store is unreachable, so a
    # restart of the store (SeaweedFS takes seconds) does not fail the backup; past that: UNAVAILABLE.
    retry_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.part_bytes < S3_MIN_PART:
            raise InvalidArgument(f"S3 parts must be at least {S3_MIN_PART} bytes (5 MiB)", field="s3_part_mb")
        if not 1 <= self.parts_in_flight <= 16:
            raise InvalidArgument("parts in flight must be 1..16", field="parts_in_flight")

    def __repr__(self) -> str:  # never print the secret
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r}, prefix={self.prefix!r})"


S3_MIN_PART = 5 << 20   # S3's floor for every part but the last


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _part_digests(body: bytes) -> tuple[bytes, str]:
    return hashlib.md5(body, usedforsecurity=False).digest(), _b64(hashlib.sha256(body).digest())


@dataclass(frozen=True)
class _Part:
    number: int
    size: int
    md5: bytes
    sha256_b64: str


class _S3Writer(BackupWriter):
    """A multipart upload: invisible until CompleteMultipartUpload, which runs only once the plaintext digest
    matched and the store confirmed every part it holds (number, size, MD5 ETag) is the one we sent. Memory
    is bounded: the part being filled plus at most `parts_in_flight` parts uploading."""

    def __init__(self, store: S3Store, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                 on_close: Callable[[], None]) -> None:
        super().__init__(backup_id, data_key, tenant_id, max_bytes, on_close)
        self.store = store
        self.key = store.key(backup_id)
        self._buf = bytearray()
        self._parts: list[_Part] = []
        self._upload_id: str | None = None
        self._inflight: collections.deque[asyncio.Task[_Part]] = collections.deque()  # oldest first

    async def _ensure_upload(self) -> str:
        if self._upload_id is None:
            resp = await self.store.call("create_multipart_upload", self.backup_id, Key=self.key,
                                         ChecksumAlgorithm="SHA256")
            self._upload_id = str(resp["UploadId"])
            self.store.open_uploads.add(self._upload_id)
        return self._upload_id

    async def _upload_part(self, upload_id: str, number: int, body: bytes) -> _Part:
        md5, sha = await asyncio.to_thread(_part_digests, body)  # 8 MiB of hashing kept off the event loop
        # Content-MD5 and x-amz-checksum-sha256 make the store refuse a part damaged on the way (BadDigest).
        resp = await self.store.call_retrying("upload_part", self.backup_id, Key=self.key, UploadId=upload_id,
                                              PartNumber=number, Body=body, ContentMD5=_b64(md5),
                                              ChecksumSHA256=sha)
        etag = str(resp.get("ETag", "")).strip('"')
        echoed = resp.get("ChecksumSHA256")
        if etag != md5.hex() or (echoed is not None and echoed != sha):
            raise DataLoss(f"backup {self.backup_id}: the store acknowledged part {number} with ETag {etag} "
                           f"and checksum {echoed}, not what was sent; nothing was stored", field="backup_id")
        return _Part(number, len(body), md5, sha)

    async def _drain(self, keep: int = 0) -> None:
        """Waits for the oldest parts in flight until at most `keep` remain (their order is the parts')."""
        while len(self._inflight) > keep:
            self._parts.append(await self._inflight[0])
            self._inflight.popleft()

    async def _send(self, body: bytes) -> None:
        upload_id = await self._ensure_upload()
        # Bounded memory, and the store kept busy: a new part starts once fewer than the limit are in flight.
        await self._drain(self.store.settings.parts_in_flight - 1)
        number = len(self._parts) + len(self._inflight) + 1
        self._inflight.append(asyncio.create_task(self._upload_part(upload_id, number, body)))

    async def _write(self, data: bytes) -> None:
        self._buf += data
        size = self.store.settings.part_bytes
        while len(self._buf) >= size:
            body = bytes(self._buf[:size])
            del self._buf[:size]
            await self._send(body)

    async def _check_parts(self, upload_id: str) -> None:
        """What the store holds for this upload, part by part, against what we sent."""
        held: dict[int, tuple[int, str]] = {}
        marker = 0
        while True:
            resp = await self.store.call_retrying("list_parts", self.backup_id, Key=self.key, UploadId=upload_id,
                                         PartNumberMarker=marker)
            for p in resp.get("Parts", []):
                held[int(p["PartNumber"])] = (int(p["Size"]), str(p["ETag"]).strip('"'))
            if not resp.get("IsTruncated"):
                break
            marker = int(resp["NextPartNumberMarker"])
        sent = {p.number: (p.size, p.md5.hex()) for p in self._parts}
        if held != sent:
            raise DataLoss(f"backup {self.backup_id}: the store holds {len(held)} parts that differ from the "
                           f"{len(sent)} sent; nothing was stored", field="backup_id")

    async def _publish(self) -> str:
        if await self.store.exists(self.backup_id):  # early, cheap; IfNoneMatch below is the real guard
            raise AlreadyExists(f"backup {self.backup_id} is already stored; a backup is written once",
                                field="backup_id")
        if self._buf or not (self._parts or self._inflight):
            body = bytes(self._buf)
            self._buf.clear()
            await self._send(body)
        await self._drain()
        upload_id = await self._ensure_upload()
        await self._check_parts(upload_id)
        parts = [{"PartNumber": p.number, "ETag": f'"{p.md5.hex()}"', "ChecksumSHA256": p.sha256_b64}
                 for p in self._parts]
        want = hashlib.md5(b"".join(p.md5 for p in self._parts), usedforsecurity=False).hexdigest()
        want = f"{want}-{len(self._parts)}"
        etag = await self._complete(upload_id, parts, want)
        self.store.open_uploads.discard(upload_id)
        self._upload_id = None
        if etag != want:
            # Cannot happen after the part check; if it does, what is there is not what we sent: remove it.
            await self.store.delete(self.backup_id)
            raise DataLoss(f"backup {self.backup_id}: the completed object's ETag {etag} is not the one of the "
                           "parts sent; it was removed", field="backup_id")
        return self.store.location(self.backup_id)

    async def _complete(self, upload_id: str, parts: list[dict[str, Any]], want: str) -> str:
        """CompleteMultipartUpload, create-only; the object's ETag. A completion retried after its answer was
        lost finds the upload gone or the key taken: the object is ours iff its ETag is the one of our parts."""
        deadline = asyncio.get_running_loop().time() + self.store.settings.retry_seconds
        lost_answer = False
        while True:
            try:
                resp = await self.store.call("complete_multipart_upload", self.backup_id, Key=self.key,
                                             UploadId=upload_id, MultipartUpload={"Parts": parts},
                                             IfNoneMatch="*")
                return str(resp.get("ETag", "")).strip('"')
            except Unavailable:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                lost_answer = True
                await asyncio.sleep(1)
            except (ObjectPreconditionFailed, NotFound):
                if lost_answer:
                    with contextlib.suppress(NotFound, Unavailable):
                        head = await self.store.call("head_object", self.backup_id, Key=self.key)
                        if str(head.get("ETag", "")).strip('"') == want:
                            return want
                raise AlreadyExists(f"backup {self.backup_id} is already stored; a backup is written once",
                                    field="backup_id") from None

    async def _discard(self) -> None:
        self._buf.clear()
        inflight, self._inflight = list(self._inflight), collections.deque()
        for task in inflight:
            task.cancel()
        for task in inflight:
            with contextlib.suppress(BaseException):
                await task
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            try:
                await self.store.call("abort_multipart_upload", self.backup_id, Key=self.key, UploadId=upload_id)
            except RedDwarfError:  # never visible anyway; clean_partials aborts it once it is stale
                log.warning("could not abort the multipart upload of backup %s", self.backup_id, exc_info=True)
            finally:
                self.store.open_uploads.discard(upload_id)


class _S3Object(RawObject):
    """A streamed GET; a connection cut mid-object resumes with a ranged GET from where it stopped, pinned to
    the same object by its ETag (If-Match)."""

    _RESUMES = 3

    def __init__(self, store: S3Store, backup_id: str, body: Any, etag: str) -> None:
        self._store = store
        self._backup_id = backup_id
        self._body = body
        self._etag = etag
        self._offset = 0
        self._resumes = 0

    async def read(self, n: int) -> bytes:
        while True:
            try:
                data = bytes(await asyncio.to_thread(self._body.read, n))
                self._offset += len(data)
                return data
            except Exception as exc:
                if self._resumes >= self._RESUMES or not _is_transport_error(exc):
                    raise Unavailable(f"backup {self._backup_id}: reading from the object store failed at "
                                      f"byte {self._offset}: {type(exc).__name__}", field="backup_id") from exc
                self._resumes += 1
                log.warning("backup %s: GET cut at byte %d, resuming", self._backup_id, self._offset)
                self._body.close()
                resp = await self._store.call("get_object", self._backup_id, Key=self._store.key(self._backup_id),
                                              Range=f"bytes={self._offset}-", IfMatch=self._etag)
                self._body = resp["Body"]

    async def close(self) -> None:
        self._body.close()


def _is_transport_error(exc: BaseException) -> bool:
    """A dropped or refused connection, a timeout: worth retrying, unlike an answer from the store."""
    botocore_exc = importlib.import_module("botocore.exceptions")
    urllib3_exc = importlib.import_module("urllib3.exceptions")
    return isinstance(exc, (botocore_exc.ConnectionError, botocore_exc.HTTPClientError,
                            botocore_exc.ResponseStreamingError, botocore_exc.ReadTimeoutError,
                            urllib3_exc.HTTPError, ConnectionError, TimeoutError))


class S3Store(BackupStore):
    """Objects `<prefix><id>.xbstream.zst.enc` in one bucket of an S3-compatible store (SeaweedFS in the
    tests), shared by every server. Every call runs in a worker thread (boto3 is synchronous) and its
    failures become our errors: UNAVAILABLE when the store cannot be reached, the object store's own refusal
    otherwise, never with the credentials in them."""

    def __init__(self, settings: S3Settings, keys: DataKeys, client: Any | None = None) -> None:
        super().__init__(keys)
        self.settings = settings
        self.open_uploads: set[str] = set()   # this process's uploads: never aborted as stale
        if client is None:
            boto3 = importlib.import_module("boto3")
            botocore_config = importlib.import_module("botocore.config")
            verify: bool | str = settings.ca_file or settings.verify_tls
            client = boto3.client(
                "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, verify=verify,
                aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
                config=botocore_config.Config(
                    connect_timeout=5, read_timeout=60, retries={"max_attempts": 4, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    # We send our own per-part SHA-256 and MD5; no extra CRC trailer many S3 clones refuse.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required"))
        self.client = client

    def key(self, backup_id: str) -> str:
        return self.settings.prefix + check_backup_id(backup_id) + SUFFIX

    def location(self, backup_id: str) -> str:
        return f"s3://{self.settings.bucket}/{self.key(backup_id)}"

    def _writer(self, backup_id: str, data_key: bytes, tenant_id: str, max_bytes: int,
                on_close: Callable[[], None]) -> BackupWriter:
        return _S3Writer(self, backup_id, data_key, tenant_id, max_bytes, on_close)

    def call_sync(self, op: str, backup_id: str, **kw: Any) -> Any:
        """One S3 call on this bucket, its failure mapped to our errors."""
        try:
            return getattr(self.client, op)(Bucket=self.settings.bucket, **kw)
        except Exception as exc:
            raise _s3_error(exc, op, backup_id) from exc

    async def call(self, op: str, backup_id: str, **kw: Any) -> Any:
        return await asyncio.to_thread(self.call_sync, op, backup_id, **kw)

    async def call_retrying(self, op: str, backup_id: str, **kw: Any) -> Any:
        """An idempotent call (a part, a listing) retried while the store is unreachable, for retry_seconds."""
        deadline = asyncio.get_running_loop().time() + self.settings.retry_seconds
        delay = 0.5
        while True:
            try:
                return await self.call(op, backup_id, **kw)
            except Unavailable:
                if asyncio.get_running_loop().time() + delay > deadline:
                    raise
                log.warning("backup %s: object store %s unavailable, retrying", backup_id, op)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)

    async def _open_raw(self, backup_id: str) -> RawObject:
        resp = await self.call("get_object", backup_id, Key=self.key(backup_id))
        return _S3Object(self, backup_id, resp["Body"], str(resp.get("ETag", "")))

    async def exists(self, backup_id: str) -> bool:
        try:
            await self.call("head_object", backup_id, Key=self.key(backup_id))
            return True
        except NotFound:
            return False

    async def delete(self, backup_id: str) -> None:
        """Removes the object and any upload of it left incomplete (not one in progress here)."""
        key = self.key(backup_id)
        await self.call("delete_object", backup_id, Key=key)
        for upload in await asyncio.to_thread(self._incomplete, key):
            if upload["Key"] == key and upload["UploadId"] not in self.open_uploads:
                await self.call("abort_multipart_upload", backup_id, Key=key, UploadId=upload["UploadId"])

    def _incomplete(self, prefix: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        kw: dict[str, Any] = {"Prefix": prefix}
        while True:
            resp = self.call_sync("list_multipart_uploads", "", **kw)
            out += resp.get("Uploads", [])
            if not resp.get("IsTruncated"):
                return out
            kw.update(KeyMarker=resp.get("NextKeyMarker", ""), UploadIdMarker=resp.get("NextUploadIdMarker", ""))

    def clean_partials(self) -> int:
        """Aborts our prefix's multipart uploads older than stale_upload_seconds (a killed server's; the
        store never shows them as objects, but keeps their parts). Younger ones may be another server's
        upload in progress. An unreachable store is logged, not fatal: the next start cleans."""
        cutoff = datetime.now(UTC) - timedelta(seconds=self.settings.stale_upload_seconds)
        n = 0
        try:
            for upload in self._incomplete(self.settings.prefix):
                if upload["UploadId"] in self.open_uploads or upload["Initiated"] > cutoff:
                    continue
                self.call_sync("abort_multipart_upload", "", Key=upload["Key"], UploadId=upload["UploadId"])
                n += 1
        except RedDwarfError as err:
            log.warning("could not clean the object store's stale uploads: %s", err.message)
        if n:
            log.info("aborted %d stale multipart uploads under s3://%s/%s", n, self.settings.bucket,
                     self.settings.prefix)
        return n


def _s3_error(exc: Exception, op: str, backup_id: str) -> RedDwarfError:
    what = f"object store {op}" + (f" for backup {backup_id}" if backup_id else "")
    if isinstance(exc, RedDwarfError):
        return exc
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        err = response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        detail = f"{what} refused: {code} {err.get('Message', '')}".strip()
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(f"backup {backup_id} has no stored data", field="backup_id")
        if code in ("PreconditionFailed", "412") or status == 412:
            return ObjectPreconditionFailed(detail, field="backup_id")
        if code in ("BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "InvalidRequest"):
            return DataLoss(detail + " (a part was damaged on the way)", field="backup_id")
        if status >= 500 or code in ("SlowDown", "ServiceUnavailable", "InternalError"):
            return Unavailable(detail, field="backup_store")
        return FailedPrecondition(detail, field="backup_store")
    if _is_transport_error(exc):
        return Unavailable(f"{what} failed: the object store is unreachable ({type(exc).__name__})",
                           field="backup_store")
    return Internal(f"{what} failed: {type(exc).__name__}", field="backup_store")


def make_store(st: Settings, keys: DataKeys) -> BackupStore:
    """The store the settings name: the local folder (one server) or the S3 bucket (shared by servers)."""
    if st.backup_store == "local":
        return LocalStore(st.backup_dir, keys)
    access, secret = s3_credentials(st)
    return S3Store(S3Settings(st.s3_endpoint, st.s3_bucket, access, secret, prefix=st.s3_prefix,
                              region=st.s3_region, verify_tls=st.s3_verify_tls, ca_file=st.s3_ca_file,
                              part_bytes=st.s3_part_mb << 20,
                              stale_upload_seconds=st.s3_stale_upload_hours * 3600,
                              retry_seconds=st.s3_retry_seconds), keys)


def s3_credentials(st: Settings) -> tuple[str, str]:
    """(access key id, secret) from s3_credentials_file (a YAML/JSON mapping, readable by its owner only),
    or from the settings' s3_access_key_id / s3_secret_access_key (REDDWARF_S3_* environment or the
    settings file). There is no command-line flag for them: a command line is visible to every user."""
    if not st.s3_credentials_file:
        return st.s3_access_key_id, st.s3_secret_access_key
    path = st.s3_credentials_file
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InvalidArgument(f"s3_credentials_file {path}: cannot read: {exc.strerror}",
                              field="s3_credentials_file") from None
    if mode & 0o077:
        raise InvalidArgument(f"s3_credentials_file {path} may be read by others (mode {mode & 0o777:o}); "
                              "make it 0600", field="s3_credentials_file")
    try:
        data = config.read_file(path, "yaml")
    except config.ConfigError as exc:
        raise InvalidArgument(str(exc), field="s3_credentials_file") from None
    access, secret = data.get("access_key_id"), data.get("secret_access_key")
    if not isinstance(access, str) or not access or not isinstance(secret, str) or not secret:
        raise InvalidArgument(f"s3_credentials_file {path} must hold access_key_id and secret_access_key",
                              field="s3_credentials_file")
    return access, secret

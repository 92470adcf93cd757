"""Where backup bytes live on the server side: a local folder (default) or an S3-compatible bucket.

A stored object appears only through `BackupWriter.commit(expected_sha256)`, and only when the bytes
received hash to what the agent said it sent; a cut-off or corrupted upload is discarded and can never be
offered for restore. Credentials for S3 are the server's alone: the guest never sees them.
"""
from __future__ import annotations

import abc
import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("reddwarf.server.backup_store")

CHUNK_BYTES = 1 << 20
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
SUFFIX = ".xbstream.zst"


class DigestMismatch(FailedPrecondition):
    """The bytes received do not hash to the digest the sender announced; nothing was stored."""


@dataclass(frozen=True)
class StoredObject:
    backup_id: str
    size_bytes: int
    sha256: str
    # Operator-facing location: a path or s3://bucket/key.
    location: str


@dataclass(frozen=True)
class VerifyOutcome:
    ok: bool
    size_bytes: int
    sha256: str


def check_backup_id(backup_id: str) -> str:
    if not isinstance(backup_id, str) or not _ID_RE.match(backup_id):
        raise InvalidArgument("backup id must be 1..64 letters, digits, '-' or '_'", field="backup_id")
    return backup_id


def check_sha256(sha256: str, field: str = "sha256") -> str:
    if not isinstance(sha256, str) or not _SHA_RE.match(sha256):
        raise InvalidArgument("sha256 must be 64 lowercase hex digits", field=field)
    return sha256


class BackupWriter(abc.ABC):
    """One upload in progress. Use as `async with store.open_writer(id) as w:`; leaving the block without
    a successful `commit` discards everything written."""

    def __init__(self, backup_id: str) -> None:
        self.backup_id = backup_id
        self.size_bytes = 0
        self._digest = hashlib.sha256()
        self.committed = False
        self.closed = False

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise FailedPrecondition("the upload is already finished", field="backup_id")
        if data:
            self._digest.update(data)
            self.size_bytes += len(data)
            await self._write(data)

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
        location = await self._publish()
        self.committed = self.closed = True
        return StoredObject(self.backup_id, self.size_bytes, actual, location)

    async def abort(self) -> None:
        if not self.closed:
            self.closed = True
            await self._discard()

    async def __aenter__(self) -> BackupWriter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.abort()

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _publish(self) -> str: ...

    @abc.abstractmethod
    async def _discard(self) -> None: ...


class BackupStore(abc.ABC):
    @abc.abstractmethod
    def open_writer(self, backup_id: str) -> BackupWriter: ...

    @abc.abstractmethod
    def open_reader(self, backup_id: str) -> AsyncIterator[bytes]:
        """Yields the stored bytes in chunks; NotFound if nothing was committed under this id."""

    @abc.abstractmethod
    async def exists(self, backup_id: str) -> bool: ...

    @abc.abstractmethod
    async def delete(self, backup_id: str) -> None:
        """Removes the object; deleting what is not there is not an error (idempotent task steps)."""

    @abc.abstractmethod
    def location(self, backup_id: str) -> str: ...

    async def verify(self, backup_id: str, sha256: str) -> VerifyOutcome:
        """Re-reads and re-hashes what is stored."""
        check_sha256(sha256)
        digest = hashlib.sha256()
        size = 0
        async for chunk in self.open_reader(backup_id):
            digest.update(chunk)
            size += len(chunk)
        actual = digest.hexdigest()
        return VerifyOutcome(actual == sha256, size, actual)


# ---------------------------------------------------------------------------- local folder


class _LocalWriter(BackupWriter):
    def __init__(self, store: LocalStore, backup_id: str) -> None:
        super().__init__(backup_id)
        self.store = store
        os.makedirs(store.partial_dir, exist_ok=True)
        # A random suffix: two uploads of one id (a retry racing a stale one) never share a file.
        self.partial = os.path.join(store.partial_dir, f"{backup_id}.{secrets.token_hex(6)}.partial")
        self._f = open(self.partial, "xb")  # noqa: SIM115 - closed in _publish/_discard

    async def _write(self, data: bytes) -> None:
        await asyncio.to_thread(self._f.write, data)

    async def _publish(self) -> str:
        final = self.store.path(self.backup_id)

        def publish() -> None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self.partial, final)  # atomic: readers see all of it or nothing
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


class LocalStore(BackupStore):
    """Backups as files `<root>/<id>.xbstream.zst`; uploads in progress under `<root>/.partial/`."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.partial_dir = os.path.join(self.root, ".partial")
        os.makedirs(self.partial_dir, exist_ok=True)

    def path(self, backup_id: str) -> str:
        return os.path.join(self.root, check_backup_id(backup_id) + SUFFIX)

    def location(self, backup_id: str) -> str:
        return self.path(backup_id)

    def open_writer(self, backup_id: str) -> BackupWriter:
        check_backup_id(backup_id)
        return _LocalWriter(self, backup_id)

    async def open_reader(self, backup_id: str) -> AsyncIterator[bytes]:
        path = self.path(backup_id)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFound(f"backup {backup_id} has no stored data", field="backup_id") from None
        try:
            while True:
                data = await asyncio.to_thread(f.read, CHUNK_BYTES)
                if not data:
                    break
                yield data
        finally:
            f.close()

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

    def __init__(self, store: S3Store, backup_id: str) -> None:
        super().__init__(backup_id)
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


class S3Store(BackupStore):
    """Objects `<prefix><id>.xbstream.zst` in one bucket. boto3 is optional: imported only when used."""

    def __init__(self, settings: S3Settings, client: Any | None = None) -> None:
        self.settings = settings
        if client is None:
            try:
                import boto3  # noqa: PLC0415 - optional dependency
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

    def open_writer(self, backup_id: str) -> BackupWriter:
        return _S3Writer(self, check_backup_id(backup_id))

    def _is_missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in ("404", "NoSuchKey", "NotFound")

    async def open_reader(self, backup_id: str) -> AsyncIterator[bytes]:
        try:
            resp = await asyncio.to_thread(self.client.get_object, Bucket=self.settings.bucket,
                                           Key=self.key(backup_id))
        except Exception as exc:
            if self._is_missing(exc):
                raise NotFound(f"backup {backup_id} has no stored data", field="backup_id") from None
            raise
        body = resp["Body"]
        try:
            while True:
                data = await asyncio.to_thread(body.read, CHUNK_BYTES)
                if not data:
                    break
                yield data
        finally:
            body.close()

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

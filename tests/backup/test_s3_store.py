"""S3Store against a real SeaweedFS (tests/fixtures/seaweed.py): an object appears only when the whole
multipart upload and its digests checked out; a refused, failed or cut-off upload leaves neither an object
nor an incomplete upload; a SeaweedFS restart mid-upload ends in a fault or a whole object, never half of
one. Settings: the store is chosen and its credentials read without ever showing the secret."""
from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from reddwarf.common.errors import (
    AlreadyExists,
    DataLoss,
    InvalidArgument,
    NotFound,
    RedDwarfError,
    Unavailable,
)
from reddwarf.server.backup_store import (
    S3_MIN_PART,
    SUFFIX,
    DigestMismatch,
    LocalStore,
    S3Settings,
    S3Store,
    make_store,
)
from reddwarf.server.keys import MemoryKeys
from reddwarf.server.settings import Settings
from tests.fixtures.seaweed import SeaweedFS, start_seaweed

MARKER = b"PLAINTEXT-MARKER-5be1"


def payload(n: int) -> bytes:
    block = MARKER + os.urandom(4096)
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path_factory.mktemp("seaweed")) as sw:
        yield sw


def s3_settings(sw: SeaweedFS, **kw: Any) -> S3Settings:
    # A prefix per store: tests never see each other's objects or uploads.
    base = S3Settings(sw.endpoint, sw.bucket, sw.access_key, sw.secret_key, prefix=f"t{uuid.uuid4().hex[:8]}/",
                      part_bytes=S3_MIN_PART)
    return replace(base, **kw)


@pytest.fixture
def store(seaweed: SeaweedFS) -> S3Store:
    return S3Store(s3_settings(seaweed), MemoryKeys())


async def put(store: S3Store, bid: str, data: bytes, step: int = 1 << 20) -> str:
    sha = hashlib.sha256(data).hexdigest()
    async with store.open_writer(bid, "t1") as w:
        for i in range(0, len(data), step):
            await w.write(data[i:i + step])
        await w.commit(sha)
    return sha


async def read_all(store: S3Store, bid: str) -> bytes:
    return b"".join([c async for c in store.open_reader(bid)])


def nothing_left(sw: SeaweedFS, store: S3Store) -> None:
    assert sw.keys(store.settings.prefix) == []
    assert sw.incomplete_uploads(store.settings.prefix) == []


async def test_a_stream_of_several_parts_round_trips_as_ciphertext(seaweed, store):
    data = payload(3 * S3_MIN_PART + 12345)   # four parts with the encryption's overhead
    sha = await put(store, "b1", data)
    key = store.key("b1")
    head = seaweed.client().head_object(Bucket=seaweed.bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-4") and head["ContentLength"] > len(data)
    stored = seaweed.client().get_object(Bucket=seaweed.bucket, Key=key)["Body"].read()
    assert MARKER not in stored   # only ciphertext leaves the server
    assert await read_all(store, "b1") == data
    assert (await store.verify("b1", sha)).ok
    assert seaweed.incomplete_uploads(store.settings.prefix) == []
    assert store.location("b1") == f"s3://{seaweed.bucket}/{store.settings.prefix}b1{SUFFIX}"


async def test_a_digest_mismatch_stores_nothing(seaweed, store):
    data = payload(2 * S3_MIN_PART)
    async with store.open_writer("b1", "t1") as w:
        await w.write(data)
        with pytest.raises(DigestMismatch) as err:
            await w.commit(hashlib.sha256(data + b"x").hexdigest())
    assert err.value.violations[0][0] == "sha256"
    nothing_left(seaweed, store)
    with pytest.raises(NotFound):
        await read_all(store, "b1")


async def test_a_failing_stream_aborts_its_upload(seaweed, store):
    class SenderDied(Exception):
        pass
    with pytest.raises(SenderDied):
        async with store.open_writer("b1", "t1") as w:
            await w.write(payload(3 * S3_MIN_PART))
            await w.flush()   # parts already in the store
            assert seaweed.incomplete_uploads(store.settings.prefix)
            raise SenderDied()
    nothing_left(seaweed, store)
    assert not await store.exists("b1")


async def test_a_part_damaged_on_the_way_is_refused_by_the_store(seaweed, store):
    """The store itself checks each part's Content-MD5 and SHA-256: a flipped byte after we hashed the part
    is refused (BadDigest), the upload is aborted and nothing appears."""
    real = store.client

    class Flipping:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def upload_part(self, **kw: Any) -> Any:
            body = bytearray(kw["Body"])
            body[100] ^= 1
            return real.upload_part(**{**kw, "Body": bytes(body)})

    store.client = Flipping()
    data = payload(2 * S3_MIN_PART)
    with pytest.raises(DataLoss):
        async with store.open_writer("b1", "t1") as w:
            await w.write(data)
            await w.commit(hashlib.sha256(data).hexdigest())
    store.client = real
    nothing_left(seaweed, store)


async def test_a_backup_is_written_once_even_by_two_servers(seaweed, store):
    other = S3Store(store.settings, MemoryKeys())   # a second server on the same bucket
    a, b = payload(S3_MIN_PART + 1), payload(1000)
    async with store.open_writer("b1", "t1") as wa, other.open_writer("b1", "t1") as wb:
        await wa.write(a)
        await wb.write(b)
        await wa.commit(hashlib.sha256(a).hexdigest())
        with pytest.raises(AlreadyExists):
            await wb.commit(hashlib.sha256(b).hexdigest())
    assert await read_all(store, "b1") == a
    assert seaweed.incomplete_uploads(store.settings.prefix) == []


async def test_a_truncated_object_fails_verify(seaweed, store):
    sha = await put(store, "b1", payload(S3_MIN_PART + 7))
    c, key = seaweed.client(), store.key("b1")
    body = c.get_object(Bucket=seaweed.bucket, Key=key)["Body"].read()
    c.put_object(Bucket=seaweed.bucket, Key=key, Body=body[:-1])
    out = await store.verify("b1", sha)
    assert not out.ok and "truncated" in out.detail


async def test_a_read_cut_mid_object_resumes_with_a_ranged_get(seaweed, store):
    """The first GET's connection dies part way; the reader carries on from that byte with a ranged GET of
    the same object (If-Match), and the plaintext comes out whole."""
    from urllib3.exceptions import ProtocolError
    data = payload(2 * S3_MIN_PART + 99)
    await put(store, "b1", data)
    real = store.client
    calls: list[dict[str, Any]] = []

    class Cut:
        def __init__(self, body: Any) -> None:
            self.body, self.left = body, 3 << 20

        def read(self, n: int) -> bytes:
            if self.left <= 0:
                raise ProtocolError("Connection broken: IncompleteRead")
            out = self.body.read(min(n, self.left))
            self.left -= len(out)
            return out

        def close(self) -> None:
            self.body.close()

    class Cutting:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def get_object(self, **kw: Any) -> Any:
            calls.append(kw)
            resp = real.get_object(**kw)
            return {**resp, "Body": Cut(resp["Body"])} if len(calls) == 1 else resp

    store.client = Cutting()
    try:
        assert await read_all(store, "b1") == data
    finally:
        store.client = real
    assert len(calls) == 2 and calls[1]["Range"].startswith("bytes=") and calls[1]["IfMatch"]


async def test_delete_removes_the_object_and_uploads_left_of_it(seaweed, store):
    await put(store, "b1", payload(1000))
    c = seaweed.client()
    c.create_multipart_upload(Bucket=seaweed.bucket, Key=store.key("b1"))   # a crashed retry's leftover
    await store.delete("b1")
    nothing_left(seaweed, store)
    await store.delete("b1")   # idempotent
    with pytest.raises(NotFound):
        await read_all(store, "b1")


async def test_clean_partials_aborts_stale_uploads_but_not_live_ones(seaweed, store):
    c = seaweed.client()
    c.create_multipart_upload(Bucket=seaweed.bucket, Key=store.key("dead"))
    assert store.clean_partials() == 0   # younger than a day: maybe another server's upload in progress
    async with store.open_writer("live", "t1") as w:
        await w.write(payload(S3_MIN_PART))   # its part is on its way: an upload of this process
        await w.flush()
        await w._drain()  # type: ignore[attr-defined]
        eager = S3Store(replace(store.settings, stale_upload_seconds=0), MemoryKeys())
        eager.open_uploads = store.open_uploads   # the same process's view
        assert eager.clean_partials() == 1
        assert [u["Key"] for u in seaweed.incomplete_uploads(store.settings.prefix)] == [store.key("live")]
        await w.commit(w.sha256)
    assert await store.exists("live")


# ---------------------------------------------------------------------------- SeaweedFS restarted


@pytest.fixture
def own_seaweed(tmp_path: Path) -> Iterator[SeaweedFS]:
    with start_seaweed(tmp_path / "sw") as sw:
        yield sw


async def upload_across(sw: SeaweedFS, store: S3Store, bid: str, data: bytes,
                        down_for: float) -> tuple[str, BaseException | None]:
    """Writes `data` while SeaweedFS is killed after the first parts and started again `down_for` seconds
    later (in a thread: the restart blocks)."""
    sha = hashlib.sha256(data).hexdigest()
    step = 1 << 20
    restarted = threading.Event()
    error: BaseException | None = None

    def bounce() -> None:
        sw.kill()
        time.sleep(down_for)
        sw.start()
        restarted.set()
    try:
        async with store.open_writer(bid, "t1") as w:
            for i in range(0, len(data), step):
                if i == 2 * S3_MIN_PART:
                    threading.Thread(target=bounce, daemon=True).start()
                await w.write(data[i:i + step])
            await w.commit(sha)
    except RedDwarfError as exc:
        error = exc
    restarted.wait(120)
    return sha, error


def whole_or_absent(sw: SeaweedFS, store: S3Store, bid: str, data: bytes, sha: str,
                    error: BaseException | None) -> None:
    """The invariant: a failed upload left no object; a completed one is whole. Never half an object."""
    if error is None:
        assert sw.keys(store.settings.prefix) == [store.key(bid)]
    else:
        assert sw.keys(store.settings.prefix) == [], f"failed with {error!r} but an object is visible"


@pytest.mark.parametrize(("down_for", "retry_seconds"), [(0.0, 60.0), (8.0, 2.0)],
                         ids=["restart-within-the-retries", "outage-past-the-retries"])
async def test_seaweed_restarted_mid_upload_never_offers_half_an_object(own_seaweed, down_for, retry_seconds):
    sw = own_seaweed
    store = S3Store(s3_settings(sw, retry_seconds=retry_seconds), MemoryKeys())
    data = payload(6 * S3_MIN_PART)
    sha, error = await upload_across(sw, store, "b1", data, down_for)
    whole_or_absent(sw, store, "b1", data, sha, error)
    if error is None:
        assert await read_all(store, "b1") == data and (await store.verify("b1", sha)).ok
    else:
        assert isinstance(error, (Unavailable, DataLoss)), repr(error)
        with pytest.raises(NotFound):
            await read_all(store, "b1")
        # An abort the outage swallowed is reaped by the next start's clean-up.
        replace_store = S3Store(replace(store.settings, stale_upload_seconds=0), MemoryKeys())
        replace_store.clean_partials()
        assert sw.incomplete_uploads(store.settings.prefix) == []
    # Which way it ends is not luck: retries that outlast the restart complete it; an outage that outlasts
    # them fails it.
    assert (error is None) == (retry_seconds > down_for), repr(error)


# ---------------------------------------------------------------------------- settings


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(state_dir=str(tmp_path / "state"), **kw)


def test_the_backup_store_setting_is_checked(tmp_path):
    with pytest.raises(InvalidArgument) as err:
        settings(tmp_path, backup_store="ftp")
    assert err.value.violations[0][0] == "backup_store"
    s3 = {"backup_store": "s3", "s3_endpoint": "http://127.0.0.1:1", "s3_bucket": "bk-1"}
    for bad, field in [({"s3_endpoint": "127.0.0.1:1"}, "s3_endpoint"), ({"s3_bucket": "B"}, "s3_bucket"),
                       ({}, "s3_credentials_file"),
                       ({"s3_access_key_id": "a"}, "s3_credentials_file"),
                       ({"s3_access_key_id": "a", "s3_secret_access_key": "s", "s3_part_mb": 4}, "s3_part_mb"),
                       ({"s3_access_key_id": "a", "s3_secret_access_key": "s", "s3_ca_file": "/x"}, "s3_ca_file"),
                       ({"s3_access_key_id": "a", "s3_secret_access_key": "s", "s3_prefix": "/abs/"}, "s3_prefix")]:
        with pytest.raises(InvalidArgument) as err:
            settings(tmp_path, **{**s3, **bad})
        assert err.value.violations[0][0] == field, bad


def test_make_store_reads_credentials_from_an_owner_only_file(tmp_path, seaweed):
    assert isinstance(make_store(settings(tmp_path), MemoryKeys()), LocalStore)
    creds = tmp_path / "s3.yaml"
    creds.write_text(f"access_key_id: {seaweed.access_key}\nsecret_access_key: {seaweed.secret_key}\n")
    os.chmod(creds, 0o644)
    st = settings(tmp_path, backup_store="s3", s3_endpoint=seaweed.endpoint, s3_bucket=seaweed.bucket,
                  s3_credentials_file=str(creds), s3_prefix="made/")
    with pytest.raises(InvalidArgument) as err:
        make_store(st, MemoryKeys())
    assert err.value.violations[0][0] == "s3_credentials_file" and seaweed.secret_key not in err.value.message
    os.chmod(creds, 0o600)
    store = make_store(st, MemoryKeys())
    assert isinstance(store, S3Store) and seaweed.secret_key not in repr(store.settings)
    assert store.clean_partials() == 0   # it reaches the bucket with those credentials


def test_the_secret_from_the_environment_is_never_shown(tmp_path):
    st = Settings.load(env={"REDDWARF_STATE_DIR": str(tmp_path), "REDDWARF_BACKUP_STORE": "s3",
                            "REDDWARF_S3_ENDPOINT": "https://s3.example:9000", "REDDWARF_S3_BUCKET": "bk-1",
                            "REDDWARF_S3_ACCESS_KEY_ID": "AK1", "REDDWARF_S3_SECRET_ACCESS_KEY": "very-secret-1"})
    assert st.s3_secret_access_key == "very-secret-1" and "very-secret-1" not in repr(st)
    store = make_store(st, MemoryKeys())
    assert isinstance(store, S3Store) and "very-secret-1" not in repr(store.settings)


def test_parts_in_flight_is_bounded():
    for bad in (0, 17):
        with pytest.raises(InvalidArgument) as err:
            S3Settings("http://127.0.0.1:1", "b", "k", "s", parts_in_flight=bad)
        assert err.value.violations[0][0] == "parts_in_flight"

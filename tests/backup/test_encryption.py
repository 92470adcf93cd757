"""Backups at rest: the chunked AES-GCM object format refuses every alteration (a flipped byte, a truncation,
reordered or dropped chunks, a swapped object, another tenant's key); tenant data keys are stored only
wrapped by the server's KEK; deleting a key makes a tenant's objects unreadable; one upload per backup, and
at most its cap."""
from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat

import pytest
from sqlalchemy import select

from reddwarf.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from reddwarf.server import db, keys, models
from reddwarf.server.backup_store import _FIXED, _TAG, CorruptObject, LocalStore, upload_cap
from reddwarf.server.keys import MemoryKeys, TenantKeys

CHUNK = 1 << 20
MARKER = b"PLAINTEXT-MARKER-7f3a9c"


def payload(n: int) -> bytes:
    """Compressible data with a known marker repeated through it (as a datadir would be)."""
    block = MARKER + os.urandom(64)
    return (block * (n // len(block) + 1))[:n]


async def store_one(store: LocalStore, bid: str, data: bytes, tenant: str = "t1") -> str:
    async with store.open_writer(bid, tenant) as w:
        for i in range(0, len(data), 300_000):
            await w.write(data[i:i + 300_000])
        obj = await w.commit(hashlib.sha256(data).hexdigest())
    return obj.sha256


async def read_all(store: LocalStore, bid: str) -> bytes:
    return b"".join([c async for c in store.open_reader(bid)])


def header_len(path: str) -> int:
    with open(path, "rb") as f:
        head = f.read(_FIXED.size + 1)
        tlen = head[-1]
        f.seek(_FIXED.size + 1 + tlen)
        blen = f.read(1)[0]
    return _FIXED.size + 1 + tlen + 1 + blen


def chunks_of(path: str) -> tuple[bytes, list[bytes]]:
    raw = open(path, "rb").read()
    h = header_len(path)
    body = raw[h:]
    size = CHUNK + _TAG
    return raw[:h], [body[i:i + size] for i in range(0, len(body), size)]


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return LocalStore(str(tmp_path / "store"), MemoryKeys())


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 12345])
async def test_round_trip_at_every_chunk_boundary(store, size):
    data = payload(size)
    sha = await store_one(store, "b1", data)
    assert await read_all(store, "b1") == data
    outcome = await store.verify("b1", sha)
    assert outcome.ok and outcome.size_bytes == size and outcome.sha256 == hashlib.sha256(data).hexdigest()
    # every chunk but the last is whole; the last is shorter (an empty one when the data fills whole chunks)
    _, parts = chunks_of(store.path("b1"))
    assert len(parts) == size // CHUNK + 1 and len(parts[-1]) == size % CHUNK + _TAG


async def test_stored_bytes_hold_no_plaintext_and_are_private(store):
    data = payload(2 * CHUNK + 5)
    await store_one(store, "b1", data)
    raw = open(store.path("b1"), "rb").read()
    assert MARKER not in raw and data[:4096] not in raw
    assert stat.S_IMODE(os.stat(store.path("b1")).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700


@pytest.mark.parametrize("where", ["header", "first chunk", "middle", "last tag"])
async def test_a_flipped_byte_anywhere_is_refused(store, where):
    data = payload(3 * CHUNK + 100)
    sha = await store_one(store, "b1", data)
    path = store.path("b1")
    size = os.path.getsize(path)
    offset = {"header": 12, "first chunk": header_len(path) + 5, "middle": size // 2, "last tag": size - 1}[where]
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(CorruptObject):
        await read_all(store, "b1")
    outcome = await store.verify("b1", sha)
    assert not outcome.ok and sha in outcome.detail and "refused" in outcome.detail


@pytest.mark.parametrize("cut", ["inside the last chunk", "at a chunk boundary", "inside the header", "everything"])
async def test_truncation_is_refused(store, cut):
    data = payload(3 * CHUNK + 100)
    await store_one(store, "b1", data)
    path = store.path("b1")
    head, parts = chunks_of(path)
    keep = {"inside the last chunk": head + b"".join(parts)[:-7],
            "at a chunk boundary": head + b"".join(parts[:-1]),  # the final chunk dropped whole
            "inside the header": head[:20],
            "everything": b""}[cut]
    with open(path, "wb") as f:
        f.write(keep)
    with pytest.raises(CorruptObject) as err:
        await read_all(store, "b1")
    assert "b1" in err.value.message


async def test_reordered_dropped_or_appended_chunks_are_refused(store):
    data = payload(4 * CHUNK + 100)
    await store_one(store, "b1", data)
    path = store.path("b1")
    head, parts = chunks_of(path)
    for label, body in [("swap", [parts[1], parts[0], *parts[2:]]),
                        ("drop", [parts[0], *parts[2:]]),
                        ("repeat", [parts[0], parts[0], *parts[1:]]),
                        ("extend", [*parts, parts[-1]]),
                        ("final early", [parts[0], parts[-1]])]:
        with open(path, "wb") as f:
            f.write(head + b"".join(body))
        with pytest.raises(CorruptObject):
            await read_all(store, "b1")
        assert label  # which arrangement, should one fail


async def test_an_object_moved_to_another_backup_or_read_with_another_tenants_key_is_refused(tmp_path):
    ring = MemoryKeys()
    store = LocalStore(str(tmp_path / "store"), ring)
    await store_one(store, "a", payload(CHUNK + 3), tenant="alice")
    await store_one(store, "b", payload(10), tenant="bob")
    # alice's object copied under bob's backup id: bound to its own id, refused
    shutil.copyfile(store.path("a"), store.path("b"))
    with pytest.raises(CorruptObject) as err:
        await read_all(store, "b")
    assert "made for backup 'a'" in err.value.message
    # the header rewritten to name bob as the tenant: bob's key does not open alice's chunks
    raw = open(store.path("a"), "rb").read()
    h = header_len(store.path("a"))
    forged_header = raw[:_FIXED.size] + bytes([3]) + b"bob" + raw[_FIXED.size + 1 + 5:h]
    with open(store.path("a"), "wb") as f:
        f.write(forged_header + raw[h:])
    with pytest.raises(CorruptObject) as err:
        await read_all(store, "a")
    assert "fails authentication" in err.value.message


async def test_a_destroyed_key_leaves_the_objects_unreadable(store):
    data = payload(100)
    await store_one(store, "b1", data, tenant="gone")
    assert isinstance(store.keys, MemoryKeys)
    store.keys.destroy("gone")
    with pytest.raises(NotFound):
        await read_all(store, "b1")
    # a new key under the same tenant id does not open the old objects either
    store.keys.key_for_write("gone")
    with pytest.raises(CorruptObject):
        await read_all(store, "b1")


async def test_an_upload_over_its_cap_stores_nothing(store):
    w = store.open_writer("big", "t1", max_bytes=CHUNK + 10)
    await w.write(b"x" * CHUNK)
    with pytest.raises(ResourceExhausted) as err:
        await w.write(b"x" * 11)
    assert err.value.violations[0][0] == "data"
    assert w.closed and not await store.exists("big")
    assert os.listdir(store.partial_dir) == []
    # and the slot is free again: a new, smaller upload of that backup goes through
    await store_one(store, "big", b"small")
    assert upload_cap(1, 2.0, 512) == 2 * (1 << 30) + 512 * (1 << 20)


async def test_one_upload_per_backup_at_a_time_and_written_once(store):
    first = store.open_writer("b1", "t1")
    await first.write(b"one")
    with pytest.raises(Aborted) as err:
        store.open_writer("b1", "t1")
    assert "already in progress" in err.value.message
    other = store.open_writer("b2", "t1")  # other backups are not held up
    await other.abort()
    await first.commit(hashlib.sha256(b"one").hexdigest())
    with pytest.raises(AlreadyExists):
        store.open_writer("b1", "t1")
    assert await read_all(store, "b1") == b"one"


async def test_a_racing_publish_never_replaces_a_stored_object(store):
    """Two writers of one id (as two server processes could be): the second commit is refused."""
    a = store.open_writer("b1", "t1")
    store._uploading.discard("b1")  # as if the other upload ran in another process
    b = store.open_writer("b1", "t1")
    await a.write(b"first")
    await b.write(b"second")
    await a.commit(hashlib.sha256(b"first").hexdigest())
    with pytest.raises(AlreadyExists):
        await b.commit(hashlib.sha256(b"second").hexdigest())
    assert await read_all(store, "b1") == b"first"
    assert os.listdir(store.partial_dir) == []


async def test_concurrent_writes_for_many_backups_round_trip(store):
    blobs = {f"b{i}": payload(CHUNK // 2 + i) for i in range(5)}
    await asyncio.gather(*(store_one(store, bid, data) for bid, data in blobs.items()))
    for bid, data in blobs.items():
        assert await read_all(store, bid) == data


# ---------------------------------------------------------------------------- keys and the KEK


def test_wrap_unwrap_binds_the_tenant_and_the_kek():
    kek, other = os.urandom(32), os.urandom(32)
    dk = os.urandom(32)
    w = keys.wrap(kek, "alice", dk)
    assert dk not in w and keys.unwrap(kek, "alice", w) == dk
    with pytest.raises(FailedPrecondition):
        keys.unwrap(other, "alice", w)
    with pytest.raises(FailedPrecondition):
        keys.unwrap(kek, "bob", w)  # a wrapped key copied onto another tenant's row
    flipped = w[:20] + bytes([w[20] ^ 1]) + w[21:]
    with pytest.raises(FailedPrecondition):
        keys.unwrap(kek, "alice", flipped)
    assert keys.wrap(kek, "alice", dk) != w  # a fresh nonce every time


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    engine = db.make_engine(url)
    factory = db.session_factory(engine)
    with factory() as s, s.begin():
        s.add_all([models.Tenant(id="alice"), models.Tenant(id="bob")])
    yield factory
    engine.dispose()


def test_kek_file_is_made_0600_and_a_lax_one_is_refused(tmp_path, sessions):
    path = str(tmp_path / "kek" / "backup-kek.key")
    kek = keys.ensure_kek(path, sessions)
    assert len(kek) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert keys.ensure_kek(path, sessions) == kek  # loaded, not remade
    os.chmod(path, 0o644)
    with pytest.raises(FailedPrecondition) as err:
        keys.ensure_kek(path, sessions)
    assert "0644" in err.value.message


def test_tenant_keys_are_stored_wrapped_and_destroyed_for_good(tmp_path, sessions):
    path = str(tmp_path / "backup-kek.key")
    ring = TenantKeys(sessions, keys.ensure_kek(path, sessions))
    k = ring.key_for_write("alice")
    assert ring.key_for_write("alice") == k == ring.key_for_read("alice")
    assert ring.key_for_write("bob") != k
    with sessions() as s:
        row = s.get(models.TenantKey, "alice")
        assert row is not None and k not in row.wrapped_key and row.kek_id == ring.kek_id
    with pytest.raises(NotFound):
        ring.key_for_read("carol")
    # another KEK is named as such, not taken for corruption
    with pytest.raises(FailedPrecondition) as err:
        TenantKeys(sessions, os.urandom(32)).key_for_read("alice")
    assert ring.kek_id in err.value.message
    # the KEK file lost while keys are wrapped by it: the server refuses to make a new one
    os.unlink(path)
    with pytest.raises(FailedPrecondition) as err:
        keys.ensure_kek(path, sessions)
    assert "missing" in err.value.message and not os.path.exists(path)
    # crypto-shredding
    with sessions() as s, s.begin():
        assert keys.destroy_tenant_key(s, "alice") == 1
        tenant = s.get(models.Tenant, "alice")
        assert tenant is not None
        tenant.deleted_at = models.utcnow()
    with pytest.raises(NotFound):
        ring.key_for_read("alice")
    with pytest.raises(FailedPrecondition):
        ring.key_for_write("alice")  # a deleted tenant never gets a new key
    with sessions() as s:
        assert s.scalars(select(models.TenantKey.tenant_id)).all() == ["bob"]


async def test_store_with_db_keys_round_trips_and_shreds(tmp_path, sessions):
    ring = TenantKeys(sessions, keys.ensure_kek(str(tmp_path / "kek.key"), sessions))
    store = LocalStore(str(tmp_path / "store"), ring)
    data = payload(CHUNK + 1)
    sha = await store_one(store, "b1", data, tenant="alice")
    assert (await store.verify("b1", sha)).ok
    with sessions() as s, s.begin():
        keys.destroy_tenant_key(s, "alice")
    with pytest.raises(NotFound):
        await store.verify("b1", sha)


# S3Store holds the same format: tests/backup/test_s3_store.py, against a real SeaweedFS.

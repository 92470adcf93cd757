"""LocalStore: an object appears only by a commit whose digest matches; anything else leaves nothing."""
from __future__ import annotations

import hashlib
import os

import pytest

from reddwarf.common.errors import InvalidArgument, NotFound
from reddwarf.server.backup_store import CorruptObject, DigestMismatch, LocalStore
from reddwarf.server.keys import MemoryKeys


def stored_files(store: LocalStore) -> list[str]:
    return sorted(os.listdir(store.root)) + sorted(os.listdir(store.partial_dir))


async def test_commit_with_matching_digest_publishes_and_reads_back(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    data = os.urandom(3 * 1024 * 1024 + 17)
    async with store.open_writer("b1", "t1") as w:
        for i in range(0, len(data), 100_000):
            await w.write(data[i:i + 100_000])
        obj = await w.commit(hashlib.sha256(data).hexdigest())
    assert obj.size_bytes == len(data) and obj.location == store.path("b1")
    assert await store.exists("b1")
    assert b"".join([c async for c in store.open_reader("b1")]) == data
    assert (await store.verify("b1", obj.sha256)).ok
    assert os.listdir(store.partial_dir) == []


async def test_commit_with_wrong_digest_discards_everything(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    w = store.open_writer("b2", "t1")
    await w.write(b"some bytes")
    with pytest.raises(DigestMismatch) as err:
        await w.commit(hashlib.sha256(b"other bytes").hexdigest())
    assert err.value.violations[0][0] == "sha256"
    assert not await store.exists("b2")
    assert stored_files(store) == [".partial"]


async def test_upload_cut_off_mid_stream_leaves_nothing(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    with pytest.raises(ConnectionError):
        async with store.open_writer("b3", "t1") as w:
            await w.write(b"x" * 1000)
            raise ConnectionError("stream reset by peer")
    assert not await store.exists("b3")
    assert stored_files(store) == [".partial"]
    with pytest.raises(NotFound):
        [c async for c in store.open_reader("b3")]


async def test_verify_detects_a_flipped_byte_in_the_store(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    data = b"abc" * 1000
    async with store.open_writer("b4", "t1") as w:
        await w.write(data)
        obj = await w.commit(hashlib.sha256(data).hexdigest())
    with open(store.path("b4"), "r+b") as f:
        f.seek(10)
        f.write(b"Z")
    outcome = await store.verify("b4", obj.sha256)
    assert not outcome.ok and outcome.sha256 != obj.sha256
    assert "fails authentication" in outcome.detail and obj.sha256 in outcome.detail
    with pytest.raises(CorruptObject):
        [c async for c in store.open_reader("b4")]


async def test_ids_that_could_escape_the_folder_are_refused(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(InvalidArgument) as err:
            store.open_writer(bad, "t1")
        assert err.value.violations[0][0] == "backup_id"


async def test_delete_is_idempotent(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    async with store.open_writer("b5", "t1") as w:
        await w.write(b"1")
        await w.commit(hashlib.sha256(b"1").hexdigest())
    await store.delete("b5")
    await store.delete("b5")
    assert not await store.exists("b5")


async def test_a_chunk_that_fails_behind_write_stops_the_commit_and_leaves_nothing(tmp_path):
    """write() returns before its chunk is stored (the next one is received meanwhile); a failure there
    (here a real ENOSPC from /dev/full) is raised by the next call, and nothing is published."""
    store = LocalStore(str(tmp_path), MemoryKeys())
    data = os.urandom(2 * 1024 * 1024)
    w = store.open_writer("b9", "t1")
    w._f.close()  # type: ignore[attr-defined]
    w._f = open("/dev/full", "wb", buffering=0)  # type: ignore[attr-defined]
    await w.write(data[:1024 * 1024])
    with pytest.raises(OSError) as err:
        await w.write(data[1024 * 1024:])
        await w.commit(hashlib.sha256(data).hexdigest())
    assert err.value.errno == 28  # ENOSPC
    await w.abort()
    assert not await store.exists("b9")
    assert stored_files(store) == [".partial"]


async def test_flush_makes_the_digest_cover_every_written_chunk(tmp_path):
    store = LocalStore(str(tmp_path), MemoryKeys())
    data = os.urandom(3 * 1024 * 1024)
    async with store.open_writer("b10", "t1") as w:
        for i in range(0, len(data), 1024 * 1024):
            await w.write(data[i:i + 1024 * 1024])
        await w.flush()
        assert w.sha256 == hashlib.sha256(data).hexdigest()
        await w.commit(w.sha256)
    assert b"".join([c async for c in store.open_reader("b10")]) == data

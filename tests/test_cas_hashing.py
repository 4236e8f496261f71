"""The CAS's hashing of streamed blobs on its hashing threads (storage/cas.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import threading
from pathlib import Path

import pytest

from buildfleet.digest import Digest
from buildfleet.errors import DataCorrupted, InvalidArgument
from buildfleet.storage import Cas, DiskStore, MemoryStore
from buildfleet.storage import cas as cas_module
from buildfleet.storage.cas import (
    MAX_HASH_BACKLOG,
    THREAD_HASH_MIN,
    TRUST_MIN_SIZE,
    _hashing,
    _StreamHasher,
)


async def test_stream_hasher_hashes_chunks_in_order() -> None:
    rng = random.Random(5)
    chunks = [os.urandom(rng.choice([1, 100, THREAD_HASH_MIN - 1, THREAD_HASH_MIN,
                                     3 * THREAD_HASH_MIN + 7]))
              for _ in range(6 * MAX_HASH_BACKLOG)]
    hasher = _StreamHasher()
    for chunk in chunks:
        await hasher.update(chunk)
    assert await hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


async def test_stream_hasher_survives_a_cancelled_wait() -> None:
    chunks = [os.urandom(4 * THREAD_HASH_MIN) for _ in range(3 * MAX_HASH_BACKLOG)]
    hasher = _StreamHasher()
    # Keep the hashing threads busy, so that the chunks pile up.
    release = threading.Event()
    blockers = [_hashing.submit(release.wait) for _ in range(_hashing._max_workers)]
    try:
        for chunk in chunks[:MAX_HASH_BACKLOG - 1]:
            await hasher.update(chunk)
        waiting = asyncio.create_task(hasher.update(chunks[MAX_HASH_BACKLOG - 1]))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the backlog is full: it waits for the hashing
        waiting.cancel()  # e.g. the reader went away meanwhile
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        # The next chunk waits again (rather than tripping on the cancelled wait).
        again = asyncio.create_task(hasher.update(chunks[MAX_HASH_BACKLOG]))
        await asyncio.sleep(0.01)
        assert not again.done()
    finally:
        release.set()
    await again
    for future in blockers:
        future.result(timeout=10)
    for chunk in chunks[MAX_HASH_BACKLOG + 1:]:
        await hasher.update(chunk)
    assert await hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()


@pytest.mark.parametrize("damage_at", [0, 1_000_000, 2_999_999])
async def test_large_chunks_of_a_corrupted_blob_are_never_all_served(damage_at: int) -> None:
    store = MemoryStore()
    cas = Cas(store)
    data = os.urandom(3_000_000)
    digest = Digest.of(data)
    bad = bytearray(data)
    bad[damage_at] ^= 1
    await store.put(digest, bytes(bad))
    reader = await cas.open(digest)
    assert reader is not None
    received = bytearray()
    with pytest.raises(DataCorrupted):
        async for chunk in cas.read_verified(digest, reader, chunk_size=256 * 1024):
            received += chunk
    assert len(received) < len(data)
    assert await cas.find_missing([digest]) == [digest]


async def test_streamed_write_with_large_chunks_is_verified() -> None:
    cas = Cas(MemoryStore())
    data = os.urandom(2_000_000)
    digest = Digest.of(data)
    wrong = await cas.begin_write(digest)
    for start in range(0, len(data), 300_000):
        await wrong.write(data[start:start + 300_000][::-1])
    with pytest.raises(InvalidArgument):
        await wrong.commit()
    assert await cas.get(digest) is None
    right = await cas.begin_write(digest)
    for start in range(0, len(data), 300_000):
        await right.write(data[start:start + 300_000])
    await right.commit()
    assert await cas.get(digest) == data


# -- verified, unchanged blobs are not hashed again ---------------------------


class CountingHasher(_StreamHasher):
    """A _StreamHasher that counts the streams hashed."""

    streams = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).streams += 1


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> type[CountingHasher]:
    CountingHasher.streams = 0
    monkeypatch.setattr(cas_module, "_StreamHasher", CountingHasher)
    return CountingHasher


async def started_disk_store(path: Path) -> DiskStore:
    store = DiskStore(path)
    await store.start()
    if not store._versions:
        pytest.skip("this file system may repeat a change time after a write: the disk "
                    "store reports no versions here")
    return store


async def stream(cas: Cas, digest: Digest) -> bytes:
    reader = await cas.open(digest)
    assert reader is not None
    async with reader:
        return b"".join([c async for c in cas.read_verified(digest, reader)])


async def write(cas: Cas, data: bytes) -> Digest:
    digest = Digest.of(data)
    writer = await cas.begin_write(digest)
    await writer.write(data)
    await writer.commit()
    return digest


def flip_byte_in_place(store: DiskStore, digest: Digest, position: int) -> None:
    with open(store.path(digest), "r+b") as file:
        file.seek(position)
        byte = file.read(1)
        file.seek(position)
        file.write(bytes([byte[0] ^ 0xFF]))


async def test_an_unchanged_verified_blob_streams_without_hashing_again(
        tmp_path: Path, counted: type[CountingHasher]) -> None:
    store = await started_disk_store(tmp_path / "cas")
    cas = Cas(store)
    data = os.urandom(3 * TRUST_MIN_SIZE + 5)
    digest = await write(cas, data)  # verified on the way in
    written = counted.streams
    assert await stream(cas, digest) == data
    assert await stream(cas, digest) == data
    assert counted.streams == written


async def test_a_blob_changed_in_place_after_verification_is_caught(
        tmp_path: Path, counted: type[CountingHasher]) -> None:
    store = await started_disk_store(tmp_path / "cas")
    cas = Cas(store)
    data = os.urandom(2 * TRUST_MIN_SIZE)
    digest = await write(cas, data)
    assert await stream(cas, digest) == data  # trusted: not hashed
    flip_byte_in_place(store, digest, TRUST_MIN_SIZE + 3)  # same size, same file
    with pytest.raises(DataCorrupted):
        await stream(cas, digest)
    assert await store.find_missing([digest]) == [digest]  # removed


async def test_a_blob_read_in_full_is_trusted_until_it_changes(
        tmp_path: Path, counted: type[CountingHasher]) -> None:
    store = await started_disk_store(tmp_path / "cas")
    data = os.urandom(TRUST_MIN_SIZE + 1)
    digest = Digest.of(data)
    await store.put(digest, data)  # stored behind the CAS's back: never verified
    cas = Cas(store)
    assert await stream(cas, digest) == data
    assert counted.streams == 1
    assert await stream(cas, digest) == data
    assert counted.streams == 1
    # Replaced by another copy (as another process storing it again would): new file.
    await store.put(digest, data)
    assert await stream(cas, digest) == data
    assert counted.streams == 2


async def test_trust_expires(tmp_path: Path, counted: type[CountingHasher],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = await started_disk_store(tmp_path / "cas")
    cas = Cas(store)
    data = os.urandom(TRUST_MIN_SIZE)
    digest = await write(cas, data)
    before = counted.streams
    monkeypatch.setattr(cas_module, "REVERIFY_AFTER", 0.0)
    assert await stream(cas, digest) == data
    assert counted.streams == before + 1


async def test_small_blobs_and_stores_without_versions_are_always_hashed(
        tmp_path: Path, counted: type[CountingHasher]) -> None:
    disk = Cas(await started_disk_store(tmp_path / "cas"))
    memory = Cas(MemoryStore())
    small = await write(disk, os.urandom(TRUST_MIN_SIZE - 1))
    large = await write(memory, os.urandom(TRUST_MIN_SIZE))
    counted.streams = 0
    await stream(disk, small)
    await stream(memory, large)
    assert counted.streams == 2


async def test_disk_store_versions_follow_the_file(tmp_path: Path) -> None:
    store = await started_disk_store(tmp_path / "cas")
    data = os.urandom(1000)
    digest = Digest.of(data)
    writer = await store.begin_write(digest)
    await writer.write(data)
    await writer.commit()
    reader = await store.open(digest)
    assert reader is not None and reader.version is not None
    assert reader.version == writer.version
    await reader.close()
    flip_byte_in_place(store, digest, 0)
    changed = await store.open(digest)
    assert changed is not None and changed.version not in (None, writer.version)
    await changed.close()

"""The CAS's hashing of streamed blobs on its hashing threads (storage/cas.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import threading

import pytest

from buildfleet.digest import Digest
from buildfleet.errors import DataCorrupted, InvalidArgument
from buildfleet.storage import Cas, MemoryStore
from buildfleet.storage.cas import (
    MAX_HASH_BACKLOG,
    THREAD_HASH_MIN,
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

"""Unit tests of the storage layer: DiskStore, MemoryStore, SizeLimitedStore and Cas."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pgkit import postgres_schema
from s3kit import ACCESS, BUCKET

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import EMPTY_DIGEST, Digest
from buildfleet.errors import InvalidArgument, ResourceExhausted
from buildfleet.storage import BlobStore, Cas, DiskStore, MemoryStore, SizeLimitedStore
from buildfleet.storage.packed import PackedStore
from buildfleet.storage.postgres import PostgresStore
from buildfleet.storage.s3 import S3Store
from buildfleet.storage.split import SizeSplitStore


def blob(n: int, size: int = 100) -> tuple[Digest, bytes]:
    """A distinct blob of `size` bytes, numbered `n`."""
    data = (f"blob-{n}-".encode() * size)[:size]
    return Digest.of(data), data


def temp_files(store: DiskStore) -> list[str]:
    return os.listdir(store.root / "tmp")


async def read_all(store: BlobStore, digest: Digest, **kwargs: int) -> bytes:
    reader = await store.open(digest)
    assert reader is not None
    async with reader:
        return b"".join([piece async for piece in reader.chunks(**kwargs)])


@pytest.fixture(params=["disk", "memory", "postgres", "packed", "split", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    if request.param == "s3":  # (read-cache over s3: the CAS suites, tests/test_cas.py)
        s3 = S3Store(BUCKET, prefix=f"{uuid.uuid4().hex}/",
                     endpoint_url=request.getfixturevalue("s3_server").endpoint, **ACCESS)
        await s3.start()
        try:
            yield s3
        finally:
            await s3.close()
    elif request.param == "disk":
        yield DiskStore(tmp_path / "store")
    elif request.param == "memory":
        yield MemoryStore()
    elif request.param in ("packed", "split"):
        packed = PackedStore(tmp_path / "packed.sqlite3")
        chosen: BlobStore = packed if request.param == "packed" else SizeSplitStore(
            150, packed, DiskStore(tmp_path / "large"))
        try:
            yield chosen
        finally:
            await chosen.close()
    else:
        async with postgres_schema() as url:
            store = PostgresStore(url)
            await store.start()
            try:
                yield store
            finally:
                await store.close()


# -- behaviour every store shares ---------------------------------------------


async def test_put_get_find_missing_delete(store: BlobStore) -> None:
    await store.start()
    (a, a_data), (b, _), (c, c_data) = blob(1), blob(2), blob(3)
    await store.put(a, a_data)
    await store.put(c, c_data)
    assert await store.get(a) == a_data
    assert await store.get(b) is None
    assert await store.find_missing([c, b, a]) == [b]
    assert await store.get_many([a, b, c, a]) == {a: a_data, c: c_data}
    assert await store.delete(a) is True
    assert await store.delete(a) is False
    assert await store.get(a) is None
    assert await store.find_missing([a, c]) == [a]


async def test_open_reads_ranges_and_chunks(store: BlobStore) -> None:
    digest, data = blob(1, size=10_000)
    await store.put(digest, data)
    assert await store.open(blob(2)[0]) is None
    reader = await store.open(digest)
    assert reader is not None
    async with reader:
        assert reader.size == len(data)
        assert await reader.read(100, 50) == data[100:150]
        assert await reader.read(9_990, 100) == data[9_990:]
        pieces = [p async for p in reader.chunks(offset=1_000, limit=3_000, chunk_size=1_024)]
    assert [len(p) for p in pieces] == [1_024, 1_024, 952]
    assert b"".join(pieces) == data[1_000:4_000]
    assert await read_all(store, digest) == data
    assert await read_all(store, digest, offset=9_999) == data[9_999:]


async def test_writer_is_invisible_until_commit(store: BlobStore) -> None:
    digest, data = blob(1, size=5_000)
    writer = await store.begin_write(digest)
    await writer.write(data[:2_000])
    await writer.write(data[2_000:])
    assert await store.get(digest) is None
    assert await store.find_missing([digest]) == [digest]
    await writer.commit()
    assert await store.get(digest) == data
    await writer.abort()  # harmless after commit
    assert await store.get(digest) == data


async def test_aborted_writer_leaves_nothing(store: BlobStore) -> None:
    digest, data = blob(1)
    writer = await store.begin_write(digest)
    await writer.write(data)
    await writer.abort()
    await writer.abort()
    assert await store.get(digest) is None
    with pytest.raises(RuntimeError):
        await writer.write(data)
    if isinstance(store, DiskStore):
        assert temp_files(store) == []


async def test_scan_lists_every_blob(store: BlobStore) -> None:
    blobs = dict(blob(n, size=10 + n) for n in range(20))
    for digest, data in blobs.items():
        await store.put(digest, data)
    found = {b.digest: b.stored_size async for b in store.scan()}
    assert found == {d: len(data) for d, data in blobs.items()}


# -- DiskStore specifics ------------------------------------------------------


async def test_disk_store_persists_across_instances(tmp_path: Path) -> None:
    first = DiskStore(tmp_path / "store")
    digest, data = blob(1)
    await first.put(digest, data)
    second = DiskStore(tmp_path / "store")
    await second.start()
    assert await second.get(digest) == data
    assert [b.digest async for b in second.scan()] == [digest]


async def test_disk_store_commit_renames_temp_file_away(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")
    digest, data = blob(1)
    writer = await store.begin_write(digest)
    await writer.write(data)
    assert len(temp_files(store)) == 1
    await writer.commit()
    assert temp_files(store) == []
    assert store.path(digest).read_bytes() == data


async def test_disk_store_start_removes_only_stale_temp_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")
    stale = store.root / "tmp" / "stale"
    fresh = store.root / "tmp" / "fresh"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    await store.start()
    assert sorted(temp_files(store)) == ["fresh"]


async def test_disk_store_scan_ignores_foreign_files(tmp_path: Path) -> None:
    store = DiskStore(tmp_path / "store")
    digest, data = blob(1)
    await store.put(digest, data)
    (store.path(digest).parent / "README").write_text("not a blob")
    (store.root / "blobs" / "stray-file").write_text("not a shard")
    assert [b.digest async for b in store.scan()] == [digest]


async def test_memory_store_counts_blobs() -> None:
    store = MemoryStore()
    await store.put(*blob(1))
    await store.put(*blob(2))
    await store.put(*blob(1))
    assert len(store) == 2


# -- SizeLimitedStore ---------------------------------------------------------


async def test_size_limited_evicts_least_recently_used() -> None:
    inner = MemoryStore()
    store = SizeLimitedStore(inner, 300)
    await store.start()
    (a, a_data), (b, b_data), (c, c_data) = blob(1), blob(2), blob(3)
    (d, d_data), (e, e_data) = blob(4), blob(5)
    for digest, data in [(a, a_data), (b, b_data), (c, c_data)]:
        await store.put(digest, data)
    assert store.total_bytes == 300
    assert await store.get(a) == a_data  # order now b, c, a
    await store.put(d, d_data)  # evicts b
    assert await inner.find_missing([a, b, c, d]) == [b]
    assert await store.find_missing([c]) == []  # order now a, d, c
    await store.put(e, e_data)  # evicts a
    assert await inner.find_missing([a, b, c, d, e]) == [a, b]
    assert store.total_bytes == 300
    assert store.evicted_blobs == 2


async def test_size_limited_open_counts_as_use() -> None:
    store = SizeLimitedStore(MemoryStore(), 200)
    (a, a_data), (b, b_data), (c, c_data) = blob(1), blob(2), blob(3)
    await store.put(a, a_data)
    await store.put(b, b_data)
    reader = await store.open(a)
    assert reader is not None
    await reader.close()
    await store.put(c, c_data)
    assert await store.find_missing([a, b, c]) == [b]


async def test_size_limited_refuses_blob_larger_than_limit() -> None:
    inner = MemoryStore()
    store = SizeLimitedStore(inner, 1_000)
    small, small_data = blob(1)
    await store.put(small, small_data)
    big, big_data = blob(2, size=1_001)
    with pytest.raises(ResourceExhausted, match="1001 bytes"):
        await store.put(big, big_data)
    with pytest.raises(ResourceExhausted):
        await store.begin_write(big)
    assert await inner.get(small) == small_data  # nothing was evicted for it
    assert store.total_bytes == 100


async def test_size_limited_writer_commit_counts_and_evicts() -> None:
    store = SizeLimitedStore(MemoryStore(), 250)
    (a, a_data), (b, b_data), (c, c_data) = blob(1), blob(2), blob(3)
    await store.put(a, a_data)
    await store.put(b, b_data)
    writer = await store.begin_write(c)
    await writer.write(c_data)
    assert store.total_bytes == 200
    await writer.commit()
    assert store.total_bytes == 200
    assert await store.find_missing([a, b, c]) == [a]


async def test_size_limited_delete_updates_total() -> None:
    store = SizeLimitedStore(MemoryStore(), 1_000)
    digest, data = blob(1)
    await store.put(digest, data)
    assert await store.delete(digest) is True
    assert store.total_bytes == 0


async def test_size_limited_start_rebuilds_index_and_evicts(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path / "store")
    blobs = [blob(n) for n in range(5)]
    now = time.time()
    for age, (digest, data) in zip(range(5, 0, -1), blobs, strict=True):
        await disk.put(digest, data)
        stamp = now - age * 60  # blob 0 is the oldest
        os.utime(disk.path(digest), (stamp, stamp))
    store = SizeLimitedStore(DiskStore(tmp_path / "store"), 300)
    await store.start()
    assert store.total_bytes == 300
    digests = [d for d, _ in blobs]
    assert await disk.find_missing(digests) == digests[:2]
    # The rebuilt order continues to drive eviction: the oldest survivor goes next.
    extra, extra_data = blob(99)
    await store.put(extra, extra_data)
    assert await disk.find_missing(digests) == digests[:3]


def test_size_limited_needs_a_positive_limit() -> None:
    with pytest.raises(ValueError):
        SizeLimitedStore(MemoryStore(), 0)


# -- Cas ----------------------------------------------------------------------


async def test_cas_put_verifies_hash_and_size() -> None:
    cas = Cas(MemoryStore())
    digest, data = blob(1)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await cas.put(digest, data[:-1] + b"!")
    with pytest.raises(InvalidArgument, match="99 bytes"):
        await cas.put(digest, data[:-1])
    with pytest.raises(InvalidArgument):
        await cas.put(Digest(digest.hash, digest.size_bytes + 1), data)
    assert await cas.find_missing([digest]) == [digest]
    await cas.put(digest, data)
    assert await cas.get(digest) == data


async def test_cas_empty_blob_is_always_present() -> None:
    cas = Cas(MemoryStore())
    assert await cas.get(EMPTY_DIGEST) == b""
    assert await cas.find_missing([EMPTY_DIGEST]) == []
    await cas.put(EMPTY_DIGEST, b"")
    reader = await cas.open(EMPTY_DIGEST)
    assert reader is not None and reader.size == 0


async def test_cas_find_missing_dedupes_in_first_seen_order() -> None:
    cas = Cas(MemoryStore())
    (a, a_data), (b, _), (c, _) = blob(1), blob(2), blob(3)
    await cas.put(a, a_data)
    assert await cas.find_missing([c, b, a, c, EMPTY_DIGEST, b]) == [c, b]


async def test_cas_writer_verifies_on_commit() -> None:
    store = MemoryStore()
    cas = Cas(store)
    digest, data = blob(1)
    writer = await cas.begin_write(digest)
    await writer.write(data[:50])
    await writer.write(b"x" * 50)
    with pytest.raises(InvalidArgument, match="hashes to"):
        await writer.commit()
    assert await cas.find_missing([digest]) == [digest]

    short = await cas.begin_write(digest)
    await short.write(data[:60])
    with pytest.raises(InvalidArgument, match="received 60 bytes"):
        await short.commit()

    long = await cas.begin_write(digest)
    await long.write(data)
    with pytest.raises(InvalidArgument, match="more than"):
        await long.write(b"!")
    assert len(store) == 0

    good = await cas.begin_write(digest)
    await good.write(data)
    await good.commit()
    assert await cas.get(digest) == data


async def test_cas_writer_abort_on_disk_leaves_no_temp_file(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path / "store")
    cas = Cas(disk)
    digest, data = blob(1)
    writer = await cas.begin_write(digest)
    await writer.write(data[:10] + b"?" * 90)
    with pytest.raises(InvalidArgument):
        await writer.commit()
    assert temp_files(disk) == []
    assert not disk.path(digest).exists()


async def test_cas_reports_corrupted_blob_missing_and_removes_it(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path / "store")
    cas = Cas(disk)
    digest, data = blob(1)
    await cas.put(digest, data)
    path = disk.path(digest)
    path.write_bytes(b"Z" + data[1:])  # same size, different content
    assert await cas.get(digest) is None
    assert not path.exists()
    assert await cas.find_missing([digest]) == [digest]


async def test_cas_open_drops_blob_of_wrong_size(tmp_path: Path) -> None:
    disk = DiskStore(tmp_path / "store")
    cas = Cas(disk)
    digest, data = blob(1)
    await cas.put(digest, data)
    disk.path(digest).write_bytes(data[:10])  # truncated on disk
    assert await cas.open(digest) is None
    assert await cas.find_missing([digest]) == [digest]


async def test_cas_get_many_skips_absent_and_corrupted() -> None:
    store = MemoryStore()
    cas = Cas(store)
    (a, a_data), (b, b_data), (c, _) = blob(1), blob(2), blob(3)
    await cas.put(a, a_data)
    await store.put(b, b_data[::-1])  # stored behind the CAS's back, wrong content
    assert await cas.get_many([a, b, c, a]) == {a: a_data}
    assert await store.get(b) is None


async def test_cas_get_message() -> None:
    cas = Cas(MemoryStore())
    directory = re_pb2.Directory(files=[re_pb2.FileNode(name="f")])
    data = directory.SerializeToString()
    digest = Digest.of(data)
    await cas.put(digest, data)
    assert await cas.get_message(digest, re_pb2.Directory, "directory") == directory
    assert await cas.get_message(blob(7)[0], re_pb2.Directory, "directory") is None
    junk = b"\xff\xff\xff\xff"
    await cas.put(Digest.of(junk), junk)
    with pytest.raises(InvalidArgument, match="not a valid Directory"):
        await cas.get_message(Digest.of(junk), re_pb2.Directory, "directory")


async def test_cas_blob_size_limit() -> None:
    cas = Cas(MemoryStore(), max_blob_size=50)
    digest, data = blob(1)
    with pytest.raises(ResourceExhausted, match="50 bytes"):
        await cas.put(digest, data)
    with pytest.raises(ResourceExhausted):
        await cas.begin_write(digest)

"""ByteStream over the CAS: reads, writes, resumable and compressed uploads, errors."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
import zstandard
from conftest import RunningServer, StartServer, proto_digest
from s3kit import each_store_grid  # noqa: F401 - the `grid` of this module's tests

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet.digest import EMPTY_DIGEST, Digest
from buildfleet.errors import InvalidArgument, ResourceExhausted
from buildfleet.server.bytestream.resource import ResourceName, parse_read, parse_write
from buildfleet.server.bytestream.service import (
    CHUNK_SIZE,
    ByteStreamService,
    encoded_read_response,
)
from buildfleet.storage.base import BlobStore, BlobWriter
from buildfleet.storage.disk import DiskStore
from buildfleet.storage.read_cache import ReadCachingStore
from buildfleet.storage.s3 import S3Store
from buildfleet.storage.split import SizeSplitStore

MiB = 1024 * 1024
HASH = "a" * 64


def blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, poorly compressible bytes."""
    pattern = bytes((i * 131 + seed * 7 + (i >> 8) * 17) % 251 for i in range(65536))
    return (pattern * (size // len(pattern) + 1))[:size]


def read_name(data: bytes, instance: str = "", compressed: bool = False) -> str:
    digest = Digest.of(data)
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return "/".join(p for p in (instance, kind, digest.hash, str(digest.size_bytes)) if p)


def upload_name(data: bytes, instance: str = "", compressed: bool = False,
                upload_id: str | None = None) -> str:
    digest = Digest.of(data)
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    parts = (instance, "uploads", upload_id or str(uuid.uuid4()), kind, digest.hash,
             str(digest.size_bytes))
    return "/".join(p for p in parts if p)


def requests(name: str, data: bytes, *, start: int = 0, chunk: int = 256 * 1024,
             finish: bool = True, name_every_time: bool = False
             ) -> list[bs_pb2.WriteRequest]:
    """WriteRequests carrying `data` from offset `start`, resource name on the first."""
    out = []
    offset = start
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
    for index, piece in enumerate(pieces):
        out.append(bs_pb2.WriteRequest(
            resource_name=name if index == 0 or name_every_time else "",
            write_offset=offset, data=piece,
            finish_write=finish and index == len(pieces) - 1))
        offset += len(piece)
    return out


async def write(grid: RunningServer, reqs: list[bs_pb2.WriteRequest]) -> int:
    response = await grid.bytestream.Write(iter(reqs))
    return int(response.committed_size)


async def read(grid: RunningServer, name: str, offset: int = 0, limit: int = 0) -> bytes:
    parts = [r.data async for r in grid.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit))]
    return b"".join(parts)


async def error_of(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def read_error(grid: RunningServer, name: str, offset: int = 0,
                     limit: int = 0) -> grpc.aio.AioRpcError:
    return await error_of(read(grid, name, offset, limit))


async def missing(grid: RunningServer, data: bytes, instance: str = "") -> bool:
    response = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, blob_digests=[proto_digest(data)]))
    return len(response.missing_blob_digests) == 1


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def committed_is(grid: RunningServer, name: str, size: int) -> bool:
    """Whether the upload exists and has received `size` bytes."""
    try:
        status = await grid.bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=name))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return False
    return bool(status.committed_size == size)


def service_of(grid: RunningServer) -> ByteStreamService:
    return next(s for s in grid.server.services if isinstance(s, ByteStreamService))


def _layers(grid: RunningServer) -> list[BlobStore]:
    store = grid.server.instances.get("").cas.store
    layers = [store.backend, store.cache] if isinstance(store, ReadCachingStore) else [store]
    return [layer.large if isinstance(layer, SizeSplitStore) else layer for layer in layers]


def disk_layers(grid: RunningServer) -> int:
    """How many disk stores an upload streams into (a read cache's is one more)."""
    return sum(isinstance(layer, DiskStore) for layer in _layers(grid))


async def leftovers(grid: RunningServer) -> int:
    """What unfinished uploads hold in storage: files in the disk store's tmp, and
    S3 multipart uploads not completed or aborted."""
    count = 0
    for layer in _layers(grid):
        if isinstance(layer, DiskStore):
            count += len(os.listdir(layer.root / "tmp"))
        elif isinstance(layer, S3Store):
            count += await layer.unfinished_uploads()
    return count


LARGE = 100_000  # above the default CAS's packed threshold: uploads go to files


@pytest.fixture
async def bytestream_grid(grid: RunningServer) -> AsyncIterator[RunningServer]:
    """The default server; unfinished uploads are aborted at the end of the test."""
    yield grid
    await service_of(grid).close()


# -- resource names --------------------------------------------------------------

D = Digest(HASH, 42)


@pytest.mark.parametrize(("name", "expected"), [
    (f"blobs/{HASH}/42", ResourceName("", D)),
    (f"main/blobs/{HASH}/42", ResourceName("main", D)),
    (f"team/linux/blobs/{HASH}/42", ResourceName("team/linux", D)),
    (f"blobs/sha256/{HASH}/42", ResourceName("", D)),
    (f"compressed-blobs/zstd/{HASH}/42", ResourceName("", D, "zstd")),
    (f"a/b/compressed-blobs/zstd/sha256/{HASH}/42", ResourceName("a/b", D, "zstd")),
    (f"blobs/{HASH}/0", ResourceName("", Digest(HASH, 0))),
])
def test_parse_read_names(name: str, expected: ResourceName) -> None:
    assert parse_read(name) == expected


@pytest.mark.parametrize(("name", "expected"), [
    (f"uploads/u1/blobs/{HASH}/42", ResourceName("", D, None, "u1")),
    (f"x/y/uploads/u1/blobs/{HASH}/42", ResourceName("x/y", D, None, "u1")),
    (f"uploads/u1/blobs/{HASH}/42/some/metadata", ResourceName("", D, None, "u1")),
    (f"uploads/u1/blobs/sha256/{HASH}/42", ResourceName("", D, None, "u1")),
    (f"uploads/u1/compressed-blobs/zstd/{HASH}/42", ResourceName("", D, "zstd", "u1")),
    (f"i/uploads/u1/compressed-blobs/zstd/{HASH}/42/m", ResourceName("i", D, "zstd", "u1")),
])
def test_parse_write_names(name: str, expected: ResourceName) -> None:
    assert parse_write(name) == expected


BAD_READ_NAMES = [
    "",
    "blobs",
    f"blobs/{HASH}",
    f"blobs/{HASH}/",
    f"blobs/{HASH}/-1",
    f"blobs/{HASH}/+5",
    f"blobs/{HASH}/1.5",
    f"blobs/{HASH}/abc",
    f"blobs/{HASH}/99999999999999999999",
    "blobs/xyz/5",
    f"blobs/{HASH.upper()}/5",
    f"blobs/{HASH}/5/extra",
    f"../blobs/{HASH}/5",
    f"a/../blobs/{HASH}/5",
    f"a//blobs/{HASH}/5",
    f"/blobs/{HASH}/5",
    f"blobs/sha1/{HASH}/5",
    f"blobs/md5/{HASH}/5",
    f"compressed-blobs/deflate/{HASH}/5",
    f"compressed-blobs/identity/{HASH}/5",
    f"compressed-blobs/{HASH}/5",
    f"uploads/u/blobs/{HASH}/5",
    f"{HASH}/5",
]


@pytest.mark.parametrize("name", BAD_READ_NAMES)
def test_parse_read_rejects(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_read(name)
    assert "resource name" in info.value.message


BAD_WRITE_NAMES = [
    "",
    f"blobs/{HASH}/5",
    f"uploads/blobs/{HASH}/5",
    f"uploads//blobs/{HASH}/5",
    f"uploads/u/{HASH}/5",
    f"uploads/u/blobs/{HASH}",
    f"uploads/u/blobs/{HASH}/-5",
    "uploads/u/blobs/nothex/5",
    f"uploads/u/blobs/{HASH}/5/../x",
    f"uploads/u/compressed-blobs/brotli/{HASH}/5",
    f"uploads/u/blobs/sha512/{HASH}/5",
    f"a/blobs/uploads/u/blobs/{HASH}/5",
    "uploads",
    "uploads/u",
]


@pytest.mark.parametrize("name", BAD_WRITE_NAMES)
def test_parse_write_rejects(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_write(name)
    assert "resource name" in info.value.message


def test_error_messages_quote_the_name_truncated() -> None:
    long_name = "x" * 5000 + "/blobs/zz/1"
    with pytest.raises(InvalidArgument) as info:
        parse_read(long_name)
    assert "xxxx" in info.value.message
    assert len(info.value.message) < 600
    with pytest.raises(InvalidArgument, match="not supported"):
        parse_read(f"compressed-blobs/gzip/{HASH}/1")
    with pytest.raises(InvalidArgument, match="not supported"):
        parse_read(f"blobs/sha1/{HASH}/1")


# -- reads and writes --------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, 5 * MiB + 123])
async def test_write_then_read_back(grid: RunningServer, size: int) -> None:
    data = blob(size)
    committed = await write(grid, requests(upload_name(data), data))
    assert committed == size
    assert await read(grid, read_name(data)) == data
    assert not await missing(grid, data)
    assert await leftovers(grid) == 0


async def test_large_reads_come_in_chunks_of_at_most_one_mib(grid: RunningServer) -> None:
    data = blob(3 * MiB + 5)
    await write(grid, requests(upload_name(data), data, chunk=MiB))
    sizes = [len(r.data) async for r in grid.bytestream.Read(
        bs_pb2.ReadRequest(resource_name=read_name(data)))]
    assert len(sizes) == 4
    assert max(sizes) <= CHUNK_SIZE
    assert sum(sizes) == len(data)


async def test_empty_blob_is_always_readable(grid: RunningServer) -> None:
    assert await read(grid, f"blobs/{EMPTY_DIGEST.hash}/0") == b""
    compressed = await read(grid, f"compressed-blobs/zstd/{EMPTY_DIGEST.hash}/0")
    assert zstandard.ZstdDecompressor().decompressobj().decompress(compressed) == b""


@pytest.mark.parametrize(("offset", "limit"), [
    (0, 0), (0, 1), (0, 100), (10, 0), (10, 5), (100, 0), (100, 1), (99, 1), (50, 1000),
    (0, 101), (3, 96),
])
async def test_read_offset_and_limit(grid: RunningServer, offset: int, limit: int) -> None:
    data = blob(100)
    await grid.upload(data)
    expected = data[offset:offset + limit] if limit else data[offset:]
    assert await read(grid, read_name(data), offset, limit) == expected


async def test_read_offset_and_limit_across_chunks(grid: RunningServer) -> None:
    data = blob(2 * MiB + 10)
    await write(grid, requests(upload_name(data), data, chunk=MiB))
    offset, limit = MiB - 3, MiB + 7
    assert await read(grid, read_name(data), offset, limit) == data[offset:offset + limit]


@pytest.mark.parametrize("offset", [-1, 101, 10**12])
async def test_read_offset_outside_the_blob(grid: RunningServer, offset: int) -> None:
    data = blob(100)
    await grid.upload(data)
    error = await read_error(grid, read_name(data), offset)
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert str(offset) in (error.details() or "")


async def test_negative_read_limit(grid: RunningServer) -> None:
    data = blob(100)
    await grid.upload(data)
    error = await read_error(grid, read_name(data), 0, -1)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "read_limit" in (error.details() or "")


async def test_read_missing_blob(grid: RunningServer) -> None:
    data = blob(10, seed=3)
    error = await read_error(grid, read_name(data))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert Digest.of(data).hash in (error.details() or "")


@pytest.mark.parametrize("name", [
    "", "blobs", f"blobs/{HASH}/-1", f"blobs/{HASH}/x", "blobs/xyz/5", f"../blobs/{HASH}/1",
    f"compressed-blobs/brotli/{HASH}/5", f"blobs/sha1/{HASH}/5",
])
async def test_read_malformed_names(grid: RunningServer, name: str) -> None:
    error = await read_error(grid, name)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource name" in (error.details() or "")


@pytest.mark.parametrize("name", [
    f"blobs/{HASH}/5", "uploads/u/blobs/xyz/5", f"uploads//blobs/{HASH}/5",
    f"uploads/u/blobs/{HASH}/-5", f"uploads/u/compressed-blobs/deflate/{HASH}/5",
])
async def test_write_malformed_names(grid: RunningServer, name: str) -> None:
    error = await error_of(grid.bytestream.Write(iter([
        bs_pb2.WriteRequest(resource_name=name, data=b"x", finish_write=True)])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "resource name" in (error.details() or "")
    error = await error_of(grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_instance(grid: RunningServer) -> None:
    data = blob(10)
    error = await read_error(grid, read_name(data, instance="nope"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in (error.details() or "")
    error = await error_of(write(grid, requests(upload_name(data, instance="nope"), data)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in (error.details() or "")


async def test_write_without_resource_name(grid: RunningServer) -> None:
    error = await error_of(grid.bytestream.Write(iter([
        bs_pb2.WriteRequest(data=b"x", finish_write=True)])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await error_of(grid.bytestream.Write(iter([])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("corrupt", ["content", "short", "long"])
async def test_write_digest_mismatch_stores_nothing(grid: RunningServer, corrupt: str) -> None:
    data = blob(300 * 1024, seed=5)
    sent = {"content": b"X" + data[1:], "short": data[:-1], "long": data + b"!"}[corrupt]
    error = await error_of(write(grid, requests(upload_name(data), sent)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert Digest.of(data).hash in (error.details() or "")
    assert await missing(grid, data)
    assert await missing(grid, sent)
    assert await leftovers(grid) == 0
    assert service_of(grid).unfinished_uploads == 0


async def test_wrong_write_offset(grid: RunningServer) -> None:
    data = blob(LARGE)
    reqs = requests(upload_name(data), data, chunk=300)
    reqs[2].write_offset += 1
    error = await error_of(write(grid, reqs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "write_offset" in (error.details() or "")
    assert await missing(grid, data)
    # a new upload must start at 0
    error = await error_of(write(grid, requests(upload_name(data), data[10:], start=10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await leftovers(grid) == 0


async def test_later_requests_must_name_the_same_resource(grid: RunningServer) -> None:
    data = blob(1000)
    reqs = requests(upload_name(data), data, chunk=300)
    reqs[1].resource_name = upload_name(data)  # another uuid
    error = await error_of(write(grid, reqs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # repeating the same name on every request is fine
    assert await write(grid, requests(upload_name(data), data, chunk=300,
                                      name_every_time=True)) == len(data)


async def test_resumed_write(bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    data = blob(3 * MiB + 17, seed=9)
    name = upload_name(data)
    half = len(data) // 2
    committed = await write(grid, requests(name, data[:half], chunk=MiB, finish=False))
    assert committed == half
    status = await grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (half, False)
    assert await missing(grid, data)
    committed = await write(grid, requests(name, data[half:], start=half, chunk=MiB))
    assert committed == len(data)
    assert await read(grid, read_name(data)) == data
    status = await grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (len(data), True)
    assert service_of(grid).unfinished_uploads == 0
    assert await leftovers(grid) == 0


async def test_resume_at_a_wrong_offset_and_restart_at_zero(
        bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    data = blob(LARGE, seed=2)
    name = upload_name(data)
    assert await write(grid, requests(name, b"garbage!", finish=False)) == 8
    error = await error_of(write(grid, requests(name, data[5:], start=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "8" in (error.details() or "")
    status = await grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == 8  # the refused resumption left the upload as it was
    # offset 0 restarts the upload, dropping the wrong bytes
    assert await write(grid, requests(name, data)) == len(data)
    assert await read(grid, read_name(data)) == data
    assert await leftovers(grid) == 0


async def test_query_write_status_of_unknown_upload(grid: RunningServer) -> None:
    data = blob(100, seed=4)
    error = await error_of(grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_name(data))))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await grid.upload(data)
    status = await grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=upload_name(data)))
    assert (status.committed_size, status.complete) == (100, True)


async def test_already_present_blob_is_answered_at_once(grid: RunningServer) -> None:
    data = blob(2 * MiB, seed=6)
    await write(grid, requests(upload_name(data), data))
    never = asyncio.Event()
    sent = 0

    async def first_then_stall() -> AsyncIterator[bs_pb2.WriteRequest]:
        nonlocal sent
        sent += 1
        yield bs_pb2.WriteRequest(resource_name=upload_name(data), data=data[:1000])
        await never.wait()

    response = await asyncio.wait_for(grid.bytestream.Write(first_then_stall()), 10)
    assert response.committed_size == len(data)
    assert sent == 1
    # compressed upload of a present blob: -1, as REAPI specifies
    compressed = zstandard.ZstdCompressor().compress(data)
    response = await grid.bytestream.Write(iter(requests(
        upload_name(data, compressed=True), compressed[:100], finish=False)))
    assert response.committed_size == -1
    # the empty blob is always present
    assert await write(grid, requests(upload_name(b""), b"")) == 0


async def test_concurrent_streams_on_one_upload(bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    data = blob(1000, seed=8)
    name = upload_name(data)
    release = asyncio.Event()

    async def stalled() -> AsyncIterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, data=data[:500])
        await release.wait()
        yield bs_pb2.WriteRequest(write_offset=500, data=data[500:], finish_write=True)

    first = grid.bytestream.Write(stalled())

    await wait_until(lambda: committed_is(grid, name, 500))
    error = await error_of(write(grid, requests(name, data)))
    assert error.code() == grpc.StatusCode.ABORTED
    assert "another stream" in (error.details() or "")
    release.set()
    assert (await first).committed_size == len(data)
    assert await read(grid, read_name(data)) == data


async def test_client_cancellation_keeps_the_upload_resumable(
        bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    data = blob(2 * MiB, seed=10)
    name = upload_name(data)
    stall = asyncio.Event()

    async def half_then_stall() -> AsyncIterator[bs_pb2.WriteRequest]:
        yield bs_pb2.WriteRequest(resource_name=name, data=data[:MiB])
        await stall.wait()

    call = grid.bytestream.Write(half_then_stall())

    await wait_until(lambda: committed_is(grid, name, MiB))
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    async def resumed() -> bool:
        try:
            return await write(grid, requests(name, data[MiB:], start=MiB)) == len(data)
        except grpc.aio.AioRpcError as error:  # the server may not have seen the cancel yet
            assert error.code() == grpc.StatusCode.ABORTED
            return False

    await wait_until(resumed)
    assert await read(grid, read_name(data)) == data
    assert await leftovers(grid) == 0


async def test_idle_uploads_are_aborted(bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    service = service_of(grid)
    service.idle_timeout = 0.1
    data = blob(LARGE, seed=11)
    name = upload_name(data)
    assert await write(grid, requests(name, data[:400], finish=False)) == 400
    assert await leftovers(grid) == disk_layers(grid)  # (S3 buffers small parts)

    async def gone() -> bool:
        return service.unfinished_uploads == 0 and await leftovers(grid) == 0

    await wait_until(gone)
    error = await error_of(grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_close_aborts_unfinished_uploads(grid: RunningServer) -> None:
    data = blob(LARGE, seed=12)
    await write(grid, requests(upload_name(data), data[:10], finish=False))
    await write(grid, requests(upload_name(data), data[:20], finish=False))
    assert await leftovers(grid) == 2 * disk_layers(grid)
    await service_of(grid).close()
    assert await leftovers(grid) == 0
    assert service_of(grid).unfinished_uploads == 0


async def test_cancelled_read_closes_the_blob(start_server: StartServer) -> None:
    grid = await start_server()  # the default CAS: a disk store's open file
    data = blob(8 * MiB, seed=13)
    await write(grid, requests(upload_name(data), data, chunk=MiB))
    store = grid.server.instances.get("").cas.store
    assert isinstance(store, SizeSplitStore) and isinstance(store.large, DiskStore)
    path = str(store.large.path(Digest.of(data)))

    async def open_count() -> int:
        count = 0
        for fd in os.listdir("/proc/self/fd"):
            try:
                count += os.readlink(f"/proc/self/fd/{fd}") == path
            except OSError:
                pass
        return count

    call = grid.bytestream.Read(bs_pb2.ReadRequest(resource_name=read_name(data)))
    first = await call.read()
    assert isinstance(first, bs_pb2.ReadResponse) and first.data
    assert await open_count() == 1
    call.cancel()

    async def closed() -> bool:
        return await open_count() == 0

    await wait_until(closed)


async def test_blob_over_the_size_limit(grid: RunningServer) -> None:
    grid.server.instances.get("").cas.max_blob_size = 1000
    data = blob(1001)
    error = await error_of(write(grid, requests(upload_name(data), data)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1000" in (error.details() or "")


async def test_storage_full(grid: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    store = grid.server.instances.get("").cas.store

    class FullWriter(BlobWriter):
        async def write(self, data: bytes) -> None:
            raise ResourceExhausted("writing: the storage device is full")

        async def commit(self) -> None:
            raise AssertionError("not reached")

        async def abort(self) -> None:
            pass

    async def begin_write(digest: Digest) -> BlobWriter:
        return FullWriter()

    monkeypatch.setattr(store, "begin_write", begin_write)
    data = blob(1000)
    error = await error_of(write(grid, requests(upload_name(data), data)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "full" in (error.details() or "")
    assert service_of(grid).unfinished_uploads == 0


# -- compression -----------------------------------------------------------------

async def test_compressed_write_and_read_round_trip(grid: RunningServer) -> None:
    data = blob(3 * MiB, seed=14) + bytes(2 * MiB)
    compressed = zstandard.ZstdCompressor(level=3).compress(data)
    name = upload_name(data, compressed=True)
    committed = await write(grid, requests(name, compressed, chunk=100 * 1024))
    assert committed == len(compressed)
    assert await read(grid, read_name(data)) == data
    received = await read(grid, read_name(data, compressed=True))
    assert len(received) < len(data)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(received) == data
    # read_offset counts uncompressed bytes
    received = await read(grid, read_name(data, compressed=True), offset=MiB + 1)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(received) == data[MiB + 1:]
    received = await read(grid, read_name(data, compressed=True), offset=len(data))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(received) == b""


async def test_plain_upload_read_compressed(grid: RunningServer) -> None:
    data = b"hello " * 1000
    await grid.upload(data)
    received = await read(grid, read_name(data, compressed=True))
    assert zstandard.ZstdDecompressor().decompressobj().decompress(received) == data


async def test_compressed_read_with_limit(grid: RunningServer) -> None:
    data = blob(100)
    await grid.upload(data)
    error = await read_error(grid, read_name(data, compressed=True), 0, 10)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "read_limit" in (error.details() or "")


async def test_resumed_compressed_write(bytestream_grid: RunningServer) -> None:
    grid = bytestream_grid
    data = blob(2 * MiB, seed=15)
    compressed = zstandard.ZstdCompressor(level=1).compress(data)
    name = upload_name(data, compressed=True)
    half = len(compressed) // 2
    assert await write(grid, requests(name, compressed[:half], finish=False)) == half
    status = await grid.bytestream.QueryWriteStatus(
        bs_pb2.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == half
    assert await write(grid, requests(name, compressed[half:], start=half)) \
        == len(compressed)
    assert await read(grid, read_name(data)) == data


@pytest.mark.parametrize("problem", ["not zstd", "other content", "too large", "truncated"])
async def test_bad_compressed_upload(grid: RunningServer, problem: str) -> None:
    data = blob(200 * 1024, seed=16)
    make = zstandard.ZstdCompressor().compress
    payload = {
        "not zstd": b"definitely not a zstd frame" * 100,
        "other content": make(blob(200 * 1024, seed=17)),
        "too large": make(bytes(64 * MiB)),  # a small frame that inflates far past the size
        "truncated": make(data)[:-1000],
    }[problem]
    error = await error_of(write(grid, requests(upload_name(data, compressed=True), payload)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await missing(grid, data)
    assert await leftovers(grid) == 0
    assert service_of(grid).unfinished_uploads == 0


# -- instances and the CAS ---------------------------------------------------------

async def test_instance_name_with_slashes(start_server: StartServer) -> None:
    server: RunningServer = await start_server(
        {"instances": {"": {}, "team/linux": {}}})
    data = blob(1500 * 1024, seed=18)
    assert await write(server, requests(upload_name(data, instance="team/linux"), data)) \
        == len(data)
    assert await read(server, read_name(data, instance="team/linux")) == data
    assert not await missing(server, data, instance="team/linux")
    assert await missing(server, data, instance="")
    error = await read_error(server, read_name(data))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_bytestream_blobs_are_visible_to_the_cas(grid: RunningServer) -> None:
    data = blob(100 * 1024, seed=19)
    await write(grid, requests(upload_name(data), data))
    assert not await missing(grid, data)
    response = await grid.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[proto_digest(data)]))
    assert response.responses[0].status.code == 0
    assert response.responses[0].data == data
    # and blobs uploaded through the CAS are readable through ByteStream
    other = blob(2000, seed=20)
    await grid.upload(other)
    assert await read(grid, read_name(other)) == other


async def test_memory_storage(start_server: StartServer) -> None:
    server: RunningServer = await start_server(
        {"instances": {"": {"cas": {"type": "memory", "max-size": "64MiB"}}}})
    try:
        data = blob(2 * MiB + 3, seed=21)
        name = upload_name(data)
        assert await write(server, requests(name, data[:MiB], finish=False)) == MiB
        assert await write(server, requests(name, data[MiB:], start=MiB)) == len(data)
        assert await read(server, read_name(data), MiB, 10) == data[MiB:MiB + 10]
        compressed = zstandard.ZstdCompressor().compress(data)
        other = blob(1000, seed=22)
        assert await write(server, requests(upload_name(other, compressed=True),
                                            zstandard.ZstdCompressor().compress(other))) > 0
        assert await read(server, read_name(other)) == other
        assert await write(server, requests(upload_name(data, compressed=True),
                                            compressed)) == -1
    finally:
        await service_of(server).close()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, CHUNK_SIZE, CHUNK_SIZE + 3])
def test_read_responses_are_encoded_as_protobuf_would(size: int) -> None:
    data = os.urandom(size)
    encoded = encoded_read_response(data)
    assert encoded == bs_pb2.ReadResponse(data=data).SerializeToString()
    assert bs_pb2.ReadResponse.FromString(encoded).data == data

"""Storage faults under a real `buildfleet serve` process.

- The CAS disk fills up (the CAS lives on an 8 MiB tmpfs): writes fail with
  RESOURCE_EXHAUSTED, no partial blob becomes visible (nor stays behind as a
  temporary file), and existing blobs can still be read.
- A blob file corrupted on disk (bytes flipped, or cut short): every kind of
  read notices -- BatchReadBlobs, ByteStream Read from the start, from an
  offset and compressed, Execute of a corrupted Action -- answers as for a
  missing blob (NOT_FOUND, or FAILED_PRECONDITION naming it for Execute),
  never hands out a complete copy of the bad bytes, removes the file, logs it,
  and FindMissingBlobs lists the blob from then on until it is uploaded again.
  (`Cas.read_verified`, which checks streamed reads, is also tested directly.)
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zstandard
from botkit import Client, rpc_error, status_details
from google.rpc import code_pb2, error_details_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.digest import Digest
from buildfleet.errors import DataCorrupted
from buildfleet.storage import Cas, MemoryStore

from .faultkit import log_has_no_traceback, proto_digest, serving

MiB = 1024 * 1024

pytestmark = pytest.mark.faults


def blob_path(cas_root: Path, digest: re_pb2.Digest) -> Path:
    return cas_root / "blobs" / digest.hash[:2] / f"{digest.hash}-{digest.size_bytes}"


def upload_name(digest: re_pb2.Digest) -> str:
    return f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"


def write_requests(data: bytes, digest: re_pb2.Digest | None = None,
                   chunk: int = MiB) -> Iterator[bs_pb2.WriteRequest]:
    name = upload_name(digest or proto_digest(data))
    for offset in range(0, max(len(data), 1), chunk):
        yield bs_pb2.WriteRequest(resource_name=name if offset == 0 else "",
                                  write_offset=offset, data=data[offset:offset + chunk],
                                  finish_write=offset + chunk >= len(data))


async def find_missing(channel: grpc.aio.Channel, *digests: re_pb2.Digest
                       ) -> list[re_pb2.Digest]:
    response = await re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=list(digests)))
    return list(response.missing_blob_digests)


async def batch_read(channel: grpc.aio.Channel, *digests: re_pb2.Digest
                     ) -> list[re_pb2.BatchReadBlobsResponse.Response]:
    response = await re_grpc.ContentAddressableStorageStub(channel).BatchReadBlobs(
        re_pb2.BatchReadBlobsRequest(digests=list(digests)))
    return list(response.responses)


async def batch_update(channel: grpc.aio.Channel, *blobs: bytes) -> list[int]:
    response = await re_grpc.ContentAddressableStorageStub(channel).BatchUpdateBlobs(
        re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(b), data=b)
            for b in blobs]))
    return [entry.status.code for entry in response.responses]


async def read_stream(channel: grpc.aio.Channel, name: str, offset: int = 0
                      ) -> tuple[bytes, grpc.StatusCode]:
    """What a ByteStream Read delivers before it ends, and how it ends."""
    received = bytearray()
    try:
        async for response in bs_grpc.ByteStreamStub(channel).Read(
                bs_pb2.ReadRequest(resource_name=name, read_offset=offset)):
            received += response.data
    except grpc.aio.AioRpcError as error:
        return bytes(received), error.code()
    return bytes(received), grpc.StatusCode.OK


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs (root and mount(8) needed; skipped otherwise)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs",
                             str(mount_point)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount an 8 MiB tmpfs (root needed): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


async def test_full_disk_refuses_writes_and_keeps_serving_reads(tmp_path: Path,
                                                                small_disk: Path) -> None:
    cas_root = small_disk / "cas"
    config = {"instances": {"": {"cas": {"type": "disk", "path": str(cas_root)}}}}
    async with serving(tmp_path / "server", tmp_path / "data", config) as (server, channel):
        bytestream = bs_grpc.ByteStreamStub(channel)
        stored = [os.urandom(MiB) for _ in range(5)]
        assert await batch_update(channel, *stored[:3]) == [code_pb2.OK] * 3
        for data in stored[3:]:
            response = await bytestream.Write(write_requests(data))
            assert response.committed_size == len(data)

        # About 3 MiB are left: a 4 MiB upload cannot fit.
        too_big = os.urandom(4 * MiB)
        too_big_digest = proto_digest(too_big)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bytestream.Write(write_requests(too_big))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (caught.value.details() or "")
        # Nor through a batch: that blob fails alone, a small one in the same batch is
        # stored.
        big = os.urandom(3 * MiB + MiB // 2)
        tiny = b"still fits"
        assert await batch_update(channel, big, tiny) == [code_pb2.RESOURCE_EXHAUSTED,
                                                          code_pb2.OK]
        # Nothing partial is visible or left behind.
        assert await find_missing(channel, too_big_digest, proto_digest(big)) == [
            too_big_digest, proto_digest(big)]
        assert list((cas_root / "tmp").iterdir()) == []
        assert not blob_path(cas_root, too_big_digest).exists()
        # The upload cannot be resumed half-way: it must start over.
        error = await rpc_error_of(bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=upload_name(too_big_digest))))
        assert error == grpc.StatusCode.NOT_FOUND

        # Everything stored before still reads back, in batches and streamed.
        entries = await batch_read(channel, *(proto_digest(d) for d in stored[:3]))
        assert [(e.status.code, e.data) for e in entries] == [(0, d) for d in stored[:3]]
        for data in stored:
            digest = proto_digest(data)
            received, code = await read_stream(
                channel, f"blobs/{digest.hash}/{digest.size_bytes}")
            assert code == grpc.StatusCode.OK and received == data

        # Once there is room again, the same upload goes through.
        for data in stored:
            blob_path(cas_root, proto_digest(data)).unlink()
        response = await bytestream.Write(write_requests(too_big))
        assert response.committed_size == len(too_big)
        received, code = await read_stream(
            channel, f"blobs/{too_big_digest.hash}/{too_big_digest.size_bytes}")
        assert code == grpc.StatusCode.OK and received == too_big
        assert server.running()
        assert not log_has_no_traceback(server.output())


async def test_full_disk_refuses_packed_writes_and_keeps_serving_reads(
        tmp_path: Path, small_disk: Path) -> None:
    """The same promises from the packed store of small blobs (its SQLite file on the
    full disk): a write that does not fit fails alone and leaves nothing behind."""
    config = {"instances": {"": {"cas": {"type": "packed",
                                          "path": str(small_disk / "cas.sqlite3")}}}}
    async with serving(tmp_path / "server", tmp_path / "data", config) as (server, channel):
        stored = [os.urandom(64 * 1024) for _ in range(8)]
        assert await batch_update(channel, *stored[:4]) == [code_pb2.OK] * 4
        for data in stored[4:]:
            assert await batch_update(channel, data) == [code_pb2.OK]
        filler = small_disk / "filler"  # leaves less than 1 MiB free
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 512 * 1024))

        too_big = os.urandom(MiB)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bs_grpc.ByteStreamStub(channel).Write(write_requests(too_big))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in (caught.value.details() or "")
        codes = await batch_update(channel, os.urandom(MiB - 4096))
        assert codes == [code_pb2.RESOURCE_EXHAUSTED]
        assert await find_missing(channel, proto_digest(too_big)) == [proto_digest(too_big)]

        entries = await batch_read(channel, *(proto_digest(d) for d in stored))
        assert [(e.status.code, e.data) for e in entries] == [(0, d) for d in stored]

        filler.unlink()  # room again: the same upload goes through
        response = await bs_grpc.ByteStreamStub(channel).Write(write_requests(too_big))
        assert response.committed_size == len(too_big)
        digest = proto_digest(too_big)
        received, code = await read_stream(channel, f"blobs/{digest.hash}/{digest.size_bytes}")
        assert code == grpc.StatusCode.OK and received == too_big
        assert server.running()
        assert not log_has_no_traceback(server.output())


async def rpc_error_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


# -- corrupted blobs -----------------------------------------------------------------------


def flip_a_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


SMALL = 64 * 1024  # the default CAS packs blobs up to this size in cas.sqlite3


def flip_a_stored_byte(data_dir: Path, digest: re_pb2.Digest, position: int) -> None:
    """Damage a blob of the default CAS where it is kept: its row or its file."""
    if digest.size_bytes > SMALL:
        flip_a_byte(blob_path(data_dir / "default" / "cas", digest), position)
        return
    with sqlite3.connect(data_dir / "default" / "cas.sqlite3") as db:
        key = (digest.hash, digest.size_bytes)
        (data,) = db.execute("SELECT data FROM blobs WHERE hash = ? AND size = ?",
                             key).fetchone()
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        db.execute("UPDATE blobs SET data = ? WHERE hash = ? AND size = ?",
                   (bytes(damaged), *key))


def is_stored(data_dir: Path, digest: re_pb2.Digest) -> bool:
    if digest.size_bytes > SMALL:
        return blob_path(data_dir / "default" / "cas", digest).exists()
    with sqlite3.connect(data_dir / "default" / "cas.sqlite3") as db:
        return db.execute("SELECT 1 FROM blobs WHERE hash = ? AND size = ?",
                          (digest.hash, digest.size_bytes)).fetchone() is not None


async def test_corrupted_blobs_are_detected_and_treated_as_missing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    cas_root = data_dir / "default" / "cas"
    async with serving(tmp_path / "server", data_dir) as (server, channel):
        small = os.urandom(1000)
        large = [os.urandom(3 * MiB + 17) for _ in range(4)]
        assert await batch_update(channel, small) == [code_pb2.OK]
        for data in large:
            await bs_grpc.ByteStreamStub(channel).Write(write_requests(data))
        small_digest = proto_digest(small)
        digests = [proto_digest(data) for data in large]
        names = [f"blobs/{d.hash}/{d.size_bytes}" for d in digests]
        assert await find_missing(channel, small_digest, *digests) == []

        for digest in (small_digest, *digests[:3]):
            flip_a_stored_byte(data_dir, digest, 1500 if digest.size_bytes > MiB else 10)
        path = blob_path(cas_root, digests[3])
        path.write_bytes(path.read_bytes()[:-1])  # cut short

        # Before any read, the corrupted blobs still count as present.
        assert await find_missing(channel, small_digest, *digests) == []

        # BatchReadBlobs.
        [entry] = await batch_read(channel, small_digest)
        assert entry.status.code == code_pb2.NOT_FOUND and not entry.data
        # A streamed read from the start: the stream ends NOT_FOUND before the last chunk.
        received, code = await read_stream(channel, names[0])
        assert code == grpc.StatusCode.NOT_FOUND
        assert len(received) < len(large[0])
        # A resumed read (from an offset past the damage) notices too.
        received, code = await read_stream(channel, names[1], offset=2 * MiB)
        assert code == grpc.StatusCode.NOT_FOUND and len(received) < len(large[1]) - 2 * MiB
        # A compressed read.
        digest = digests[2]
        received, code = await read_stream(
            channel, f"compressed-blobs/zstd/{digest.hash}/{digest.size_bytes}")
        assert code == grpc.StatusCode.NOT_FOUND
        assert len(zstandard.ZstdDecompressor().decompressobj().decompress(received)) \
            < len(large[2])
        # A blob cut short is refused before anything is sent.
        received, code = await read_stream(channel, names[3])
        assert (received, code) == (b"", grpc.StatusCode.NOT_FOUND)

        # Each is now missing, its file removed, and the server logged each one.
        assert await find_missing(channel, small_digest, *digests) == [small_digest, *digests]
        for digest in (small_digest, *digests):
            assert not is_stored(data_dir, digest)
        logged = [line for line in server.output().splitlines() if "corrupted" in line]
        for digest in (small_digest, *digests):
            assert any(digest.hash in line for line in logged), (digest.hash, logged)
        assert not log_has_no_traceback(server.output())

        # Uploading again heals it.
        await bs_grpc.ByteStreamStub(channel).Write(write_requests(large[0]))
        received, code = await read_stream(channel, names[0])
        assert code == grpc.StatusCode.OK and received == large[0]


async def test_corrupted_action_is_missing_for_execute(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    async with serving(tmp_path / "server", data_dir) as (server, channel):
        client = Client(channel)
        digest = await client.action("true")
        flip_a_stored_byte(data_dir, digest, 3)
        error = await rpc_error(client.execute(digest))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        [violation] = status_details_violations(error)
        assert violation.subject == f"blobs/{digest.hash}/{digest.size_bytes}"
        assert await find_missing(channel, digest) == [digest]
        assert not log_has_no_traceback(server.output())


def status_details_violations(error: grpc.aio.AioRpcError
                              ) -> list[error_details_pb2.PreconditionFailure.Violation]:
    failure = error_details_pb2.PreconditionFailure()
    [detail] = status_details(error).details
    assert detail.Unpack(failure)
    return list(failure.violations)


# -- Cas.read_verified, the streamed check behind ByteStream Read ---------------------------


async def _collect(cas: Cas, digest: Digest, offset: int, limit: int,
                   chunk_size: int) -> tuple[bytes, bool]:
    """(bytes yielded, whether DataCorrupted ended the stream)."""
    reader = await cas.open(digest)
    assert reader is not None
    received = bytearray()
    try:
        async for chunk in cas.read_verified(digest, reader, offset, limit, chunk_size):
            assert 0 < len(chunk) <= chunk_size
            received += chunk
    except DataCorrupted:
        return bytes(received), True
    finally:
        await reader.close()
    return bytes(received), False


@pytest.mark.parametrize("size", [0, 1, 9, 10, 11, 95, 100])
async def test_read_verified_returns_every_range(size: int) -> None:
    cas = Cas(MemoryStore())
    data = os.urandom(size)
    digest = Digest.of(data)
    await cas.put(digest, data)
    for offset in range(0, size + 1, 3):
        for limit in (0, 1, 7, 10, 33, size):
            expected = data[offset:offset + limit] if limit else data[offset:]
            assert await _collect(cas, digest, offset, limit, 10) == (expected, False), \
                (offset, limit)


async def test_read_verified_withholds_the_end_of_a_corrupted_blob() -> None:
    store = MemoryStore()
    cas = Cas(store)
    data = os.urandom(95)
    digest = Digest.of(data)
    for position in (0, 50, 94):  # damage at the start, the middle, the last byte
        bad = bytearray(data)
        bad[position] ^= 1
        for offset, limit in ((0, 0), (40, 0), (90, 5), (94, 1)):
            await store.put(digest, bytes(bad))
            received, corrupted = await _collect(cas, digest, offset, limit, 10)
            assert corrupted, (position, offset, limit)
            assert len(received) < 95 - offset  # never the whole range
            assert await cas.find_missing([digest]) == [digest]  # removed
    # A range that stops short of the end of a multi-chunk blob is served as stored.
    bad = bytearray(data)
    bad[90] ^= 1
    await store.put(digest, bytes(bad))
    assert await _collect(cas, digest, 0, 30, 10) == (bytes(bad[:30]), False)
    # A blob of one chunk is verified whatever the range.
    small = os.urandom(8)
    small_digest = Digest.of(small)
    await store.put(small_digest, small[::-1])
    assert await _collect(cas, small_digest, 2, 3, 10) == (b"", True)

"""The `remote` storage (a CAS on another server) and the `read-cache` wrapper.

Unit tests of ReadCachingStore run on memory stores; the rest runs two real
servers: `remote`, a CAS-only buildfleet, and `front`, whose CAS is a read-cache
(a disk cache) over a `remote` storage pointing at it.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from botkit import wait_for
from conftest import RunningServer, StartServer, proto_digest

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet.client.cas import CasClient, CasError
from buildfleet.config import ConfigError, parse_config
from buildfleet.digest import Digest
from buildfleet.errors import DataCorrupted, FailedPrecondition, Unavailable
from buildfleet.storage import Cas, MemoryStore, SizeLimitedStore
from buildfleet.storage.base import BlobReader
from buildfleet.storage.read_cache import ReadCachingStore
from buildfleet.storage.remote import RemoteStore

MiB = 1024 * 1024


def blob(n: int, size: int = 100) -> tuple[Digest, bytes]:
    data = (f"blob-{n}-".encode() * (size // 6 + 1))[:size]
    return Digest.of(data), data


def large_blob(size: int = 5 * MiB) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data), data


def flipped(data: bytes) -> bytes:
    """The same length, one byte different."""
    return bytes([data[0] ^ 0xFF]) + data[1:]


async def read_all(reader: BlobReader) -> bytes:
    async with reader:
        return b"".join([piece async for piece in reader.chunks()])


class CountingStore(MemoryStore):
    """A memory store that counts how often blobs are opened."""

    def __init__(self) -> None:
        super().__init__()
        self.opens = 0

    async def open(self, digest: Digest) -> BlobReader | None:
        self.opens += 1
        await asyncio.sleep(0)  # let concurrent readers pile up
        return await super().open(digest)


# -- ReadCachingStore on memory stores ---------------------------------------------


async def test_reads_fill_the_cache() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    digest, data = blob(1)
    await backend.put(digest, data)
    assert await store.get(digest) == data
    assert await cache.get(digest) == data
    await backend.delete(digest)
    assert await store.get(digest) == data  # from the cache now
    assert (store.hits, store.misses) == (1, 1)
    assert await store.get(blob(2)[0]) is None


async def test_get_many_mixes_cache_and_backend() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    (d1, b1), (d2, b2), (d3, _) = blob(1), blob(2), blob(3)
    await backend.put(d1, b1)
    await backend.put(d2, b2)
    await cache.put(d1, b1)
    assert await store.get_many([d1, d2, d3, d1]) == {d1: b1, d2: b2}
    assert await cache.get(d2) == b2


async def test_corrupted_cached_copy_is_dropped_and_read_from_the_backend() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    (d1, b1), (d2, b2) = blob(1), blob(2)
    for digest, data in ((d1, b1), (d2, b2)):
        await backend.put(digest, data)
        await cache.put(digest, flipped(data))
    assert await store.get(d1) == b1
    assert await store.get_many([d2]) == {d2: b2}
    # Both cached copies were replaced by good ones.
    assert await cache.get(d1) == b1
    assert await cache.get(d2) == b2
    assert store.dropped == 2


async def test_cached_copy_of_the_wrong_size_is_dropped_on_open() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    digest, data = blob(1, 3000)
    await backend.put(digest, data)
    await cache.put(digest, data[:10])
    reader = await store.open(digest)
    assert reader is not None
    assert await read_all(reader) == data
    assert await cache.get(digest) == data


async def test_streamed_corrupted_copy_is_dropped_and_the_backend_copy_kept() -> None:
    """A corrupted cached copy found while streaming (by the CAS layer) is dropped
    from the cache only; the next read comes from the backend's good copy."""
    backend, cache = MemoryStore(), MemoryStore()
    cas = Cas(ReadCachingStore(backend, cache))
    digest, data = blob(1, 3 * MiB)
    await backend.put(digest, data)
    await cache.put(digest, flipped(data))
    reader = await cas.open(digest)
    assert reader is not None
    with pytest.raises(DataCorrupted):
        async for _ in cas.read_verified(digest, reader):
            pass
    await reader.close()
    assert await cache.get(digest) is None
    assert await backend.get(digest) == data
    assert await cas.get(digest) == data


async def test_corrupted_backend_copy_is_not_cached() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    cas = Cas(ReadCachingStore(backend, cache))
    digest, data = blob(1, 3 * MiB)
    await backend.put(digest, flipped(data))
    assert await cas.get(digest) is None  # the CAS layer removes it: upload it again
    assert await backend.get(digest) is None
    assert await cache.get(digest) is None
    await backend.put(digest, flipped(data))
    reader = await cas.open(digest)  # streamed: served from the backend, not cached
    assert reader is not None
    await reader.close()
    assert await cache.get(digest) is None


async def test_concurrent_reads_of_an_uncached_blob_copy_it_once() -> None:
    backend, cache = CountingStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    digest, data = blob(1, 2 * MiB)
    await backend.put(digest, data)
    readers = await asyncio.gather(*(store.open(digest) for _ in range(8)))
    assert backend.opens == 1
    for reader in readers:
        assert reader is not None
        assert await read_all(reader) == data


async def test_find_missing_asks_the_backend() -> None:
    """A blob that lingers in the cache after the backend lost it is missing: the
    backend is what other replicas see, so the client must upload it again."""
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    (d1, b1), (d2, b2) = blob(1), blob(2)
    await backend.put(d1, b1)
    await cache.put(d2, b2)
    assert await store.find_missing([d1, d2]) == [d2]


async def test_writes_go_to_backend_and_cache() -> None:
    backend, cache = MemoryStore(), MemoryStore()
    store = ReadCachingStore(backend, cache)
    (d1, b1), (d2, b2) = blob(1), blob(2, 3000)
    await store.put(d1, b1)
    writer = await store.begin_write(d2)
    await writer.write(b2[:1000])
    await writer.write(b2[1000:])
    await writer.commit()
    for digest, data in ((d1, b1), (d2, b2)):
        assert await backend.get(digest) == data
        assert await cache.get(digest) == data


async def test_a_cache_that_refuses_does_not_fail_reads_or_writes() -> None:
    backend, cache = MemoryStore(), SizeLimitedStore(MemoryStore(), 1000)
    store = ReadCachingStore(backend, cache)
    (d1, b1), (d2, b2) = blob(1, 5000), blob(2, 5000)
    await backend.put(d1, b1)
    assert await store.get(d1) == b1
    reader = await store.open(d1)
    assert reader is not None
    assert await read_all(reader) == b1
    writer = await store.begin_write(d2)
    await writer.write(b2)
    await writer.commit()
    assert await backend.get(d2) == b2
    assert cache.total_bytes == 0


# -- configuration -------------------------------------------------------------------


def test_config_accepts_remote_behind_a_read_cache() -> None:
    config = parse_config({
        "storage": {"shared": {"type": "remote", "address": "cas.example:50051",
                               "instance": "main", "timeout": 30}},
        "instances": {"": {"cas": {"type": "read-cache", "backend": "shared",
                                   "cache": {"type": "disk", "path": "cache",
                                             "max-size": "1GiB"}}}},
    })
    spec = config.storage["shared"]
    assert spec.type == "remote" and spec.address == "cas.example:50051"


@pytest.mark.parametrize(("document", "message"), [
    ({"instances": {"": {"cas": {"type": "remote", "address": "nowhere"}}}},
     "instances.\"\".cas.address: address 'nowhere' is not HOST:PORT"),
    ({"instances": {"": {"cas": {"type": "remote", "address": "a:1", "tls-cert": "c.pem"}}}},
     "instances.\"\".cas.tls-cert: unknown key"),
    ({"instances": {"": {"cas": {"type": "read-cache", "cache": {"type": "memory"},
                                 "backend": {"type": "remote", "address": "a:1",
                                             "adress": "b:2"}}}}},
     "instances.\"\".cas.backend.adress: unknown key"),
    ({"instances": {"": {"action-cache": {"type": "remote", "address": "a:1"}}}},
     "remote storage holds CAS blobs only"),
    ({"storage": {"r": {"type": "remote", "address": "a:1"}},
      "instances": {"": {"cas": {"type": "size-limited", "max-size": "1GiB",
                                 "backend": "r"}}}},
     "size-limited cannot bound remote storage"),
    ({"storage": {"r": {"type": "remote", "address": "a:1"}},
      "instances": {"": {"cas": {"type": "read-cache", "backend": {"type": "memory"},
                                 "cache": "r"}}}},
     "the cache of a read-cache must be local storage"),
    ({"storage": {"a": {"type": "read-cache", "backend": "b", "cache": {"type": "memory"}},
                  "b": {"type": "size-limited", "max-size": "1GiB", "backend": "a"}}},
     "refers to itself"),
])
def test_config_rejects_bad_remote_storage(document: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(document)


# -- two servers: a CAS-only remote, a front with a read cache over it ------------------


CAS_ONLY = {"scheduler": {"enabled": False}}


@dataclass
class Pair:
    remote: RunningServer
    front: RunningServer
    port: int

    def front_client(self) -> CasClient:
        return CasClient(self.front.channel)

    def remote_client(self) -> CasClient:
        return CasClient(self.remote.channel)


async def start_remote(start_server: StartServer, data_dir: Path, port: int = 0
                       ) -> RunningServer:
    return await start_server({"listen": [f"127.0.0.1:{port}"],
                               "instances": {"": CAS_ONLY}}, data_dir=data_dir)


@pytest.fixture
async def pair(start_server: StartServer, tmp_path: Path) -> Pair:
    remote = await start_remote(start_server, tmp_path / "remote")
    front = await start_server({
        "storage": {"shared": {"type": "remote", "address": remote.address, "timeout": 20}},
        "instances": {"": {**CAS_ONLY, "cas": {
            "type": "read-cache", "backend": "shared",
            "cache": {"type": "disk", "path": "cas-cache", "max-size": "256MiB"}}}},
    }, data_dir=tmp_path / "front")
    return Pair(remote, front, int(remote.address.rsplit(":", 1)[1]))


async def bytestream_read(server: RunningServer, digest: Digest, offset: int = 0) -> bytes:
    call = server.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"blobs/{digest.hash}/{digest.size_bytes}", read_offset=offset))
    return b"".join([response.data async for response in call])


async def batch_read(server: RunningServer, digest: Digest) -> bytes:
    response = await server.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=[re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)]))
    assert response.responses[0].status.code == 0, response
    return response.responses[0].data


async def test_uploads_through_the_front_land_in_the_remote(pair: Pair) -> None:
    small_digest, small = blob(1)
    large_digest, large = large_blob()
    await pair.front.upload(small)  # BatchUpdateBlobs
    await pair.front_client().upload({large_digest: large})  # ByteStream.Write
    remote = pair.remote_client()
    assert await remote.find_missing([small_digest, large_digest]) == set()
    assert await remote.read_blobs([small_digest, large_digest]) == {
        small_digest: small, large_digest: large}


async def test_blobs_of_the_remote_are_read_through_the_front(pair: Pair) -> None:
    small_digest, small = blob(1)
    large_digest, large = large_blob()
    absent_digest, _ = blob(2)
    await pair.remote_client().upload({small_digest: small, large_digest: large})
    front = pair.front_client()
    assert await front.find_missing([small_digest, large_digest, absent_digest]) == {
        absent_digest}
    assert await batch_read(pair.front, small_digest) == small
    assert await bytestream_read(pair.front, large_digest) == large
    assert await bytestream_read(pair.front, large_digest, offset=3 * MiB + 5) == \
        large[3 * MiB + 5:]
    assert await front.read_blobs([small_digest, large_digest]) == {
        small_digest: small, large_digest: large}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await bytestream_read(pair.front, absent_digest)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cached_blobs_are_served_while_the_remote_is_down(pair: Pair) -> None:
    small_digest, small = blob(1)
    large_digest, large = large_blob()
    uncached_digest, uncached = blob(2)
    await pair.remote_client().upload({small_digest: small, large_digest: large,
                                       uncached_digest: uncached})
    assert await batch_read(pair.front, small_digest) == small
    assert await bytestream_read(pair.front, large_digest) == large
    await pair.remote.server.stop(0)

    assert await batch_read(pair.front, small_digest) == small
    assert await bytestream_read(pair.front, large_digest) == large


async def unavailable_error(call: Awaitable[object]) -> str:
    """The message of the UNAVAILABLE that `call` fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value.details() or ""


async def test_a_remote_that_is_down_is_unavailable_then_recovers(
        pair: Pair, start_server: StartServer) -> None:
    stored_digest, stored = blob(1)
    large_digest, large = large_blob()
    await pair.remote_client().upload({stored_digest: stored, large_digest: large})
    await pair.remote.server.stop(0)
    new_digest, new = blob(2)
    named = f"remote CAS 127.0.0.1:{pair.port} is unavailable"

    assert named in await unavailable_error(batch_read(pair.front, stored_digest))
    assert named in await unavailable_error(bytestream_read(pair.front, large_digest))
    assert named in await unavailable_error(pair.front.cas.FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[proto_digest(new)])))
    response = await pair.front.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto_digest(new), data=new)]))
    status = response.responses[0].status  # a batch reports each blob's failure
    assert status.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert named in status.message
    # ByteStream.Write in one request: with several, the grpc-python client may see
    # its own "Internal error from Core" instead of the server's answer when that
    # answer arrives while it is still sending.
    upload = f"uploads/{uuid.uuid4()}/blobs/{new_digest.hash}/{new_digest.size_bytes}"
    assert named in await unavailable_error(pair.front.bytestream.Write(iter([
        bs_pb2.WriteRequest(resource_name=upload, data=new, finish_write=True)])))

    await start_remote(start_server, pair.remote.data_dir, pair.port)

    async def find_missing_works() -> bool:
        try:
            await pair.front_client().find_missing([new_digest])
        except CasError:
            return False
        return True

    await wait_for(find_missing_works, timeout=30, what="the front reaching the remote again")
    assert await batch_read(pair.front, stored_digest) == stored
    assert await bytestream_read(pair.front, large_digest) == large
    await pair.front.upload(new)
    assert await pair.remote_client().read_blob(new_digest) == new


# -- RemoteStore against a real server -------------------------------------------------


@pytest.fixture
async def remote_store(start_server: StartServer, tmp_path: Path
                       ) -> AsyncIterator[RemoteStore]:
    remote = await start_remote(start_server, tmp_path / "remote")
    store = RemoteStore(remote.address)
    await store.start()
    yield store
    await store.close()


async def test_remote_store_reads_at_any_offset(remote_store: RemoteStore) -> None:
    digest, data = large_blob(3 * MiB)
    await remote_store.put(digest, data)
    reader = await remote_store.open(digest)
    assert reader is not None
    async with reader:
        assert await reader.read(0, 10) == data[:10]
        assert await reader.read(10, MiB) == data[10:10 + MiB]  # sequential
        assert await reader.read(2 * MiB, 100) == data[2 * MiB:2 * MiB + 100]  # forward
        assert await reader.read(5, 5) == data[5:10]  # backward
        assert await reader.read(3 * MiB - 3, 100) == data[-3:]  # past the end
    assert await remote_store.open(blob(9)[0]) is None


async def test_remote_store_get_many_leaves_out_absent_blobs(remote_store: RemoteStore) -> None:
    (d1, b1), (d2, _), (d3, b3) = blob(1), blob(2), large_blob(5 * MiB)
    await remote_store.put_many([(d1, b1), (d3, b3)])
    assert await remote_store.get_many([d1, d2, d3]) == {d1: b1, d3: b3}
    assert await remote_store.find_missing([d2, d1, d3]) == [d2]


async def test_remote_store_streams_writes_and_accepts_known_blobs(
        remote_store: RemoteStore) -> None:
    digest, data = large_blob(3 * MiB + 17)
    for _ in range(2):  # the second time the remote holds it and ends the call early
        writer = await remote_store.begin_write(digest)
        for start in range(0, len(data), 64 * 1024):
            await writer.write(data[start:start + 64 * 1024])
        await writer.commit()
        assert await remote_store.get(digest) == data


async def test_remote_store_cannot_delete(remote_store: RemoteStore) -> None:
    digest, data = blob(1)
    await remote_store.put(digest, data)
    assert await remote_store.delete(digest) is False
    assert await remote_store.get(digest) == data


async def test_remote_store_names_a_wrong_instance(remote_store: RemoteStore) -> None:
    wrong = RemoteStore(remote_store.address, instance="no-such-instance")
    try:
        with pytest.raises(FailedPrecondition, match="no-such-instance"):
            await wrong.find_missing([blob(1)[0]])
    finally:
        await wrong.close()


async def test_remote_store_of_an_unreachable_address_is_unavailable() -> None:
    store = RemoteStore("127.0.0.1:1", timeout=10)
    await store.start()
    try:
        with pytest.raises(Unavailable, match="remote CAS 127.0.0.1:1 is unavailable"):
            await store.find_missing([blob(1)[0]])
        with pytest.raises(Unavailable, match="remote CAS 127.0.0.1:1 is unavailable"):
            await store.open(blob(1)[0])
        digest, data = large_blob(2 * MiB)
        writer = await store.begin_write(digest)
        with pytest.raises(Unavailable, match="remote CAS 127.0.0.1:1 is unavailable"):
            await writer.write(data)
            await writer.commit()
        await writer.abort()
    finally:
        await store.close()
    with pytest.raises(Unavailable, match="closed"):
        await store.get(blob(1)[0])

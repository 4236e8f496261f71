"""The `s3` storage against a real S3-compatible server (SeaweedFS on loopback,
tests/s3kit.py): what only S3 can do to a CAS -- objects corrupted or deleted
behind the server's back, large blobs in multipart uploads read back by ranges --
and what a misconfigured bucket or endpoint says at start-up.  The CAS and
ByteStream suites run on `s3` and on `read-cache` over `s3` too (their `grid`)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiobotocore.session import get_session
from conftest import RunningServer, StartServer, proto_digest
from s3kit import ACCESS, BUCKET, SeaweedFS, s3_config

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet.config import ConfigError, parse_config
from buildfleet.digest import Digest
from buildfleet.errors import Unavailable
from buildfleet.storage.s3 import PART_SIZE, S3Store

MiB = 1024 * 1024


def object_key(server: RunningServer, digest: re_pb2.Digest) -> str:
    store = server.server.instances.get("").cas.store
    assert isinstance(store, S3Store)
    return store.key(Digest(digest.hash, digest.size_bytes))


async def s3_call(s3_server: SeaweedFS, operation: str, **kwargs: Any) -> Any:
    """An S3 call of our own, behind the grid's back."""
    async with get_session().create_client(
            "s3", endpoint_url=s3_server.endpoint, region_name=ACCESS["region"],
            aws_access_key_id=ACCESS["access_key_id"],
            aws_secret_access_key=ACCESS["secret_access_key"]) as client:
        return await getattr(client, operation)(Bucket=BUCKET, **kwargs)


@pytest.fixture
async def grid(start_server: StartServer, s3_server: SeaweedFS, tmp_path: Path
               ) -> RunningServer:
    return await start_server(s3_config(s3_server, tmp_path / "s3"))


async def read_blobs(server: RunningServer, digest: re_pb2.Digest) -> int:
    response = await server.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[digest]))
    return response.responses[0].status.code


async def test_an_object_corrupted_in_the_bucket_is_found_out_and_removed(
        grid: RunningServer, s3_server: SeaweedFS) -> None:
    digest = await grid.upload(b"the bytes that were uploaded")
    key = object_key(grid, digest)
    await s3_call(s3_server, "put_object", Key=key, Body=b"the bytes that were uploaded!")
    assert await read_blobs(grid, digest) == grpc.StatusCode.NOT_FOUND.value[0]
    # the corrupted object is gone, and the blob is reported missing
    with pytest.raises(Exception, match="Not Found|NoSuchKey|404"):
        await s3_call(s3_server, "head_object", Key=key)
    missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[digest]))
    assert list(missing.missing_blob_digests) == [digest]


async def test_an_object_deleted_behind_the_servers_back_is_a_missing_blob(
        grid: RunningServer, s3_server: SeaweedFS) -> None:
    digest = await grid.upload(b"soon gone")
    await s3_call(s3_server, "delete_object", Key=object_key(grid, digest))
    missing = await grid.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[digest]))
    assert list(missing.missing_blob_digests) == [digest]
    assert await read_blobs(grid, digest) == grpc.StatusCode.NOT_FOUND.value[0]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in grid.bytestream.Read(bs_pb2.ReadRequest(
                resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")):
            pass
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_large_blob_goes_up_in_parts_and_comes_back_by_ranges(
        grid: RunningServer, s3_server: SeaweedFS) -> None:
    data = hashlib.sha256(b"seed").digest() * (3 * PART_SIZE // 32 + 1000)  # > 3 parts
    digest = proto_digest(data)
    name = f"uploads/8f0d2d5c-2d4e-4a7e-9c3e-1b2a3c4d5e6f/blobs/{digest.hash}/{len(data)}"
    chunk = MiB

    def requests() -> Any:
        for offset in range(0, len(data), chunk):
            yield bs_pb2.WriteRequest(resource_name=name if offset == 0 else "",
                                      write_offset=offset, data=data[offset:offset + chunk],
                                      finish_write=offset + chunk >= len(data))

    response = await grid.bytestream.Write(requests())
    assert response.committed_size == len(data)
    head = await s3_call(s3_server, "head_object", Key=object_key(grid, digest))
    assert head["ContentLength"] == len(data)
    assert "-" in head["ETag"]  # a multipart object's ETag names its parts
    offset, limit = PART_SIZE - 100, 300  # across the boundary of two parts
    read = b"".join([piece.data async for piece in grid.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"blobs/{digest.hash}/{len(data)}", read_offset=offset,
        read_limit=limit))])
    assert read == data[offset:offset + limit]
    whole = b"".join([piece.data async for piece in grid.bytestream.Read(bs_pb2.ReadRequest(
        resource_name=f"blobs/{digest.hash}/{len(data)}"))])
    assert whole == data
    uploads = await s3_call(s3_server, "list_multipart_uploads")
    assert not uploads.get("Uploads"), uploads  # none left half done


async def test_a_missing_bucket_or_an_unreachable_endpoint_stops_start_up(
        s3_server: SeaweedFS) -> None:
    wrong_bucket = S3Store("no-such-bucket-here", endpoint_url=s3_server.endpoint, **ACCESS)
    with pytest.raises(Unavailable, match="'no-such-bucket-here' at http://127.0.0.1:.*"
                                          "no such bucket"):
        await wrong_bucket.start()
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    unreachable = S3Store(BUCKET, endpoint_url=f"http://127.0.0.1:{closed}", timeout=2,
                          **ACCESS)
    with pytest.raises(Unavailable, match=f"at http://127.0.0.1:{closed}"):
        await unreachable.start()


def test_s3_holds_cas_blobs_only() -> None:
    s3 = {"type": "s3", "bucket": "cas-bucket"}
    with pytest.raises(ConfigError, match="action-cache: s3 storage holds CAS blobs only"):
        parse_config({"instances": {"": {"action-cache": s3}}})
    with pytest.raises(ConfigError, match="the cache of a read-cache must be local"):
        parse_config({"instances": {"": {"cas": {"type": "read-cache", "backend": s3,
                                                 "cache": s3}}}})
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"instances": {"": {"cas": {**s3, "access-key-id-file": "key"}}}})
    parse_config({"instances": {"": {"cas": {"type": "read-cache", "backend": s3,
                                             "cache": {"type": "disk", "path": "cache"}}}}})

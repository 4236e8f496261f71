"""Blobs in an S3 bucket (Amazon S3, or any S3-compatible store: Ceph's RADOS
Gateway, MinIO, SeaweedFS...), one object per blob under `<prefix><hash>-<size>`.

An object appears whole or not at all: small blobs are one PutObject, large
streamed writes a multipart upload completed only on commit (aborted otherwise).
Reads of a range are ranged GETs, so ByteStream offsets and limits never fetch a
whole large object.  FindMissingBlobs asks HEAD of each digest, many at once.
An object deleted behind the server's back (a lifecycle rule, an operator) is a
missing blob, never an error; bytes that no longer match their digest are caught
by the CAS layer above, as for every store.  Throttling (503 SlowDown) and other
transient errors are retried by the client with back-off; an endpoint that cannot
be reached is UNAVAILABLE naming the bucket and endpoint.

This module needs `aiobotocore` (``pip install 'buildfleet[s3]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, InvalidArgument, Unavailable
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # multipart parts of streamed writes (S3's minimum is 5 MiB)
# A missing object; for a ranged read, also one replaced since it was opened (412).
_MISSING = {"404", "NoSuchKey", "NotFound", "412", "PreconditionFailed"}


class S3Store(BlobStore):
    """See the module docstring."""

    def __init__(self, bucket: str, *, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, addressing_style: str = "auto",
                 timeout: float = 60.0, max_concurrency: int = 32) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url, "region_name": region,
            "aws_access_key_id": access_key_id, "aws_secret_access_key": secret_access_key,
            "config": AioConfig(
                s3={"addressing_style": addressing_style}, connect_timeout=timeout,
                read_timeout=timeout, max_pool_connections=max_concurrency,
                retries={"max_attempts": 5, "mode": "adaptive"})}
        self._concurrency = asyncio.Semaphore(max_concurrency)
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None

    # -- connecting -------------------------------------------------------------
    def where(self) -> str:
        return f"S3 bucket {self.bucket!r} at {self.endpoint_url or 'the AWS endpoint'}"

    def _unavailable(self, error: Exception) -> Unavailable:
        return Unavailable(f"{self.where()}: {error}")

    async def start(self) -> None:
        if self._client is not None:
            return
        stack = contextlib.AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client("s3", **self._client_args))
        self._stack = stack
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            reason = {"404": "no such bucket", "NoSuchBucket": "no such bucket",
                      "403": "access denied (check the credentials and the bucket policy)",
                      "301": "the bucket is in another region (set `region`)",
                      "400": "bad request (check `region` and `addressing-style`)"
                      }.get(code, str(error))
            await self.close()
            raise Unavailable(f"{self.where()}: {reason}") from error
        except (BotoCoreError, OSError) as error:
            await self.close()
            raise self._unavailable(error) from error

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack, self._client = None, None

    @property
    def client(self) -> Any:
        if self._client is None:
            raise Unavailable(f"{self.where()}: the store is not started")
        return self._client

    def key(self, digest: Digest) -> str:
        return f"{self.prefix}{digest.hash}-{digest.size_bytes}"

    def _digest_of(self, key: str) -> Digest | None:
        name = key[len(self.prefix):]
        hash_, _, size = name.rpartition("-")
        try:
            return Digest.parse(hash_, int(size))
        except (ValueError, InvalidArgument):
            return None

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        """One S3 call; None for a missing object; Unavailable for what went wrong."""
        async with self._concurrency:
            try:
                return await getattr(self.client, operation)(Bucket=self.bucket, **kwargs)
            except ClientError as error:
                code = str(error.response.get("Error", {}).get("Code", ""))
                if code in _MISSING:
                    return None
                raise self._unavailable(error) from error
            except (TimeoutError, BotoCoreError, OSError) as error:
                raise self._unavailable(error) from error

    # -- reading -----------------------------------------------------------------
    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(dict.fromkeys(digests))
        heads = await asyncio.gather(*(self._call("head_object", Key=self.key(d))
                                       for d in wanted))
        return [digest for digest, head in zip(wanted, heads, strict=True) if head is None]

    async def get(self, digest: Digest) -> bytes | None:
        answer = await self._call("get_object", Key=self.key(digest))
        if answer is None:
            return None
        return await self._body(answer)

    async def _body(self, answer: Any) -> bytes:
        try:
            async with answer["Body"] as body:
                data: bytes = await body.read()
            return data
        except (TimeoutError, BotoCoreError, OSError) as error:
            raise self._unavailable(error) from error

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = list(dict.fromkeys(digests))
        found = await asyncio.gather(*(self.get(d) for d in wanted))
        return {d: data for d, data in zip(wanted, found, strict=True) if data is not None}

    async def open(self, digest: Digest) -> BlobReader | None:
        head = await self._call("head_object", Key=self.key(digest))
        if head is None:
            return None
        return _ObjectReader(self, digest, int(head["ContentLength"]), head.get("ETag"))

    async def read_range(self, digest: Digest, offset: int, length: int, etag: str | None
                         ) -> bytes:
        if length <= 0:
            return b""
        extra = {"IfMatch": etag} if etag else {}
        answer = await self._call("get_object", Key=self.key(digest),
                                  Range=f"bytes={offset}-{offset + length - 1}", **extra)
        return b"" if answer is None else await self._body(answer)

    # -- writing -----------------------------------------------------------------
    async def put(self, digest: Digest, data: bytes) -> None:
        await self._call("put_object", Key=self.key(digest), Body=data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        await asyncio.gather(*(self.put(digest, data) for digest, data in blobs))

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """The blobs at once (at most `max-concurrency` calls in flight), each on its
        own: per blob, its error or None."""
        async def one(digest: Digest, data: bytes) -> BuildfleetError | None:
            try:
                await self.put(digest, data)
            except BuildfleetError as error:
                return error
            return None

        return list(await asyncio.gather(*(one(digest, data) for digest, data in blobs)))

    async def begin_write(self, digest: Digest) -> BlobWriter:
        return _ObjectWriter(self, digest)

    async def delete(self, digest: Digest) -> bool:
        if await self._call("head_object", Key=self.key(digest)) is None:
            return False
        await self._call("delete_object", Key=self.key(digest))
        return True

    async def unfinished_uploads(self) -> int:
        """Multipart uploads begun under the prefix and neither completed nor aborted."""
        answer = await self._call("list_multipart_uploads", Prefix=self.prefix)
        return len((answer or {}).get("Uploads", []))

    async def scan(self) -> AsyncIterator[StoredBlob]:
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = await self._call("list_objects_v2", Prefix=self.prefix, **extra)
            for item in (page or {}).get("Contents", []):
                digest = self._digest_of(item["Key"])
                if digest is not None:
                    yield StoredBlob(digest, int(item["Size"]),
                                     item["LastModified"].timestamp())
            if not page or not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]


class _ObjectReader(BlobReader):
    """Ranged GETs of one object; `version` is its ETag (a replaced object has
    another, and reads of the old one then come back empty)."""

    def __init__(self, store: S3Store, digest: Digest, size: int, etag: str | None) -> None:
        self.store, self.digest, self.size, self.version = store, digest, size, etag

    async def read(self, offset: int, length: int) -> bytes:
        length = min(length, self.size - offset)
        etag = self.version if isinstance(self.version, str) else None
        return await self.store.read_range(self.digest, offset, length, etag)


class _ObjectWriter(BlobWriter):
    """Buffers up to PART_SIZE; beyond it, a multipart upload completed on commit."""

    def __init__(self, store: S3Store, digest: Digest) -> None:
        self.store, self.digest = store, digest
        self.buffer = bytearray()
        self.upload_id: str | None = None
        self.parts: list[dict[str, Any]] = []
        self.done = False

    async def write(self, data: bytes) -> None:
        if self.done:
            raise RuntimeError("write after commit or abort")
        self.buffer += data
        while len(self.buffer) >= PART_SIZE:
            await self._send(bytes(self.buffer[:PART_SIZE]))
            del self.buffer[:PART_SIZE]

    async def _send(self, part: bytes) -> None:
        key = self.store.key(self.digest)
        if self.upload_id is None:
            started = await self.store._call("create_multipart_upload", Key=key)
            self.upload_id = started["UploadId"]
        number = len(self.parts) + 1
        answer = await self.store._call("upload_part", Key=key, UploadId=self.upload_id,
                                        PartNumber=number, Body=part)
        self.parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    async def commit(self) -> None:
        if self.done:
            raise RuntimeError("commit after commit or abort")
        try:
            if self.upload_id is None:
                await self.store.put(self.digest, bytes(self.buffer))
            else:
                if self.buffer:
                    await self._send(bytes(self.buffer))
                await self.store._call("complete_multipart_upload",
                                       Key=self.store.key(self.digest),
                                       UploadId=self.upload_id,
                                       MultipartUpload={"Parts": self.parts})
        except BuildfleetError:
            await self.abort()
            raise
        self.done = True
        self.buffer = bytearray()

    async def abort(self) -> None:
        if self.done:
            return
        self.done = True
        self.buffer = bytearray()
        if self.upload_id is not None:
            with contextlib.suppress(BuildfleetError):
                await self.store._call("abort_multipart_upload",
                                       Key=self.store.key(self.digest),
                                       UploadId=self.upload_id)

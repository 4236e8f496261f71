"""The google.bytestream.ByteStream service over the CAS: large blob transfers.

Read streams a blob (or a range of it) in 1 MiB chunks; ``compressed-blobs/zstd``
names stream a zstd frame of the blob from ``read_offset`` (an offset in the
uncompressed bytes, as REAPI says; ``read_limit`` must then be 0).

Write receives a blob as a client stream and commits it only once hash and size
match the resource name.  Uploads are resumable: a stream that ends (or is
cancelled) before ``finish_write`` leaves its upload registered, in memory, under
(instance, uuid, digest, compressor); QueryWriteStatus reports how far it got and
a later Write continues at that ``write_offset`` (or restarts at 0).  One stream
at a time may feed an upload; a second one gets ABORTED.  Uploads left idle for
``idle_timeout`` seconds are aborted by a background task, so that no temporary
file outlives them.  For compressed uploads the received bytes go through a
streaming zstd decompressor; offsets and ``committed_size`` count compressed
bytes, and the decompressed size may never exceed the digest's.  When the blob
is already stored, Write answers at once with ``committed_size`` equal to the
size (-1 for a compressed upload), as REAPI specifies.

Streaming allocates and frees a few 1 MiB buffers per message (the chunk, its
protobuf message, gRPC's copy).  With glibc's default, adaptive thresholds the
freed memory goes back to the kernel at once and the next chunk faults fresh,
zeroed pages in again: on a 2-core virtual machine page faults took a third of
the server's time in a 64 MiB read.  `keep_freed_memory` (called when the service
is created) raises the thresholds so that those buffers are reused; it leaves
them alone when MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ is set.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import platform
from collections.abc import AsyncIterator
from typing import IO, cast

import grpc
import zstandard

from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.digest import Digest
from buildfleet.errors import (
    Aborted,
    DataCorrupted,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    Unavailable,
)
from buildfleet.server.bytestream.resource import ResourceName, parse_read, parse_write, quote
from buildfleet.server.instance import Instances
from buildfleet.server.logstream.store import LogName, LogStreams, is_log_name, parse_log_name
from buildfleet.server.rpc import add_service, rpc
from buildfleet.storage.cas import Cas, VerifyingWriter

log = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024  # bytes per ReadResponse
DEFAULT_IDLE_TIMEOUT = 600.0  # seconds before an unfinished, unused upload is aborted
# Unfinished uploads kept at once (each holds an open temporary file).  Beyond it the
# longest-idle one is aborted; when every one is being written, a new one is refused.
DEFAULT_MAX_UPLOADS = 4096
ZSTD_LEVEL = 1  # fast; REAPI lets the server pick any level
# Compressed input is fed to the decompressor in slices of this size, so that the
# output waiting to be written stays small for ordinary data.
_DECOMPRESS_SLICE = 256 * 1024

UploadKey = tuple[str, str, Digest, str | None]

# glibc mallopt parameters (malloc.h) and the values keep_freed_memory sets.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 32 * 1024 * 1024  # free memory kept at the top of the heap
MMAP_THRESHOLD = 4 * 1024 * 1024  # allocations this large get their own mapping
_malloc_tuned = False


def keep_freed_memory() -> bool:
    """Make glibc keep up to TRIM_THRESHOLD bytes of freed heap memory for reuse and
    serve blocks below MMAP_THRESHOLD from the heap (see the module docstring).
    Once per process; True when the thresholds were set."""
    global _malloc_tuned
    if _malloc_tuned:
        return False
    _malloc_tuned = True
    if platform.libc_ver()[0] != "glibc" or "MALLOC_TRIM_THRESHOLD_" in os.environ \
            or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ReadResponse's only field, `bytes data = 10`, as a length-delimited field's tag.
_READ_RESPONSE_DATA_TAG = bytes([10 << 3 | 2])


def encoded_read_response(data: bytes) -> bytes:
    """`ReadResponse(data=data).SerializeToString()` with one copy of `data` rather
    than two (building the message, then serializing it)."""
    length = len(data)
    if not length:
        return b""  # proto3 leaves an empty field out
    varint = bytearray()
    while length > 0x7F:
        varint.append(length & 0x7F | 0x80)
        length >>= 7
    varint.append(length)
    return b"".join((_READ_RESPONSE_DATA_TAG, varint, data))


class _TooLarge(Exception):
    pass


class _Output:
    """Collects what the zstd decompressor produces; refuses more than `limit` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.total += len(data)
        if self.total > self.limit:
            raise _TooLarge
        self.chunks.append(data)
        return len(data)

    def take(self) -> list[bytes]:
        chunks, self.chunks = self.chunks, []
        return chunks


class _Upload:
    """One unfinished upload: its writer, how much it has received, who is feeding it."""

    def __init__(self, key: UploadKey, resource: ResourceName, name: str, cas: Cas) -> None:
        self.key = key
        self.resource = resource
        self.name = name
        self.cas = cas
        self.writer: VerifyingWriter | None = None
        self._output: _Output | None = None
        self._decompressor: zstandard.ZstdDecompressionWriter | None = None
        self.committed = 0  # bytes received (compressed bytes for a compressed upload)
        self.busy = False  # a stream is feeding it
        self.broken = False  # interrupted in the middle of a write: cannot be resumed
        self.idle_since = 0.0

    async def start(self) -> None:
        """Begin receiving at offset 0, dropping whatever was received before."""
        await self.discard()
        self.writer = await self.cas.begin_write(self.resource.digest)
        self.committed = 0
        self.broken = False
        if self.resource.compressed:
            self._output = _Output(self.resource.digest.size_bytes)
            self._decompressor = zstandard.ZstdDecompressor().stream_writer(
                cast(IO[bytes], self._output), write_size=CHUNK_SIZE)

    def _writer(self) -> VerifyingWriter:
        if self.writer is None:
            raise Unavailable(f"upload {quote(self.name)} was aborted; restart it at offset 0")
        return self.writer

    async def feed(self, data: bytes) -> None:
        writer = self._writer()
        try:
            if self._decompressor is None:
                await writer.write(data)
            else:
                await self._feed_compressed(writer, data)
        except BaseException:
            self.broken = True
            raise
        self.committed += len(data)

    async def _feed_compressed(self, writer: VerifyingWriter, data: bytes) -> None:
        assert self._decompressor is not None and self._output is not None
        digest = self.resource.digest
        view = memoryview(data)
        for start in range(0, len(view), _DECOMPRESS_SLICE):
            try:
                self._decompressor.write(view[start:start + _DECOMPRESS_SLICE])
            except _TooLarge:
                raise InvalidArgument(
                    f"blob {digest}: the compressed data decompresses to more than the "
                    f"{digest.size_bytes} bytes the digest announces") from None
            except zstandard.ZstdError as error:
                raise InvalidArgument(
                    f"blob {digest}: the compressed data is not valid zstd ({error})") from None
            for chunk in self._output.take():
                await writer.write(chunk)

    async def finish(self) -> None:
        """Verify and commit; InvalidArgument (and nothing stored) on a mismatch."""
        writer = self._writer()
        try:
            await writer.commit()
        except BaseException:
            self.broken = True
            raise
        self.writer = None

    async def discard(self) -> None:
        writer, self.writer = self.writer, None
        self._decompressor = None
        self._output = None
        if writer is not None:
            await writer.abort()


class ByteStreamService(bs_grpc.ByteStreamServicer):
    """google.bytestream.ByteStream for the CAS of every instance."""

    FULL_NAME = "google.bytestream.ByteStream"

    def __init__(self, instances: Instances, *,
                 idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
                 max_uploads: int = DEFAULT_MAX_UPLOADS,
                 logs: LogStreams | None = None) -> None:
        self.instances = instances
        self.logs = logs  # log streams (LogStream API) are read and written here too
        self.idle_timeout = idle_timeout
        self.max_uploads = max_uploads
        self._uploads: dict[UploadKey, _Upload] = {}
        self._reaper: asyncio.Task[None] | None = None
        keep_freed_memory()

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, bs_pb2.DESCRIPTOR.services_by_name["ByteStream"])

    @property
    def unfinished_uploads(self) -> int:
        """How many uploads are registered (being fed or waiting to be resumed)."""
        return len(self._uploads)

    async def close(self) -> None:
        """Stop the cleanup task and abort every unfinished upload."""
        reaper, self._reaper = self._reaper, None
        if reaper is not None and not reaper.done():
            reaper.cancel()
            try:
                await reaper
            except asyncio.CancelledError:
                pass
        uploads = list(self._uploads.values())
        self._uploads.clear()
        for upload in uploads:
            await upload.discard()

    # -- Read ------------------------------------------------------------------

    @rpc
    async def Read(self, request: bs_pb2.ReadRequest,
                   context: grpc.aio.ServicerContext) -> None:
        # Written with context.write rather than as a generator so that the reader
        # is closed at once when the client goes away.
        if self.logs is not None and is_log_name(request.resource_name):
            await self._read_log(request, context)
            return
        resource = parse_read(request.resource_name)
        instance = self.instances.get(resource.instance_name)
        digest = resource.digest
        offset, limit = request.read_offset, request.read_limit
        if offset < 0 or offset > digest.size_bytes:
            raise OutOfRange(f"read_offset {offset} is outside blob {digest} "
                             f"(valid: 0 to {digest.size_bytes})")
        if limit < 0:
            raise InvalidArgument(f"read_limit {limit} is negative")
        if resource.compressed and limit != 0:
            raise InvalidArgument(f"read_limit {limit}: a compressed-blobs read must not set "
                                  "read_limit")
        reader = await instance.cas.open(digest)
        if reader is None:
            raise NotFound(f"blob {digest} is not in the CAS of instance "
                           f"{resource.instance_name!r}")
        # Verified as it streams (see Cas.read_verified): a blob found corrupted is
        # removed and the read ends NOT_FOUND instead of with its last chunk.
        chunks = instance.cas.read_verified(digest, reader, offset, limit, CHUNK_SIZE)
        try:
            if resource.compressed:
                await self._send_compressed(chunks, reader.size - offset, context)
            else:
                async for chunk in chunks:
                    await context.write(encoded_read_response(chunk))
        except DataCorrupted as error:
            raise NotFound(error.message) from None
        finally:
            await chunks.aclose()
            await reader.close()

    def _log_name(self, resource_name: str) -> LogName:
        """A log stream name, of an instance this server serves."""
        name = parse_log_name(resource_name)
        self.instances.get(name.instance_name)
        return name

    async def _read_log(self, request: bs_pb2.ReadRequest,
                        context: grpc.aio.ServicerContext) -> None:
        assert self.logs is not None
        name = self._log_name(request.resource_name)
        chunks = self.logs.read(name, request.read_offset, request.read_limit)
        try:
            async for chunk in chunks:
                await context.write(bs_pb2.ReadResponse(data=chunk))
        finally:
            await chunks.aclose()

    @staticmethod
    async def _send_compressed(chunks: AsyncIterator[bytes], size: int,
                               context: grpc.aio.ServicerContext) -> None:
        chunker = zstandard.ZstdCompressor(level=ZSTD_LEVEL).chunker(
            size=size, chunk_size=CHUNK_SIZE)
        async for chunk in chunks:
            for compressed in chunker.compress(chunk):
                await context.write(bs_pb2.ReadResponse(data=compressed))
        for compressed in chunker.finish():
            await context.write(bs_pb2.ReadResponse(data=compressed))

    # -- Write -----------------------------------------------------------------

    async def _write_log(self, resource_name: str, first: bs_pb2.WriteRequest,
                         requests: AsyncIterator[bs_pb2.WriteRequest]) -> bs_pb2.WriteResponse:
        """Append to a log stream, each request's bytes readable as soon as they arrive."""
        assert self.logs is not None
        name = self._log_name(resource_name)
        self.logs.write_calls += 1
        request: bs_pb2.WriteRequest | None = first
        committed, _ = self.logs.committed(name)
        while request is not None:
            if request.resource_name and request.resource_name != resource_name:
                raise InvalidArgument(
                    f"resource_name {quote(request.resource_name)} differs from "
                    f"{quote(resource_name)} named at the start of the stream")
            committed = self.logs.write(name, request.write_offset, request.data,
                                        request.finish_write)
            if request.finish_write:
                break
            request = await anext(requests, None)
        return bs_pb2.WriteResponse(committed_size=committed)

    @rpc
    async def Write(self, request_iterator: AsyncIterator[bs_pb2.WriteRequest],
                    context: grpc.aio.ServicerContext) -> bs_pb2.WriteResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("Write: the stream ended before its first request")
        name = first.resource_name
        if not name:
            raise InvalidArgument("the first WriteRequest of a stream must set resource_name")
        if self.logs is not None and is_log_name(name):
            return await self._write_log(name, first, requests)
        resource = parse_write(name)
        instance = self.instances.get(resource.instance_name)
        digest = resource.digest
        instance.cas.check_size(digest)
        await self._make_room(resource)
        upload = self._claim(resource, name, instance.cas)
        keep = True  # until the upload is touched, an error leaves it as it was
        try:
            if await instance.cas.contains(digest):
                keep = False
                return bs_pb2.WriteResponse(
                    committed_size=-1 if resource.compressed else digest.size_bytes)
            await self._position(upload, first.write_offset)
            keep = False
            request: bs_pb2.WriteRequest | None = first
            while request is not None:
                if request.resource_name and request.resource_name != name:
                    raise InvalidArgument(
                        f"resource_name {quote(request.resource_name)} differs from "
                        f"{quote(name)} named at the start of the stream")
                if request.write_offset != upload.committed:
                    raise InvalidArgument(
                        f"write_offset {request.write_offset} of upload {quote(name)}: "
                        f"expected {upload.committed}, the bytes received so far")
                if request.data:
                    await upload.feed(request.data)
                if request.finish_write:
                    await upload.finish()
                    return bs_pb2.WriteResponse(committed_size=upload.committed)
                request = await anext(requests, None)
            keep = True  # the client closed its side early: the upload can be resumed
            return bs_pb2.WriteResponse(committed_size=upload.committed)
        except asyncio.CancelledError:
            keep = not upload.broken
            raise
        finally:
            if keep and upload.writer is not None:
                self._release(upload)
            else:
                await self._drop(upload)

    def _claim(self, resource: ResourceName, name: str, cas: Cas) -> _Upload:
        assert resource.upload_id is not None
        key: UploadKey = (resource.instance_name, resource.upload_id, resource.digest,
                          resource.compressor)
        upload = self._uploads.get(key)
        if upload is None:
            upload = _Upload(key, resource, name, cas)
            self._uploads[key] = upload
        elif upload.busy:
            raise Aborted(f"upload {quote(name)} is being written by another stream; "
                          "retry when that stream has ended")
        upload.busy = True
        return upload

    async def _make_room(self, resource: ResourceName) -> None:
        """Before a new upload: keep at most `max_uploads`, aborting the longest-idle
        ones, or refuse with RESOURCE_EXHAUSTED when all of them are being written."""
        assert resource.upload_id is not None
        key: UploadKey = (resource.instance_name, resource.upload_id, resource.digest,
                          resource.compressor)
        while key not in self._uploads and len(self._uploads) >= self.max_uploads:
            idle = [upload for upload in self._uploads.values() if not upload.busy]
            if not idle:
                raise ResourceExhausted(
                    f"{len(self._uploads)} uploads are being written, this server's limit; "
                    "retry later")
            oldest = min(idle, key=lambda upload: upload.idle_since)
            log.info("aborting upload %s after %d bytes: %d unfinished uploads is the limit",
                     quote(oldest.name), oldest.committed, self.max_uploads)
            await self._drop(oldest)

    @staticmethod
    async def _position(upload: _Upload, offset: int) -> None:
        """Make the upload ready to receive at `offset`; raises before changing anything."""
        if upload.writer is None:
            if offset != 0:
                raise InvalidArgument(
                    f"write_offset {offset}: nothing of upload {quote(upload.name)} has "
                    "been received, so it must start at 0")
            await upload.start()
        elif offset == 0:
            if upload.committed != 0:
                await upload.start()
        elif offset != upload.committed:
            raise InvalidArgument(
                f"write_offset {offset}: upload {quote(upload.name)} has received "
                f"{upload.committed} bytes; continue at {upload.committed} or restart at 0")

    def _release(self, upload: _Upload) -> None:
        upload.busy = False
        upload.idle_since = asyncio.get_running_loop().time()
        self._start_reaper()

    async def _drop(self, upload: _Upload) -> None:
        if self._uploads.get(upload.key) is upload:
            del self._uploads[upload.key]
        upload.busy = False
        await upload.discard()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(
                self._reap(), name="bytestream-idle-uploads")

    async def _reap(self) -> None:
        """Abort uploads left idle too long; ends when there are no uploads."""
        loop = asyncio.get_running_loop()
        while self._uploads:
            await asyncio.sleep(max(0.01, min(self.idle_timeout / 4, 30.0)))
            now = loop.time()
            for upload in list(self._uploads.values()):
                if not upload.busy and now - upload.idle_since >= self.idle_timeout:
                    log.info("aborting upload %s: idle for more than %.0f s after %d bytes",
                             quote(upload.name), self.idle_timeout, upload.committed)
                    await self._drop(upload)

    # -- QueryWriteStatus --------------------------------------------------------

    @rpc
    async def QueryWriteStatus(self, request: bs_pb2.QueryWriteStatusRequest,
                               context: grpc.aio.ServicerContext
                               ) -> bs_pb2.QueryWriteStatusResponse:
        if self.logs is not None and is_log_name(request.resource_name):
            size, finished = self.logs.committed(self._log_name(request.resource_name))
            return bs_pb2.QueryWriteStatusResponse(committed_size=size, complete=finished)
        resource = parse_write(request.resource_name)
        instance = self.instances.get(resource.instance_name)
        digest = resource.digest
        if await instance.cas.contains(digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=digest.size_bytes,
                                                   complete=True)
        assert resource.upload_id is not None
        upload = self._uploads.get((resource.instance_name, resource.upload_id, digest,
                                    resource.compressor))
        if upload is None or upload.writer is None:
            raise NotFound(f"no upload {quote(request.resource_name)} in progress, and blob "
                           f"{digest} is not in the CAS")
        if not upload.busy:
            upload.idle_since = asyncio.get_running_loop().time()
        return bs_pb2.QueryWriteStatusResponse(committed_size=upload.committed,
                                               complete=False)

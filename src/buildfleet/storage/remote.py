"""A blob store that forwards to another REAPI CAS over gRPC.

`RemoteStore` lets several buildfleet servers share one CAS: typically a
buildfleet instance that serves only storage (``scheduler: {enabled: false}``),
but any REAPI v2 CAS + ByteStream endpoint will do.  It talks to it through the
project's CAS client (buildfleet.client.cas):

- existence: FindMissingBlobs, in batches;
- whole blobs: BatchReadBlobs / BatchUpdateBlobs when they fit the remote's
  batch limit, ByteStream otherwise;
- `open`: a ByteStream Read that is consumed as the reader is read, so a large
  blob streams through without being held in memory; a read at another offset
  restarts the stream there;
- `begin_write`: a ByteStream Write fed as the writer is written (small writes
  are gathered into chunks of up to 1 MiB).

A remote CAS cannot be asked to remove a blob: `delete` logs and returns
False.  The store cannot list the remote's blobs either: `scan` yields nothing.

Errors of the remote become domain errors naming it: a remote that cannot be
reached, times out or fails is UNAVAILABLE (with a RetryInfo), a full remote
RESOURCE_EXHAUSTED, anything it refuses FAILED_PRECONDITION (the request was
fine; the remote or its configuration is not).  A blob the remote does not hold
is absent, as the BlobStore interface has it.  The gRPC channel reconnects by
itself when the remote returns (backoff capped at `MAX_RECONNECT_BACKOFF_MS`);
nothing here remembers a failure.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence

import grpc
from google.protobuf.duration_pb2 import Duration
from google.rpc import error_details_pb2

from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet.client.cas import CasClient, CasError, CorruptBlob, MissingBlobs
from buildfleet.client.credentials import ClientCredentials
from buildfleet.digest import Digest
from buildfleet.errors import (
    BuildfleetError,
    DataCorrupted,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)

MiB = 1024 * 1024
DEFAULT_TIMEOUT = 300.0  # seconds per call (a stream that makes progress is resumed)
CHUNK_SIZE = MiB  # bytes per ByteStream WriteRequest sent to the remote
# Batches are at most 64 MiB (the client caps the remote's stated limit there).
MESSAGE_LIMIT = 96 * MiB
MAX_RECONNECT_BACKOFF_MS = 5000  # gRPC's default is 120 s: too slow to notice a restart
RETRY_AFTER_SECONDS = 1
# Unary calls in flight to the remote, for all of this server's requests together
# (streams are not counted).  The client's default of 16 suits one bot, not a server.
MAX_CONCURRENCY = 128

# Codes after which the same request may well succeed later.
_TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
})


def _channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MESSAGE_LIMIT),
        ("grpc.max_send_message_length", MESSAGE_LIMIT),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def _cas_error(error: grpc.aio.AioRpcError, what: str) -> CasError:
    return CasError(error.code(), f"{what}: {error.details() or error.code().name}")


class _RemoteClient(CasClient):
    """The CAS client, plus the calls a store needs that its public API lacks:
    a batch read that returns what is present (instead of failing on the first
    absent blob), and the raw ByteStream calls behind streamed reads and writes."""

    async def read_present(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The verified blobs present among `digests` (absent ones are left out)."""
        found: dict[Digest, bytes] = {}
        batches, large = await self._plan_reads(digests)

        async def batch(chunk: list[Digest]) -> None:
            got, _absent = await self._batch_read(chunk)
            found.update(got)

        async def single(digest: Digest) -> None:
            try:
                found[digest] = await self.read_blob(digest)  # bounded inside
            except MissingBlobs:
                pass

        await asyncio.gather(*(self._bounded(batch(b)) for b in batches),
                             *(single(d) for d in large))
        return found

    def _prefix(self) -> str:
        return f"{self.instance}/" if self.instance else ""

    def read_call(self, digest: Digest, offset: int) -> grpc.aio.UnaryStreamCall:
        name = f"{self._prefix()}blobs/{digest.hash}/{digest.size_bytes}"
        return self._bytestream.Read(bs_pb2.ReadRequest(resource_name=name, read_offset=offset),
                                     timeout=self.timeout)

    def upload_name(self, digest: Digest) -> str:
        return f"{self._prefix()}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

    def write_call(self) -> grpc.aio.StreamUnaryCall:
        # No deadline: the upload feeding it lives as long as its own client keeps
        # writing, and aborting the writer cancels the call.
        return self._bytestream.Write()


class RemoteStore(BlobStore):
    """Blobs kept by another REAPI CAS.  See the module docstring."""

    def __init__(self, address: str, *, instance: str = "",
                 timeout: float = DEFAULT_TIMEOUT,
                 credentials: ClientCredentials | None = None) -> None:
        self.address = address
        self.credentials = credentials
        self.instance = instance
        self.timeout = timeout
        self.name = f"remote CAS {address}" + (f" (instance {instance!r})" if instance else "")
        self._remote: _RemoteClient | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"RemoteStore({self.address!r}, instance={self.instance!r})"

    # -- connection ----------------------------------------------------------

    async def start(self) -> None:
        self._closed = False
        self.client()

    async def close(self) -> None:
        self._closed = True
        remote, self._remote = self._remote, None
        if remote is not None:
            await remote.channel.close()

    def client(self) -> _RemoteClient:
        """The client (the channel is opened on first use and reconnects by itself)."""
        if self._closed:
            raise Unavailable(f"{self.name}: the store is closed (the server is stopping)")
        if self._remote is None:
            channel = self._open_channel()
            self._remote = _RemoteClient(channel, self.instance, timeout=self.timeout,
                                         max_concurrency=MAX_CONCURRENCY)
        return self._remote

    def _open_channel(self) -> grpc.aio.Channel:
        credentials = self.credentials
        if credentials is None:
            return grpc.aio.insecure_channel(self.address, options=_channel_options())
        interceptors = credentials.interceptors()
        if credentials.tls:
            return grpc.aio.secure_channel(self.address, credentials.channel_credentials(),
                                           options=_channel_options(),
                                           interceptors=interceptors)
        return grpc.aio.insecure_channel(self.address, options=_channel_options(),
                                         interceptors=interceptors)

    def error(self, error: CasError) -> BuildfleetError:
        """The domain error for what the remote (or the way to it) answered."""
        code = error.code
        if code in _TRANSIENT:
            retry = error_details_pb2.RetryInfo(retry_delay=Duration(seconds=RETRY_AFTER_SECONDS))
            return Unavailable(f"{self.name} is unavailable ({code.name}): {error.message}",
                               details=[retry])
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"{self.name}: {error.message}")
        if code == grpc.StatusCode.DATA_LOSS:
            return DataCorrupted(f"{self.name}: {error.message}")
        return FailedPrecondition(f"{self.name} refused the request ({code.name}): "
                                  f"{error.message}")

    # -- BlobStore -----------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(digests)
        if not wanted:
            return []
        try:
            missing = await self.client().find_missing(wanted)
        except CasError as error:
            raise self.error(error) from None
        return [d for d in wanted if d in missing]

    async def get(self, digest: Digest) -> bytes | None:
        try:
            return await self.client().read_blob(digest)
        except MissingBlobs:
            return None
        except CorruptBlob as error:
            log.error("%s sent bytes that do not match %s (%s); treating it as absent",
                      self.name, digest, error.message)
            return None
        except CasError as error:
            raise self.error(error) from None

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        try:
            return await self.client().read_present(unique)
        except CorruptBlob:
            pass  # one blob of a batch is bad: read them one by one so the others arrive
        except CasError as error:
            raise self.error(error) from None
        found: dict[Digest, bytes] = {}
        for digest in unique:
            data = await self.get(digest)
            if data is not None:
                found[digest] = data
        return found

    async def open(self, digest: Digest) -> BlobReader | None:
        call = self.client().read_call(digest, 0)
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise self.error(_cas_error(error, f"ByteStream.Read of {digest}")) from None
        except BaseException:
            call.cancel()
            raise
        data = b"" if first is grpc.aio.EOF else first.data
        return _RemoteReader(self, digest, call, data, ended=first is grpc.aio.EOF)

    async def put(self, digest: Digest, data: bytes) -> None:
        await self.put_many([(digest, data)])

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        batch = dict(blobs)
        if not batch:
            return
        try:
            # No FindMissingBlobs first: callers store what they were just given.
            await self.client().upload(batch, check_missing=False)
        except CasError as error:
            raise self.error(error) from None

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """Store several blobs (one BatchUpdateBlobs when they fit): per blob, its
        error or None.  When the remote is unavailable, every blob gets that error;
        when it refuses something, the blobs are sent one by one to tell which."""
        try:
            await self.put_many(blobs)
            return [None] * len(blobs)
        except Unavailable as error:
            return [error] * len(blobs)
        except BuildfleetError:
            if len(blobs) == 1:
                raise
        return await super().put_batch(blobs)  # one by one, to tell which

    async def begin_write(self, digest: Digest) -> BlobWriter:
        return _RemoteWriter(self, digest)

    async def delete(self, digest: Digest) -> bool:
        log.warning("%s: cannot remove %s from a remote CAS; if it is corrupted there, the "
                    "remote must repair it (a buildfleet remote removes corrupted blobs itself "
                    "when it reads them)", self.name, digest)
        return False

    async def scan(self) -> AsyncIterator[StoredBlob]:
        return
        yield  # an async generator that yields nothing: the remote cannot be listed


class _RemoteReader(BlobReader):
    """One ByteStream Read, consumed as `read` asks for bytes.

    Sequential reads (the usual pattern) use one call; a read at another offset
    cancels it and starts another at that offset.  A call that ends on its
    deadline after making progress is resumed where it stopped.
    """

    def __init__(self, store: RemoteStore, digest: Digest, call: grpc.aio.UnaryStreamCall,
                 first: bytes, *, ended: bool) -> None:
        self.size = digest.size_bytes
        self._store = store
        self._digest = digest
        self._call: grpc.aio.UnaryStreamCall | None = call
        self._ended = ended  # the current call has delivered everything it will
        self._closed = False
        self._pending = first  # received, not yet returned; starts at `_position`
        self._used = 0  # bytes of `_pending` already returned
        self._position = 0  # blob offset of the next byte `read` returns
        self._stream_offset = len(first)  # blob offset of the next byte the call delivers
        self._progress = bool(first)  # the current call has delivered bytes

    async def read(self, offset: int, length: int) -> bytes:
        if self._closed:
            raise ValueError("reader is closed")
        if length <= 0 or offset >= self.size:
            return b""
        if offset != self._position:
            self._restart(offset)
        parts: list[bytes] = []
        wanted = length
        while wanted > 0:
            available = len(self._pending) - self._used
            if available == 0:
                chunk = await self._next()
                if chunk is None:
                    break
                self._pending, self._used = chunk, 0
                continue
            take = min(available, wanted)
            if self._used == 0 and take == len(self._pending):
                parts.append(self._pending)  # the common case: a whole chunk, no copy
                self._pending = b""
            else:
                parts.append(self._pending[self._used:self._used + take])
                self._used += take
            wanted -= take
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._position += len(data)
        return data

    def _start_call(self, offset: int) -> None:
        if self._call is not None:
            self._call.cancel()
        self._call = self._store.client().read_call(self._digest, offset)
        self._stream_offset = offset
        self._ended = False
        self._progress = False

    def _restart(self, offset: int) -> None:
        """Continue at another offset: drop what was received, start a new call."""
        self._start_call(offset)
        self._pending, self._used = b"", 0
        self._position = offset

    async def _next(self) -> bytes | None:
        """The next chunk of the stream; None at its end."""
        while not self._ended and self._call is not None:
            try:
                response = await self._call.read()
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and self._progress:
                    self._start_call(self._stream_offset)  # resume where it stopped
                    continue
                self._ended = True
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    raise NotFound(f"blob {self._digest} went missing from {self._store.name} "
                                   "while it was being read") from None
                raise self._store.error(
                    _cas_error(error, f"ByteStream.Read of {self._digest}")) from None
            if response is grpc.aio.EOF:
                self._ended = True
                break
            if response.data:
                self._progress = True
                self._stream_offset += len(response.data)
                return bytes(response.data)
        return None

    async def close(self) -> None:
        self._closed = True
        self._pending = b""
        call, self._call = self._call, None
        if call is not None:
            call.cancel()


class _RemoteWriter(BlobWriter):
    """One ByteStream Write, fed as the writer is written."""

    def __init__(self, store: RemoteStore, digest: Digest) -> None:
        self._store = store
        self._digest = digest
        self._name = store.client().upload_name(digest)
        self._call: grpc.aio.StreamUnaryCall | None = None
        self._buffer = bytearray()
        self._sent = 0  # bytes sent to the remote
        self._open = True
        self._stored = False  # the remote ended the call early: it holds the blob already

    async def write(self, data: bytes) -> None:
        if not self._open:
            raise RuntimeError("write after commit or abort")
        if self._stored:
            return
        if not self._buffer and len(data) == CHUNK_SIZE:
            await self._send(bytes(data), finish=False)  # already a whole chunk
            return
        self._buffer += data
        while len(self._buffer) >= CHUNK_SIZE:
            chunk = bytes(self._buffer[:CHUNK_SIZE])
            del self._buffer[:CHUNK_SIZE]
            await self._send(chunk, finish=False)

    async def _send(self, data: bytes, *, finish: bool) -> None:
        request = bs_pb2.WriteRequest(write_offset=self._sent, data=data, finish_write=finish)
        if self._call is None:
            self._call = self._store.client().write_call()
            request.resource_name = self._name
        try:
            await self._call.write(request)
        except asyncio.CancelledError:
            await self.abort()
            raise
        except Exception:  # the call has ended: early success, or the reason it failed
            await self._settle()
            return
        self._sent += len(data)

    async def _settle(self) -> None:
        """Take the outcome of a call that ended before this writer was done with it."""
        assert self._call is not None
        if not self._call.done():
            await self.abort()
            raise Unavailable(f"{self._store.name}: the upload of {self._digest} broke off")
        try:
            response = await self._call
        except grpc.aio.AioRpcError as error:
            await self.abort()
            raise self._store.error(
                _cas_error(error, f"ByteStream.Write of {self._digest}")) from None
        self._check(response)
        self._stored = True
        self._buffer.clear()

    def _check(self, response: bs_pb2.WriteResponse) -> None:
        if response.committed_size not in (self._digest.size_bytes, -1):
            raise Unavailable(f"{self._store.name}: the upload of {self._digest} ended with "
                              f"{response.committed_size} bytes committed")

    async def commit(self) -> None:
        if not self._open:
            raise RuntimeError("commit after commit or abort")
        try:
            if not self._stored:
                await self._send(bytes(self._buffer), finish=True)
                self._buffer.clear()
            if not self._stored:
                assert self._call is not None
                try:
                    await self._call.done_writing()
                    response = await self._call
                except grpc.aio.AioRpcError as error:
                    raise self._store.error(
                        _cas_error(error, f"ByteStream.Write of {self._digest}")) from None
                self._check(response)
        except BaseException:
            await self.abort()
            raise
        self._open = False
        self._call = None

    async def abort(self) -> None:
        self._open = False
        self._buffer.clear()
        call, self._call = self._call, None
        if call is not None and not call.done():
            call.cancel()

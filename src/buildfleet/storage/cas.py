"""Content-addressable storage: a blob store whose contents always match their digests.

`Cas` wraps any `BlobStore`: writes are verified (hash and size) before they are
stored, whole-blob reads are verified before they are returned (a corrupted blob
is logged, removed and reported as missing), and the empty blob is always present.
Streamed reads (`read_verified`) are hashed as they go, holding the last chunk
back until the whole blob has checked out.

Hashing a large blob again on every read costs more than sending it, so a blob of
at least TRUST_MIN_SIZE bytes that was verified (written through `begin_write`,
or read in full) is streamed without hashing while the store reports the same
`version` for it (a disk store: same file, unchanged since; see BlobReader), for
at most REVERIFY_AFTER seconds.  A store that reports no versions is hashed on
every read.  What this gives up is noticing, within that hour, bytes that decay
on the device without the file system seeing a change.

SHA-256 of large chunks runs on a small thread pool (hashlib releases the GIL
for buffers over 2 KiB): a streamed read hashes one chunk while the previous one
is being sent, and a streamed write hashes a chunk while it is written to the
store, so the event loop's thread is not the bottleneck of either.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import EMPTY_DIGEST, Digest, verify
from buildfleet.errors import (
    BuildfleetError,
    DataCorrupted,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from buildfleet.storage.base import (
    DEFAULT_CHUNK_SIZE,
    BlobReader,
    BlobStore,
    BlobWriter,
    BytesReader,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

# Chunks at least this large are hashed on the hashing threads.
THREAD_HASH_MIN = 64 * 1024
# Chunks waiting to be hashed before the producer waits for the hashing to catch up.
MAX_HASH_BACKLOG = 8
_hashing = ThreadPoolExecutor(max_workers=2, thread_name_prefix="cas-hash")
# Blobs at least this large are remembered as verified (see the module docstring).
TRUST_MIN_SIZE = 1024 * 1024
# A remembered blob is hashed again on its first read after this many seconds.
REVERIFY_AFTER = 3600.0
# How many verified blobs are remembered (least recently verified forgotten first).
MAX_REMEMBERED = 65536


@dataclass
class CasCounters:
    """What went through a Cas since it started (for metrics)."""

    bytes_read: int = 0  # served: batch reads and streamed reads
    bytes_written: int = 0  # verified and stored
    missing_blobs: int = 0  # reported missing by FindMissingBlobs (and such checks)
    corrupted_blobs: int = 0  # found not to match their digests, removed


class Cas:
    """The verified view of a blob store that the services use."""

    def __init__(self, store: BlobStore, *, max_blob_size: int = 0) -> None:
        self.store = store
        self.max_blob_size = max_blob_size  # 0: no limit
        self.counters = CasCounters()
        # digest -> (version of the stored blob when it was verified, monotonic time)
        self._verified: OrderedDict[Digest, tuple[Hashable, float]] = OrderedDict()

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def check_size(self, digest: Digest) -> None:
        if self.max_blob_size and digest.size_bytes > self.max_blob_size:
            raise ResourceExhausted(
                f"blob {digest} is larger than this server's limit of "
                f"{self.max_blob_size} bytes per blob"
            )

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """Digests not present, each once, in first-seen order."""
        unique = [d for d in dict.fromkeys(digests) if d != EMPTY_DIGEST]
        if not unique:
            return []
        missing = await self.store.find_missing(unique)
        self.counters.missing_blobs += len(missing)
        return missing

    async def contains(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    async def put(self, digest: Digest, data: bytes) -> None:
        """Verify and store one blob; InvalidArgument when the bytes do not match."""
        verify(digest, data)
        if digest == EMPTY_DIGEST:
            return
        self.check_size(digest)
        await self.store.put(digest, data)
        self.counters.bytes_written += len(data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]
                       ) -> list[BuildfleetError | None]:
        """Verify and store several blobs, each on its own: per blob, its error
        (InvalidArgument when the bytes do not match, ResourceExhausted...) or None.
        A digest that appears more than once is stored once."""
        blobs = list(blobs)
        results: list[BuildfleetError | None] = [None] * len(blobs)
        pending: dict[Digest, int] = {}  # digest -> index of the copy that is stored
        duplicates: list[tuple[int, int]] = []
        for index, (digest, data) in enumerate(blobs):
            try:
                verify(digest, data)
                if digest == EMPTY_DIGEST:
                    continue
                self.check_size(digest)
            except BuildfleetError as error:
                results[index] = error
                continue
            first = pending.setdefault(digest, index)
            if first != index:
                duplicates.append((index, first))
        order = list(pending.values())
        stored = await self.store.put_batch([blobs[index] for index in order])
        for index, outcome in zip(order, stored, strict=True):
            results[index] = outcome
            if outcome is None:
                self.counters.bytes_written += len(blobs[index][1])
        for index, first in duplicates:
            results[index] = results[first]
        return results

    async def get(self, digest: Digest) -> bytes | None:
        """The blob's bytes, verified; None when absent or found corrupted."""
        if digest == EMPTY_DIGEST:
            return b""
        data = await self.store.get(digest)
        if data is None:
            return None
        if len(data) != digest.size_bytes or hashlib.sha256(data).hexdigest() != digest.hash:
            await self._discard_corrupted(digest)
            return None
        self.counters.bytes_read += len(data)
        return data

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The verified blobs present among `digests` (one backend call: a remote store
        answers a batch in one round trip)."""
        wanted = list(dict.fromkeys(digests))
        found: dict[Digest, bytes] = {EMPTY_DIGEST: b""} if EMPTY_DIGEST in wanted else {}
        unique = [d for d in wanted if d != EMPTY_DIGEST]
        for digest, data in (await self.store.get_many(unique)).items():
            if len(data) != digest.size_bytes or hashlib.sha256(data).hexdigest() != digest.hash:
                await self._discard_corrupted(digest)
                continue
            found[digest] = data
            self.counters.bytes_read += len(data)
        return found

    async def get_message(self, digest: Digest, message_type: type[M], what: str) -> M | None:
        """Fetch and parse a message; InvalidArgument when the blob does not parse."""
        data = await self.get(digest)
        if data is None:
            return None
        message = message_type()
        try:
            message.ParseFromString(data)
        except DecodeError as error:
            raise InvalidArgument(f"{what} {digest} is not a valid {message_type.__name__}") \
                from error
        return message

    async def directory_blobs(self, root: Digest, what: str) -> list[Digest]:
        """The Directory blobs reachable from `root` and the files they list.

        A missing Directory is listed without looking inside it.
        """
        blobs: list[Digest] = []
        seen = {root}
        pending = [root]
        while pending:
            digest = pending.pop()
            blobs.append(digest)
            directory = await self.get_message(digest, re_pb2.Directory, what)
            if directory is None:
                continue
            for file in directory.files:
                blobs.append(Digest.from_proto(file.digest, f"file {file.name!r} in {what}"))
            for child in directory.directories:
                child_digest = Digest.from_proto(child.digest,
                                                 f"directory {child.name!r} in {what}")
                if child_digest not in seen:
                    seen.add(child_digest)
                    pending.append(child_digest)
        return blobs

    async def open(self, digest: Digest) -> BlobReader | None:
        """A reader for streaming; its bytes are not re-verified."""
        if digest == EMPTY_DIGEST:
            return BytesReader(b"")
        reader = await self.store.open(digest)
        if reader is not None and reader.size != digest.size_bytes:
            await reader.close()
            await self._discard_corrupted(digest)
            return None
        return reader

    async def read_verified(self, digest: Digest, reader: BlobReader, offset: int = 0,
                            limit: int = 0, chunk_size: int = DEFAULT_CHUNK_SIZE
                            ) -> AsyncGenerator[bytes, None]:
        """Yield the range [offset, offset+limit) (limit 0: to the end) of an open blob,
        verified against its digest whenever that costs at most one extra pass.

        A range that reaches the end of the blob is verified as it streams: bytes
        before `offset` are read and hashed (not yielded), every chunk is hashed,
        and the last chunk is held back until the hash of the whole blob checks
        out.  A blob of at most one chunk is verified whatever the range.  On a
        mismatch the blob is logged and removed, and DataCorrupted is raised
        instead of the last chunk, so a client never receives a complete read of
        corrupted bytes.  A range that stops short of the end of a larger blob is
        read as it is stored (verifying it would mean reading the rest too).
        """
        size = reader.size
        end = size if limit <= 0 else min(size, offset + limit)
        if (end < size and size > chunk_size) or self._still_verified(digest, reader.version):
            async for chunk in reader.chunks(offset, end - offset, chunk_size):
                self.counters.bytes_read += len(chunk)
                yield chunk
            return
        hasher = _StreamHasher()
        position = 0
        held: bytes | None = None
        while position < size:
            data = await reader.read(position, min(chunk_size, size - position,
                                                   max(offset - position, 0) or chunk_size))
            if not data:
                break
            await hasher.update(data)  # hashed on a thread while the previous chunk is sent
            start, stop = max(offset - position, 0), min(end - position, len(data))
            if start < stop:
                if held is not None:
                    self.counters.bytes_read += len(held)
                    yield held
                held = data[start:stop] if (start, stop) != (0, len(data)) else data
            else:
                await asyncio.sleep(0)  # hashing what precedes the range: let others run
            position += len(data)
        actual = await hasher.hexdigest()
        if position != digest.size_bytes or actual != digest.hash:
            await self._discard_corrupted(digest)
            raise DataCorrupted(f"blob {digest} is corrupted in storage (its bytes no longer "
                                "match its digest); it has been removed: upload it again")
        self._remember_verified(digest, reader.version)
        if held is not None:
            self.counters.bytes_read += len(held)
            yield held

    def _remember_verified(self, digest: Digest, version: Hashable | None) -> None:
        """Note that the stored blob, at `version`, matches its digest."""
        if version is None or digest.size_bytes < TRUST_MIN_SIZE:
            return
        self._verified[digest] = (version, time.monotonic())
        self._verified.move_to_end(digest)
        while len(self._verified) > MAX_REMEMBERED:
            self._verified.popitem(last=False)

    def _still_verified(self, digest: Digest, version: Hashable | None) -> bool:
        """Whether the stored blob is unchanged since it was verified, not long ago."""
        if version is None:
            return False
        remembered = self._verified.get(digest)
        if remembered is None:
            return False
        if remembered[0] != version or time.monotonic() - remembered[1] > REVERIFY_AFTER:
            del self._verified[digest]
            return False
        return True

    async def begin_write(self, digest: Digest) -> VerifyingWriter:
        """A writer that hashes what it receives and refuses to commit a mismatch."""
        self.check_size(digest)

        def committed(version: Hashable | None) -> None:
            self.counters.bytes_written += digest.size_bytes
            self._remember_verified(digest, version)

        return VerifyingWriter(digest, await self.store.begin_write(digest),
                               on_commit=committed)

    async def _discard_corrupted(self, digest: Digest) -> None:
        log.error("blob %s is corrupted in storage; removing it so that it is re-uploaded",
                  digest)
        self.counters.corrupted_blobs += 1
        self._verified.pop(digest, None)
        await self.store.delete(digest)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _StreamHasher:
    """SHA-256 of a sequence of chunks, hashed in order on the hashing threads
    without the caller waiting for each chunk.

    A thread is busy only while chunks are waiting (one drain job at a time per
    stream, so the order holds); small chunks with nothing waiting are hashed at
    once.  `update` waits once MAX_HASH_BACKLOG chunks are waiting, which bounds
    the memory a slow hash can hold; `hexdigest` waits for every chunk."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self._loop = asyncio.get_running_loop()
        self._lock = threading.Lock()
        self._pending: deque[bytes] = deque()
        self._draining = False
        self._idle: asyncio.Future[None] | None = None

    async def update(self, data: bytes) -> None:
        with self._lock:
            inline = not self._draining and len(data) < THREAD_HASH_MIN
            start = False
            if not inline:
                self._pending.append(data)
                start, self._draining = not self._draining, True
            backlog = len(self._pending)
        if inline:
            self._sha.update(data)
            return
        if start:
            try:
                _hashing.submit(self._drain)
            except RuntimeError:  # the pool is shut down (the interpreter is exiting)
                self._drain()
        if backlog >= MAX_HASH_BACKLOG:
            await self._wait()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    self._draining = False
                    waiter, self._idle = self._idle, None
                    break
                data = self._pending.popleft()
            self._sha.update(data)
        if waiter is not None:
            self._loop.call_soon_threadsafe(_resolve, waiter)

    async def _wait(self) -> None:
        with self._lock:
            if not self._draining:
                return
            if self._idle is None or self._idle.done():  # done: an earlier wait was cancelled
                self._idle = self._loop.create_future()
            waiter = self._idle
        await waiter

    async def hexdigest(self) -> str:
        await self._wait()
        return self._sha.hexdigest()


class VerifyingWriter:
    """Streams a blob into a store, committing only if hash and size match.

    Large chunks are hashed on the hashing threads while the store writes them."""

    def __init__(self, digest: Digest, inner: BlobWriter, *,
                 on_commit: Callable[[Hashable | None], object] | None = None) -> None:
        self.digest = digest
        self._inner = inner
        self._on_commit = on_commit  # called with the stored blob's version
        self._hasher: _StreamHasher | None = None
        self.written = 0
        self.finished = False
        self._interrupted = False  # a write did not complete: the hash is unreliable

    async def write(self, data: bytes) -> None:
        if self.written + len(data) > self.digest.size_bytes:
            await self.abort()
            raise InvalidArgument(
                f"blob {self.digest}: received more than the {self.digest.size_bytes} "
                "bytes the digest announces"
            )
        if self._interrupted:
            raise Unavailable(f"blob {self.digest}: an earlier write was interrupted; "
                              "restart the upload")
        if self._hasher is None:
            self._hasher = _StreamHasher()
        self._interrupted = True
        await self._hasher.update(data)
        await self._inner.write(data)
        self._interrupted = False
        self.written += len(data)

    async def commit(self) -> None:
        if self._interrupted:
            await self.abort()
            raise Unavailable(f"blob {self.digest}: an earlier write was interrupted; "
                              "restart the upload")
        if self.written != self.digest.size_bytes:
            await self.abort()
            raise InvalidArgument(
                f"blob {self.digest}: received {self.written} bytes, the digest announces "
                f"{self.digest.size_bytes}"
            )
        if self._hasher is None:
            self._hasher = _StreamHasher()
        actual = await self._hasher.hexdigest()
        if actual != self.digest.hash:
            await self.abort()
            raise InvalidArgument(f"blob {self.digest}: content hashes to {actual}")
        self.finished = True
        await self._inner.commit()
        if self._on_commit is not None:
            self._on_commit(self._inner.version)

    async def abort(self) -> None:
        self.finished = True
        await self._inner.abort()

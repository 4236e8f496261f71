"""The interface every blob store implements.

A blob store maps a `Digest` to bytes.  It does not check that the bytes hash to
the digest: the CAS layer (buildfleet.storage.cas) verifies before it stores, and
the action cache keys results by action digest.  Stores compose: a wrapper takes
another store and adds one behaviour (a size limit, a cache in front, ...).

All methods are coroutines so that a store may do network or disk I/O without
blocking the event loop; in-memory and local-disk stores may answer at once.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError

DEFAULT_CHUNK_SIZE = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """What a store reports about one blob it holds (for eviction and scans)."""

    digest: Digest
    stored_size: int
    last_access: float


class BlobReader(abc.ABC):
    """An open handle on one stored blob, read in ranges.

    `version`, when the store can tell, identifies the stored bytes as they were
    when the blob was opened: any change to them (in place, or by replacing the
    blob) gives a different version.  None: the store cannot tell.
    """

    size: int
    version: Hashable | None = None

    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes starting at `offset` (fewer only at the end)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the handle."""

    async def chunks(self, offset: int = 0, limit: int = 0,
                     chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncIterator[bytes]:
        """Yield the range [offset, offset+limit) (limit 0: to the end) in chunks."""
        end = self.size if limit <= 0 else min(self.size, offset + limit)
        position = offset
        while position < end:
            data = await self.read(position, min(chunk_size, end - position))
            if not data:
                break
            position += len(data)
            yield data

    async def __aenter__(self) -> BlobReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class BlobWriter(abc.ABC):
    """A blob being written.  Nothing is visible to readers until `commit()`.

    After `commit()`, `version` is what a reader opening the stored blob would
    report (see `BlobReader`) when the store can tell, else None.
    """

    version: Hashable | None = None

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Append bytes."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the blob visible atomically.  The writer cannot be used afterwards."""

    @abc.abstractmethod
    async def abort(self) -> None:
        """Discard what was written.  Safe to call more than once, or after commit."""


class BlobStore(abc.ABC):
    """Maps digests to bytes.  See the module docstring."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Prepare the store (scan a directory, open connections)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""

    @abc.abstractmethod
    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests among `digests` that the store does not hold, in input order."""

    @abc.abstractmethod
    async def get(self, digest: Digest) -> bytes | None:
        """The whole blob, or None when absent."""

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The blobs that are present among `digests`."""
        found: dict[Digest, bytes] = {}
        for digest in digests:
            if digest not in found:
                data = await self.get(digest)
                if data is not None:
                    found[digest] = data
        return found

    @abc.abstractmethod
    async def open(self, digest: Digest) -> BlobReader | None:
        """A reader for the blob, or None when absent."""

    @abc.abstractmethod
    async def put(self, digest: Digest, data: bytes) -> None:
        """Store a whole blob, replacing any blob already stored under that digest."""

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """Store several blobs."""
        for digest, data in blobs:
            await self.put(digest, data)

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """Store several blobs, each on its own: per blob, its error (None when stored).

        One `put` after another; stores that write a batch more cheaply at once
        (the disk store on its I/O threads, a remote in one call) override it."""
        results: list[BuildfleetError | None] = []
        for digest, data in blobs:
            try:
                await self.put(digest, data)
                results.append(None)
            except BuildfleetError as error:
                results.append(error)
        return results

    @abc.abstractmethod
    async def begin_write(self, digest: Digest) -> BlobWriter:
        """Start writing a blob in pieces (for large uploads)."""

    @abc.abstractmethod
    async def delete(self, digest: Digest) -> bool:
        """Remove a blob; False when it was not there."""

    @abc.abstractmethod
    def scan(self) -> AsyncIterator[StoredBlob]:
        """Every blob the store holds, for building indexes at start-up."""


class WholeBlobStore(BlobStore):
    """A store that keeps each blob whole (a row of a database): reads are `get_many`,
    a streamed write is collected in memory and stored with `put_many` on commit."""

    async def get(self, digest: Digest) -> bytes | None:
        return (await self.get_many([digest])).get(digest)

    @abc.abstractmethod
    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The blobs that are present among `digests`."""

    async def open(self, digest: Digest) -> BlobReader | None:
        data = await self.get(digest)
        return None if data is None else BytesReader(data)

    async def put(self, digest: Digest, data: bytes) -> None:
        await self.put_many([(digest, data)])

    @abc.abstractmethod
    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        """Store several blobs."""

    async def begin_write(self, digest: Digest) -> BlobWriter:
        async def store(data: bytes) -> None:
            await self.put(digest, data)

        return BufferedWriter(store)


class BytesReader(BlobReader):
    """A reader over bytes already in memory."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self.size = len(data)

    async def read(self, offset: int, length: int) -> bytes:
        return bytes(self._data[offset:offset + length])


class BufferedWriter(BlobWriter):
    """Collects the pieces in memory and hands the whole blob to `on_commit`."""

    def __init__(self, on_commit: Callable[[bytes], Awaitable[object]]) -> None:
        self._buffer: bytearray | None = bytearray()
        self._on_commit = on_commit

    async def write(self, data: bytes) -> None:
        if self._buffer is None:
            raise RuntimeError("write after commit or abort")
        self._buffer += data

    async def commit(self) -> None:
        if self._buffer is None:
            raise RuntimeError("commit after commit or abort")
        data, self._buffer = bytes(self._buffer), None
        await self._on_commit(data)

    async def abort(self) -> None:
        self._buffer = None

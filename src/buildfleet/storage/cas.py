"""Content-addressable storage: a blob store whose contents always match their digests.

`Cas` wraps any `BlobStore`: writes are verified (hash and size) before they are
stored, whole-blob reads are verified before they are returned (a corrupted blob
is logged, removed and reported as missing), and the empty blob is always present.
Streamed reads (`read_verified`) are hashed as they go, holding the last chunk
back until the whole blob has checked out.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncGenerator, Iterable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from buildfleet.digest import EMPTY_DIGEST, Digest, verify
from buildfleet.errors import DataCorrupted, InvalidArgument, ResourceExhausted
from buildfleet.storage.base import (
    DEFAULT_CHUNK_SIZE,
    BlobReader,
    BlobStore,
    BlobWriter,
    BytesReader,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


class Cas:
    """The verified view of a blob store that the services use."""

    def __init__(self, store: BlobStore, *, max_blob_size: int = 0) -> None:
        self.store = store
        self.max_blob_size = max_blob_size  # 0: no limit

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
        return await self.store.find_missing(unique)

    async def contains(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    async def put(self, digest: Digest, data: bytes) -> None:
        """Verify and store one blob; InvalidArgument when the bytes do not match."""
        verify(digest, data)
        if digest == EMPTY_DIGEST:
            return
        self.check_size(digest)
        await self.store.put(digest, data)

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
        return data

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """The verified blobs present among `digests`."""
        found: dict[Digest, bytes] = {}
        for digest in dict.fromkeys(digests):
            data = await self.get(digest)
            if data is not None:
                found[digest] = data
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
        if end < size and size > chunk_size:
            async for chunk in reader.chunks(offset, end - offset, chunk_size):
                yield chunk
            return
        hasher = hashlib.sha256()
        position = 0
        held: bytes | None = None
        while position < size:
            data = await reader.read(position, min(chunk_size, size - position,
                                                   max(offset - position, 0) or chunk_size))
            if not data:
                break
            hasher.update(data)
            start, stop = max(offset - position, 0), min(end - position, len(data))
            if start < stop:
                if held is not None:
                    yield held
                held = data[start:stop] if (start, stop) != (0, len(data)) else data
            else:
                await asyncio.sleep(0)  # hashing what precedes the range: let others run
            position += len(data)
        if position != digest.size_bytes or hasher.hexdigest() != digest.hash:
            await self._discard_corrupted(digest)
            raise DataCorrupted(f"blob {digest} is corrupted in storage (its bytes no longer "
                                "match its digest); it has been removed: upload it again")
        if held is not None:
            yield held

    async def begin_write(self, digest: Digest) -> VerifyingWriter:
        """A writer that hashes what it receives and refuses to commit a mismatch."""
        self.check_size(digest)
        return VerifyingWriter(digest, await self.store.begin_write(digest))

    async def _discard_corrupted(self, digest: Digest) -> None:
        log.error("blob %s is corrupted in storage; removing it so that it is re-uploaded",
                  digest)
        await self.store.delete(digest)


class VerifyingWriter:
    """Streams a blob into a store, committing only if hash and size match."""

    def __init__(self, digest: Digest, inner: BlobWriter) -> None:
        self.digest = digest
        self._inner = inner
        self._hasher = hashlib.sha256()
        self.written = 0
        self.finished = False

    async def write(self, data: bytes) -> None:
        if self.written + len(data) > self.digest.size_bytes:
            await self.abort()
            raise InvalidArgument(
                f"blob {self.digest}: received more than the {self.digest.size_bytes} "
                "bytes the digest announces"
            )
        self._hasher.update(data)
        self.written += len(data)
        await self._inner.write(data)

    async def commit(self) -> None:
        if self.written != self.digest.size_bytes:
            await self.abort()
            raise InvalidArgument(
                f"blob {self.digest}: received {self.written} bytes, the digest announces "
                f"{self.digest.size_bytes}"
            )
        actual = self._hasher.hexdigest()
        if actual != self.digest.hash:
            await self.abort()
            raise InvalidArgument(f"blob {self.digest}: content hashes to {actual}")
        self.finished = True
        await self._inner.commit()

    async def abort(self) -> None:
        self.finished = True
        await self._inner.abort()

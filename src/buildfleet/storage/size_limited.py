"""A wrapper that bounds the bytes an inner store holds, evicting least recently used."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable

from buildfleet.digest import Digest
from buildfleet.errors import ResourceExhausted
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)


class SizeLimitedStore(BlobStore):
    """Keeps the inner store's total size at or below `max_bytes`.

    Every read, existence check or write marks a blob as used; when a write
    pushes the total past the limit, the least recently used blobs are deleted
    from the inner store.  The recency order lives in memory; at start-up it is
    rebuilt from the inner store's scan (last access or modification time).
    """

    def __init__(self, inner: BlobStore, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.inner = inner
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[Digest, int] = OrderedDict()
        self.total_bytes = 0
        self.evicted_blobs = 0

    async def start(self) -> None:
        await self.inner.start()
        found = [blob async for blob in self.inner.scan()]
        found.sort(key=lambda blob: blob.last_access)
        for blob in found:
            self._remember(blob.digest, blob.stored_size)
        await self._evict()

    async def close(self) -> None:
        await self.inner.close()

    def _remember(self, digest: Digest, size: int) -> None:
        previous = self._sizes.pop(digest, None)
        if previous is not None:
            self.total_bytes -= previous
        self._sizes[digest] = size
        self.total_bytes += size

    def _touch(self, digest: Digest) -> None:
        if digest in self._sizes:
            self._sizes.move_to_end(digest)

    async def _evict(self, keep: Digest | None = None) -> None:
        while self.total_bytes > self.max_bytes and self._sizes:
            digest, size = next(iter(self._sizes.items()))
            if digest == keep:
                if len(self._sizes) == 1:
                    break
                self._sizes.move_to_end(digest)
                continue
            del self._sizes[digest]
            self.total_bytes -= size
            self.evicted_blobs += 1
            await self.inner.delete(digest)
            log.debug("evicted %s (%d bytes)", digest, size)

    def _check_fits(self, digest: Digest, size: int) -> None:
        if size > self.max_bytes:
            raise ResourceExhausted(
                f"blob {digest} ({size} bytes) is larger than the store's limit of "
                f"{self.max_bytes} bytes"
            )

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        digests = list(digests)
        missing = await self.inner.find_missing(digests)
        absent = set(missing)
        for digest in digests:
            if digest not in absent:
                self._touch(digest)
        return missing

    async def get(self, digest: Digest) -> bytes | None:
        data = await self.inner.get(digest)
        if data is not None:
            self._touch(digest)
        return data

    async def open(self, digest: Digest) -> BlobReader | None:
        reader = await self.inner.open(digest)
        if reader is not None:
            self._touch(digest)
        return reader

    async def put(self, digest: Digest, data: bytes) -> None:
        self._check_fits(digest, len(data))
        await self.inner.put(digest, data)
        self._remember(digest, len(data))
        await self._evict(keep=digest)

    async def begin_write(self, digest: Digest) -> BlobWriter:
        self._check_fits(digest, digest.size_bytes)
        return _CountingWriter(self, digest, await self.inner.begin_write(digest))

    async def delete(self, digest: Digest) -> bool:
        size = self._sizes.pop(digest, None)
        if size is not None:
            self.total_bytes -= size
        return await self.inner.delete(digest)

    def scan(self) -> AsyncIterator[StoredBlob]:
        return self.inner.scan()


class _CountingWriter(BlobWriter):
    def __init__(self, store: SizeLimitedStore, digest: Digest, inner: BlobWriter) -> None:
        self._store = store
        self._digest = digest
        self._inner = inner
        self._written = 0

    async def write(self, data: bytes) -> None:
        self._written += len(data)
        if self._written > self._store.max_bytes:
            await self._inner.abort()
            self._store._check_fits(self._digest, self._written)
        await self._inner.write(data)

    async def commit(self) -> None:
        await self._inner.commit()
        self._store._remember(self._digest, self._written)
        await self._store._evict(keep=self._digest)

    async def abort(self) -> None:
        await self._inner.abort()

"""A local copy in front of a slower content-addressed store (typically a remote CAS).

`ReadCachingStore(backend, cache)`:

- reads are served from `cache` when it holds the blob; otherwise from
  `backend`, and the blob is copied into `cache` on the way (a large blob is
  streamed into the cache first, then served from it; concurrent reads of the
  same uncached blob share one copy);
- writes go to `backend`, then to `cache`;
- existence checks (`find_missing`) go to `backend` only.  The backend is what
  every replica sharing it sees: a blob that lingers in this cache after the
  backend evicted it must be reported missing, or a client would skip the
  upload and a bot or client of another replica would not find it.

The cache is a convenience: it failing (full, a disk error) is logged and the
backend serves.  The backend failing is the caller's error.

Content-addressed blobs only: the store checks cached copies against their
digests.  A cached copy returned whole (`get`, `get_many`) that no longer matches
its digest is dropped from the cache and read again from the backend.  Bytes
copied into the cache are checked first, so a corrupted backend copy never
enters it.  A cached copy that is streamed (`open`) is checked by the CAS layer
as it streams (see buildfleet.storage.cas); when it is found corrupted there,
the CAS layer's `delete` drops it here (the backend's copy only if it is
corrupted too), and the next read comes from the backend.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
from collections.abc import AsyncIterator, Iterable, Sequence

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, ResourceExhausted
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)


class _Fill(enum.Enum):
    ABSENT = "absent"  # the backend does not hold the blob
    CACHED = "cached"  # the blob is now in the cache
    UNCACHED = "uncached"  # the backend holds it but it could not be cached


def _not_caching(digest: Digest, error: BuildfleetError) -> None:
    # A blob larger than the whole cache is expected now and then: not worth a warning.
    level = logging.DEBUG if isinstance(error, ResourceExhausted) else logging.WARNING
    log.log(level, "read cache: not caching %s: %s", digest, error.message)


def _matches(digest: Digest, data: bytes) -> bool:
    return len(data) == digest.size_bytes and hashlib.sha256(data).hexdigest() == digest.hash


class ReadCachingStore(BlobStore):
    """Serves reads from `cache`, filling it from `backend`.  See the module docstring."""

    def __init__(self, backend: BlobStore, cache: BlobStore) -> None:
        self.backend = backend
        self.cache = cache
        self._fills: dict[Digest, asyncio.Task[_Fill]] = {}
        # What happened, for tests and for the curious.
        self.hits = 0
        self.misses = 0
        self.dropped = 0

    async def start(self) -> None:
        await self.backend.start()
        await self.cache.start()

    async def close(self) -> None:
        fills = list(self._fills.values())
        self._fills.clear()
        for task in fills:
            task.cancel()
        await asyncio.gather(*fills, return_exceptions=True)
        await self.cache.close()
        await self.backend.close()

    # -- the cache, whose failures are only logged --------------------------------

    async def _cached_get(self, digest: Digest) -> bytes | None:
        try:
            data = await self.cache.get(digest)
        except BuildfleetError as error:
            log.warning("read cache: reading %s failed (%s); using the backend",
                        digest, error.message)
            return None
        if data is not None and not _matches(digest, data):
            await self._drop(digest, "its bytes no longer match its digest")
            return None
        return data

    async def _cached_open(self, digest: Digest) -> BlobReader | None:
        try:
            reader = await self.cache.open(digest)
        except BuildfleetError as error:
            log.warning("read cache: opening %s failed (%s); using the backend",
                        digest, error.message)
            return None
        if reader is not None and reader.size != digest.size_bytes:
            await reader.close()
            await self._drop(digest, f"it holds {reader.size} bytes")
            return None
        return reader

    async def _cache_put(self, digest: Digest, data: bytes) -> None:
        try:
            await self.cache.put(digest, data)
        except BuildfleetError as error:
            _not_caching(digest, error)

    async def _cache_put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> None:
        if not blobs:
            return
        try:
            cached = await self.cache.put_batch(blobs)
        except BuildfleetError as error:
            cached = [error] * len(blobs)
        for (digest, _), failure in zip(blobs, cached, strict=True):
            if failure is not None:
                _not_caching(digest, failure)

    async def _drop(self, digest: Digest, why: str) -> None:
        log.error("read cache: the cached copy of %s is corrupted (%s); dropping it and "
                  "reading the blob from the backend", digest, why)
        self.dropped += 1
        try:
            await self.cache.delete(digest)
        except BuildfleetError as error:
            log.warning("read cache: removing %s failed: %s", digest, error.message)

    # -- BlobStore ---------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return await self.backend.find_missing(digests)

    async def get(self, digest: Digest) -> bytes | None:
        data = await self._cached_get(digest)
        if data is not None:
            self.hits += 1
            return data
        self.misses += 1
        data = await self.backend.get(digest)
        if data is not None and _matches(digest, data):
            await self._cache_put(digest, data)
        return data

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        try:
            found = await self.cache.get_many(unique)
        except BuildfleetError as error:
            log.warning("read cache: reading %d blobs failed (%s); using the backend",
                        len(unique), error.message)
            found = {}
        for digest, data in list(found.items()):
            if not _matches(digest, data):
                del found[digest]
                await self._drop(digest, "its bytes no longer match its digest")
        self.hits += len(found)
        rest = [d for d in unique if d not in found]
        if rest:
            self.misses += len(rest)
            fetched = await self.backend.get_many(rest)
            await self._cache_put_many([(d, data) for d, data in fetched.items()
                                        if _matches(d, data)])
            found.update(fetched)
        return found

    async def open(self, digest: Digest) -> BlobReader | None:
        reader = await self._cached_open(digest)
        if reader is not None:
            self.hits += 1
            return reader
        self.misses += 1
        outcome = await self._fill_once(digest)
        if outcome is _Fill.ABSENT:
            return None
        if outcome is _Fill.CACHED:
            reader = await self._cached_open(digest)
            if reader is not None:
                return reader
        return await self.backend.open(digest)  # not cacheable, or evicted at once

    async def _fill_once(self, digest: Digest) -> _Fill:
        """Copy the blob into the cache, sharing the copy with concurrent readers."""
        task = self._fills.get(digest)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fill(digest),
                                                          name=f"read-cache fill {digest}")
            self._fills[digest] = task
            task.add_done_callback(lambda done: self._forget(digest, done))
        # Shielded: a reader that gives up does not cancel the copy the others await.
        return await asyncio.shield(task)

    def _forget(self, digest: Digest, task: asyncio.Task[_Fill]) -> None:
        if self._fills.get(digest) is task:
            del self._fills[digest]
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not "never retrieved"

    async def _fill(self, digest: Digest) -> _Fill:
        source = await self.backend.open(digest)
        if source is None:
            return _Fill.ABSENT
        writer: BlobWriter | None = None
        try:
            try:
                writer = await self.cache.begin_write(digest)
            except BuildfleetError as error:
                _not_caching(digest, error)
                return _Fill.UNCACHED
            hasher = hashlib.sha256()
            size = 0
            async for chunk in source.chunks():  # backend errors are the caller's
                hasher.update(chunk)
                size += len(chunk)
                try:
                    await writer.write(chunk)
                except BuildfleetError as error:
                    _not_caching(digest, error)
                    return _Fill.UNCACHED
            if size != digest.size_bytes or hasher.hexdigest() != digest.hash:
                log.error("read cache: the backend's copy of %s does not match its digest; "
                          "not caching it", digest)
                return _Fill.UNCACHED
            try:
                await writer.commit()
            except BuildfleetError as error:
                _not_caching(digest, error)
                return _Fill.UNCACHED
            return _Fill.CACHED
        finally:
            if writer is not None:
                await writer.abort()  # no-op after a commit
            await source.close()

    async def put(self, digest: Digest, data: bytes) -> None:
        await self.backend.put(digest, data)
        await self._cache_put(digest, data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        batch = list(blobs)
        await self.backend.put_many(batch)
        await self._cache_put_many(batch)

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """Store several blobs, each on its own: per blob, its error or None."""
        results = await self.backend.put_batch(blobs)
        await self._cache_put_many(
            [blob for blob, error in zip(blobs, results, strict=True) if error is None])
        return results

    async def begin_write(self, digest: Digest) -> BlobWriter:
        backend = await self.backend.begin_write(digest)
        cache: BlobWriter | None
        try:
            cache = await self.cache.begin_write(digest)
        except BuildfleetError as error:
            _not_caching(digest, error)
            cache = None
        return _TeeWriter(digest, backend, cache)

    async def delete(self, digest: Digest) -> bool:
        """Drop the cached copy; the backend's copy too, but only if it is corrupted.

        A caller deletes a blob it found corrupted (see buildfleet.storage.cas)
        without knowing which copy it read; a good backend copy must not be lost
        for a bad cached one, so the backend's copy is checked first.
        """
        try:
            cached = await self.cache.delete(digest)
        except BuildfleetError as error:
            log.warning("read cache: removing %s failed: %s", digest, error.message)
            cached = False
        if await self._backend_corrupted(digest):
            return await self.backend.delete(digest) or cached
        return cached

    async def _backend_corrupted(self, digest: Digest) -> bool:
        try:
            reader = await self.backend.open(digest)
            if reader is None:
                return False
            async with reader:
                hasher = hashlib.sha256()
                size = 0
                async for chunk in reader.chunks():
                    hasher.update(chunk)
                    size += len(chunk)
        except BuildfleetError as error:
            log.warning("read cache: could not check the backend's copy of %s (%s); "
                        "leaving it", digest, error.message)
            return False
        return size != digest.size_bytes or hasher.hexdigest() != digest.hash

    def scan(self) -> AsyncIterator[StoredBlob]:
        """The backend's blobs (the cache holds copies of some of them)."""
        return self.backend.scan()


class _TeeWriter(BlobWriter):
    """Writes to the backend and, as long as it keeps up, to the cache."""

    def __init__(self, digest: Digest, backend: BlobWriter, cache: BlobWriter | None) -> None:
        self._digest = digest
        self._backend = backend
        self._cache = cache

    async def _give_up_cache(self, error: BuildfleetError) -> None:
        _not_caching(self._digest, error)
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.abort()

    async def write(self, data: bytes) -> None:
        try:
            await self._backend.write(data)
        except BaseException:
            await self.abort()
            raise
        if self._cache is not None:
            try:
                await self._cache.write(data)
            except BuildfleetError as error:
                await self._give_up_cache(error)

    async def commit(self) -> None:
        try:
            await self._backend.commit()
        except BaseException:
            await self.abort()
            raise
        if self._cache is not None:
            try:
                await self._cache.commit()
                self.version = self._cache.version  # reads are served from the cache
            except BuildfleetError as error:
                await self._give_up_cache(error)

    async def abort(self) -> None:
        await self._backend.abort()
        cache, self._cache = self._cache, None
        if cache is not None:
            await cache.abort()

"""A wrapper that bounds the bytes an inner store holds, evicting least recently used.

The limit and the recency order live in this process's memory.  When several
processes share one inner store (disk stores of several replicas on one
directory), each process enforces the limit on its own view of that store:

- At start-up the view is rebuilt from the inner store's scan, ordered by each
  blob's last use as the store reports it (a disk store refreshes a file's
  modification time when any process uses it).
- Without a rescan, blobs that other processes store later are not counted, so
  the directory may grow past the limit by what the others write; a blob that
  another process deleted is forgotten as soon as a read or lookup misses it, and
  evicting a blob that is already gone is not an error.
- With `rescan_interval`, the view is rebuilt from a fresh scan every so many
  seconds (blobs stored or deleted by others are then counted or forgotten, and
  recency merges this process's own uses with the modification times other
  processes left), so every process enforces the one limit on the whole
  directory, overshooting it at most by what is written between two rescans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, ResourceExhausted
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)


class SizeLimitedStore(BlobStore):
    """Keeps the inner store's total size at or below `max_bytes`.

    Every read, existence check or write marks a blob as used; when a write
    pushes the total past the limit, the least recently used blobs are deleted
    from the inner store.  See the module docstring for stores shared between
    processes.
    """

    def __init__(self, inner: BlobStore, max_bytes: int, *,
                 rescan_interval: float | None = None) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if rescan_interval is not None and rescan_interval <= 0:
            raise ValueError("rescan_interval must be positive")
        self.inner = inner
        self.max_bytes = max_bytes
        self.rescan_interval = rescan_interval
        self._sizes: OrderedDict[Digest, int] = OrderedDict()
        self._used: dict[Digest, float] = {}  # wall-clock time of this process's last use
        self.total_bytes = 0
        self.evicted_blobs = 0
        # While a rescan runs: what this process stored, and removed, in the meantime.
        self._scanning = False
        self._added_during_scan: set[Digest] = set()
        self._removed_during_scan: set[Digest] = set()
        self._rescanner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.inner.start()
        found = [blob async for blob in self.inner.scan()]
        found.sort(key=lambda blob: blob.last_access)
        for blob in found:
            self._remember(blob.digest, blob.stored_size, blob.last_access)
        await self._evict()
        if self.rescan_interval is not None:
            self._rescanner = asyncio.get_running_loop().create_task(
                self._rescan_periodically(self.rescan_interval), name="size-limit-rescan")

    async def close(self) -> None:
        rescanner, self._rescanner = self._rescanner, None
        if rescanner is not None:
            rescanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await rescanner
        await self.inner.close()

    # -- the index ----------------------------------------------------------

    def _remember(self, digest: Digest, size: int, used: float | None = None) -> None:
        previous = self._sizes.pop(digest, None)
        if previous is not None:
            self.total_bytes -= previous
        self._sizes[digest] = size
        self._used[digest] = time.time() if used is None else used
        self.total_bytes += size
        if self._scanning:
            self._added_during_scan.add(digest)
            self._removed_during_scan.discard(digest)

    def _touch(self, digest: Digest) -> None:
        if digest in self._sizes:
            self._sizes.move_to_end(digest)
            self._used[digest] = time.time()

    def _forget(self, digest: Digest) -> int | None:
        size = self._sizes.pop(digest, None)
        self._used.pop(digest, None)
        if size is not None:
            self.total_bytes -= size
        if self._scanning:
            self._removed_during_scan.add(digest)
            self._added_during_scan.discard(digest)
        return size

    async def _evict(self, keep: Digest | None = None) -> None:
        while self.total_bytes > self.max_bytes and self._sizes:
            digest = next(iter(self._sizes))
            if digest == keep:
                if len(self._sizes) == 1:
                    break
                self._sizes.move_to_end(digest)
                continue
            size = self._forget(digest)
            self.evicted_blobs += 1
            try:
                deleted = await self.inner.delete(digest)
            except BuildfleetError as error:
                log.warning("could not evict %s: %s", digest, error.message)
                break
            log.debug("evicted %s (%d bytes)%s", digest, size,
                      "" if deleted else ", already removed by someone else")

    # -- rescans ------------------------------------------------------------

    async def rescan(self) -> None:
        """Rebuild the index from a fresh scan of the inner store, keeping what this
        process stored or removed while the scan ran, then evict if over the limit."""
        if self._scanning:
            return
        self._scanning = True
        self._added_during_scan = set()
        self._removed_during_scan = set()
        try:
            found = {blob.digest: blob async for blob in self.inner.scan()}
        finally:
            self._scanning = False
        added, removed = self._added_during_scan, self._removed_during_scan
        entries: list[tuple[float, Digest, int]] = []
        for digest, blob in found.items():
            if digest in removed:
                continue
            if digest in added:
                entries.append((self._used[digest], digest, self._sizes[digest]))
            else:
                used = max(self._used.get(digest, 0.0), blob.last_access)
                entries.append((used, digest, blob.stored_size))
        for digest in added:
            if digest not in found and digest in self._sizes:
                entries.append((self._used[digest], digest, self._sizes[digest]))
        entries.sort(key=lambda entry: entry[0])
        self._sizes = OrderedDict((digest, size) for _, digest, size in entries)
        self._used = {digest: used for used, digest, _ in entries}
        self.total_bytes = sum(self._sizes.values())
        self._added_during_scan = set()
        self._removed_during_scan = set()
        await self._evict()

    async def _rescan_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.rescan()
            except Exception:  # keep rescanning; the next attempt may succeed
                log.exception("rescanning the store behind the size limit failed")

    # -- the BlobStore interface ----------------------------------------------

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
            elif digest in self._sizes:
                self._forget(digest)  # removed by another process
        return missing

    async def get(self, digest: Digest) -> bytes | None:
        data = await self.inner.get(digest)
        if data is not None:
            self._touch(digest)
        elif digest in self._sizes:
            self._forget(digest)
        return data

    async def open(self, digest: Digest) -> BlobReader | None:
        reader = await self.inner.open(digest)
        if reader is not None:
            self._touch(digest)
        elif digest in self._sizes:
            self._forget(digest)
        return reader

    async def put(self, digest: Digest, data: bytes) -> None:
        self._check_fits(digest, len(data))
        await self.inner.put(digest, data)
        self._remember(digest, len(data))
        await self._evict(keep=digest)

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """Store several blobs, each on its own: per blob, its error or None."""
        results: list[BuildfleetError | None] = [None] * len(blobs)
        fitting: list[int] = []
        for index, (digest, data) in enumerate(blobs):
            try:
                self._check_fits(digest, len(data))
                fitting.append(index)
            except ResourceExhausted as error:
                results[index] = error
        stored = await self.inner.put_batch([blobs[index] for index in fitting])
        for index, outcome in zip(fitting, stored, strict=True):
            results[index] = outcome
            if outcome is None:
                digest, data = blobs[index]
                self._remember(digest, len(data))
        if fitting:
            await self._evict(keep=blobs[fitting[-1]][0])
        return results

    async def begin_write(self, digest: Digest) -> BlobWriter:
        self._check_fits(digest, digest.size_bytes)
        return _CountingWriter(self, digest, await self.inner.begin_write(digest))

    async def delete(self, digest: Digest) -> bool:
        self._forget(digest)
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
        self.version = self._inner.version
        self._store._remember(self._digest, self._written)
        await self._store._evict(keep=self._digest)

    async def abort(self) -> None:
        await self._inner.abort()

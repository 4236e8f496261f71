"""A store taking over the blobs of an older one: `MigratingStore(store, old)`.

Used when a data directory written by an earlier version (one file per blob) is
served by a packed store now: at start-up the blobs of `old` up to
`max_blob_size` are moved into `store` in the background, a batch at a time
(copied, committed, then deleted from `old`).  Until the move has finished,
whatever `store` lacks is looked up in `old` too, so nothing stored before is
ever reported missing; new blobs go to `store` only.  A blob that cannot be read
from `old` while it moves is left there (and logged).  Once everything has moved,
a marker file says so and later starts skip the old directory.  (Every process
sharing the directory should run this version: an older one would go on writing
files that nobody reads once the move is done.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)

BATCH = 500


class MigratingStore(BlobStore):
    def __init__(self, store: BlobStore, old: BlobStore, *,
                 max_blob_size: int | None = None, done_marker: Path | None = None) -> None:
        """`done_marker`: a file made once every blob has moved (the factory then
        builds `store` alone on later starts)."""
        self.store = store
        self.old = old
        self.max_blob_size = max_blob_size
        self.done_marker = done_marker
        self.migrating = True  # while true, misses are looked up in `old` too
        self.moved = 0
        self._task: asyncio.Task[None] | None = None

    def _ours(self, digest: Digest) -> bool:
        return self.max_blob_size is None or digest.size_bytes <= self.max_blob_size

    async def start(self) -> None:
        await self.store.start()
        await self.old.start()
        self._task = asyncio.create_task(self._move())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.old.close()
        await self.store.close()

    async def wait_moved(self) -> None:
        """Until every blob of `old` that belongs here has moved (for tests)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def _move(self) -> None:
        try:
            batch: list[Digest] = []
            async for stored in self.old.scan():
                if self._ours(stored.digest):
                    batch.append(stored.digest)
                if len(batch) >= BATCH:
                    await self._move_batch(batch)
                    batch = []
            if batch:
                await self._move_batch(batch)
        except BuildfleetError as error:
            log.warning("moving blobs into the packed store stopped: %s (the old files "
                        "stay readable)", error.message)
            return
        self.migrating = False
        if self.done_marker is not None:
            try:
                self.done_marker.write_text(f"moved {self.moved} blobs\n")
            except OSError as error:
                log.warning("cannot write %s: %s", self.done_marker, error.strerror)
        if self.moved:
            log.info("moved %d blobs of the previous layout into the packed store",
                     self.moved)

    async def _move_batch(self, digests: list[Digest]) -> None:
        found = await self.old.get_many(digests)
        if not found:
            return
        errors = await self.store.put_batch(list(found.items()))
        for (digest, _), error in zip(found.items(), errors, strict=True):
            if error is not None:
                log.warning("could not move %s into the packed store: %s", digest,
                            error.message)
                continue
            await self.old.delete(digest)
            self.moved += 1

    # ------------------------------------------------------------ the store
    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        missing = await self.store.find_missing(digests)
        if not self.migrating or not missing:
            return missing
        candidates = [digest for digest in missing if self._ours(digest)]
        still = set(await self.old.find_missing(candidates)) if candidates else set()
        return [digest for digest in missing if not self._ours(digest) or digest in still]

    async def get(self, digest: Digest) -> bytes | None:
        data = await self.store.get(digest)
        if data is None and self.migrating and self._ours(digest):
            data = await self.old.get(digest)
        return data

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        wanted = list(digests)
        found = await self.store.get_many(wanted)
        if self.migrating:
            rest = [digest for digest in wanted if digest not in found and self._ours(digest)]
            if rest:
                found.update(await self.old.get_many(rest))
        return found

    async def open(self, digest: Digest) -> BlobReader | None:
        reader = await self.store.open(digest)
        if reader is None and self.migrating and self._ours(digest):
            reader = await self.old.open(digest)
        return reader

    async def put(self, digest: Digest, data: bytes) -> None:
        await self.store.put(digest, data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        await self.store.put_many(blobs)

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        return await self.store.put_batch(blobs)

    async def begin_write(self, digest: Digest) -> BlobWriter:
        return await self.store.begin_write(digest)

    async def delete(self, digest: Digest) -> bool:
        deleted = await self.store.delete(digest)
        if self.migrating and self._ours(digest):
            deleted = await self.old.delete(digest) or deleted
        return deleted

    async def scan(self) -> AsyncIterator[StoredBlob]:
        async for blob in self.store.scan():
            yield blob
        if self.migrating:
            async for blob in self.old.scan():
                if self._ours(blob.digest):
                    yield blob

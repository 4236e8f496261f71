"""Blobs split by size between two stores: `small` for blobs up to `threshold`
bytes, `large` for the rest.

A digest carries its blob's size, so every call goes to the one store that holds
(or would hold) the blob without asking the other: the usual use is a packed store
(`storage/packed.py`) for the many small blobs and a disk store for the large
ones, which stream from files.  Content-addressed blobs only: an action-cache
entry's key is the action's digest, whose size says nothing of the entry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob


class SizeSplitStore(BlobStore):
    def __init__(self, threshold: int, small: BlobStore, large: BlobStore) -> None:
        self.threshold = threshold
        self.small = small
        self.large = large

    def _for(self, digest: Digest) -> BlobStore:
        return self.small if digest.size_bytes <= self.threshold else self.large

    def _split(self, digests: Iterable[Digest]) -> tuple[list[Digest], list[Digest]]:
        small: list[Digest] = []
        large: list[Digest] = []
        for digest in digests:
            (small if digest.size_bytes <= self.threshold else large).append(digest)
        return small, large

    async def start(self) -> None:
        await self.small.start()
        try:
            await self.large.start()
        except BaseException:
            await self.small.close()
            raise

    async def close(self) -> None:
        try:
            await self.small.close()
        finally:
            await self.large.close()

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(digests)
        small, large = self._split(wanted)
        missing = set(await self.small.find_missing(small) if small else [])
        missing.update(await self.large.find_missing(large) if large else [])
        return [digest for digest in wanted if digest in missing]

    async def get(self, digest: Digest) -> bytes | None:
        return await self._for(digest).get(digest)

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        small, large = self._split(digests)
        found = await self.small.get_many(small) if small else {}
        if large:
            found.update(await self.large.get_many(large))
        return found

    async def open(self, digest: Digest) -> BlobReader | None:
        return await self._for(digest).open(digest)

    async def put(self, digest: Digest, data: bytes) -> None:
        await self._for(digest).put(digest, data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        for errors in [await self.put_batch(list(blobs))]:
            for error in errors:
                if error is not None:
                    raise error

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        small = [i for i, (digest, _) in enumerate(blobs) if digest.size_bytes <= self.threshold]
        large = [i for i, (digest, _) in enumerate(blobs) if digest.size_bytes > self.threshold]
        results: list[BuildfleetError | None] = [None] * len(blobs)
        for indexes, store in ((small, self.small), (large, self.large)):
            if indexes:
                answers = await store.put_batch([blobs[i] for i in indexes])
                for index, answer in zip(indexes, answers, strict=True):
                    results[index] = answer
        return results

    async def begin_write(self, digest: Digest) -> BlobWriter:
        return await self._for(digest).begin_write(digest)

    async def delete(self, digest: Digest) -> bool:
        return await self._for(digest).delete(digest)

    async def scan(self) -> AsyncIterator[StoredBlob]:
        async for blob in self.small.scan():
            yield blob
        async for blob in self.large.scan():
            yield blob

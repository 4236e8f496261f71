"""An in-process blob store: a dict.  Wrap it in SizeLimitedStore to bound it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable

from buildfleet.digest import Digest
from buildfleet.storage.base import (
    BlobReader,
    BlobStore,
    BlobWriter,
    BufferedWriter,
    BytesReader,
    StoredBlob,
)


class MemoryStore(BlobStore):
    """Blobs held in a dict; gone when the process exits."""

    def __init__(self) -> None:
        self._blobs: dict[Digest, bytes] = {}

    def __len__(self) -> int:
        return len(self._blobs)

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in digests if d not in self._blobs]

    async def get(self, digest: Digest) -> bytes | None:
        return self._blobs.get(digest)

    async def open(self, digest: Digest) -> BlobReader | None:
        data = self._blobs.get(digest)
        return None if data is None else BytesReader(data)

    async def put(self, digest: Digest, data: bytes) -> None:
        self._blobs[digest] = bytes(data)

    async def begin_write(self, digest: Digest) -> BlobWriter:
        async def store(data: bytes) -> None:
            self._blobs[digest] = data

        return BufferedWriter(store)

    async def delete(self, digest: Digest) -> bool:
        return self._blobs.pop(digest, None) is not None

    async def scan(self) -> AsyncIterator[StoredBlob]:
        now = time.time()
        for digest, data in list(self._blobs.items()):
            yield StoredBlob(digest, len(data), now)


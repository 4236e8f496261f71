"""A blob store in a local directory.

Layout: ``<root>/blobs/<first two hex digits>/<hash>-<size>``; writes go to a
private file under ``<root>/tmp`` and are renamed into place, so a reader never
sees a partial blob and a crash leaves at most a stray temporary file (removed
at the next start once it is old).  With ``fsync=True`` every blob is flushed to
the device before it becomes visible, at a large cost in small-blob throughput.

File I/O runs inline on the event loop: reads and writes of local files are
served from the page cache in microseconds, and a hop to a thread per blob would
cost more than it saves.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from buildfleet.digest import Digest
from buildfleet.errors import ResourceExhausted, Unavailable
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

STALE_TEMP_SECONDS = 3600


def _os_error(error: OSError, what: str) -> Exception:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the storage device is full")
    return Unavailable(f"{what}: {error.strerror or error}")


class DiskStore(BlobStore):
    """Blobs as files under one directory; survives restarts."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._fsync = fsync
        self._made_dirs: set[str] = set()
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> Path:
        """Where the blob lives (whether or not it is there)."""
        return self._blobs / digest.hash[:2] / f"{digest.hash}-{digest.size_bytes}"

    async def start(self) -> None:
        cutoff = time.time() - STALE_TEMP_SECONDS
        for entry in os.scandir(self._tmp):
            try:
                if entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        exists = os.path.exists
        return [d for d in digests if not exists(self.path(d))]

    async def get(self, digest: Digest) -> bytes | None:
        try:
            with open(self.path(digest), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _os_error(error, f"reading {digest}") from error

    async def open(self, digest: Digest) -> BlobReader | None:
        try:
            fd = os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _os_error(error, f"opening {digest}") from error
        return _FileReader(fd, os.fstat(fd).st_size)

    async def put(self, digest: Digest, data: bytes) -> None:
        writer = await self.begin_write(digest)
        try:
            await writer.write(data)
            await writer.commit()
        finally:
            await writer.abort()

    async def begin_write(self, digest: Digest) -> BlobWriter:
        temp = self._tmp / f"{digest.hash}-{uuid.uuid4().hex}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as error:
            raise _os_error(error, f"writing {digest}") from error
        return _FileWriter(self, fd, temp, self.path(digest), str(digest))

    def _ensure_parent(self, target: Path) -> None:
        parent = str(target.parent)
        if parent not in self._made_dirs:
            os.makedirs(parent, exist_ok=True)
            self._made_dirs.add(parent)

    async def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self.path(digest))
            return True
        except FileNotFoundError:
            return False

    async def scan(self) -> AsyncIterator[StoredBlob]:
        for shard in sorted(os.scandir(self._blobs), key=lambda e: e.name):
            if not shard.is_dir():
                continue
            for entry in os.scandir(shard.path):
                name, _, size = entry.name.partition("-")
                try:
                    digest = Digest.parse(name, int(size))
                    stat = entry.stat()
                except (ValueError, FileNotFoundError):
                    continue
                yield StoredBlob(digest, stat.st_size, stat.st_mtime)


class _FileReader(BlobReader):
    def __init__(self, fd: int, size: int) -> None:
        self._fd: int | None = fd
        self.size = size

    async def read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            raise ValueError("reader is closed")
        return os.pread(self._fd, length, offset)

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class _FileWriter(BlobWriter):
    def __init__(self, store: DiskStore, fd: int, temp: Path, target: Path, what: str) -> None:
        self._store = store
        self._fd: int | None = fd
        self._temp = temp
        self._target = target
        self._what = what

    async def write(self, data: bytes) -> None:
        if self._fd is None:
            raise RuntimeError("write after commit or abort")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as error:
            await self.abort()
            raise _os_error(error, f"writing {self._what}") from error

    async def commit(self) -> None:
        if self._fd is None:
            raise RuntimeError("commit after commit or abort")
        fd, self._fd = self._fd, None
        try:
            try:
                if self._store._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._store._ensure_parent(self._target)
            try:
                os.replace(self._temp, self._target)
            except FileNotFoundError:  # the shard directory was removed under us
                os.makedirs(self._target.parent, exist_ok=True)
                os.replace(self._temp, self._target)
        except OSError as error:
            self._discard()
            raise _os_error(error, f"storing {self._what}") from error

    async def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            self._discard()

    def _discard(self) -> None:
        try:
            os.unlink(self._temp)
        except FileNotFoundError:
            pass

"""The bot's local content-addressed file cache: hard links, bounded size, LRU.

Input files are kept under the cache directory as ``<hh>/<hash>-<size>`` (mode
0444) and, for executables, ``<hh>/<hash>-<size>-x`` (mode 0555): the mode
belongs to the inode, so each variant is a file of its own.  Actions get hard
links to these files, so an input used again is neither downloaded nor copied;
when the cache is on another file system than the work directory (or the link
count is exhausted) the file is copied instead.

Because hard links share the inode, an action that writes to an input would
change the cached copy (read-only modes stop ordinary users, not root).  Each
entry therefore remembers its size, mode and modification time; an entry that no
longer matches is treated as absent, removed and fetched again.

Entries are evicted least recently used first once the total size exceeds
`max_bytes`; entries pinned by an action being set up are not evicted until it
has linked them.  Concurrent requests for the same blob share one download.
Counters (`stats`) say how many files were found in the cache (hits) and how
many had to be downloaded (misses).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import stat
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from buildfleet.client.cas import CasClient
from buildfleet.digest import Digest

log = logging.getLogger(__name__)

READ_ONLY = 0o444
EXECUTABLE = 0o555
CacheKey = tuple[Digest, bool]  # (digest, is_executable)


@dataclass
class CacheStats:
    """Counters since the bot started."""

    hits: int = 0  # files served from the cache
    misses: int = 0  # files that had to be downloaded
    bytes_downloaded: int = 0
    evictions: int = 0
    invalidated: int = 0  # entries found modified and thrown away
    links: int = 0
    copies: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class _Entry:
    size: int
    mtime_ns: int
    mode: int


@dataclass
class Fetch:
    """What one `ensure` call did: paths to link from, and its own hit/miss counts."""

    paths: dict[CacheKey, Path] = field(default_factory=dict)
    pinned: list[CacheKey] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    bytes_downloaded: int = 0


class LocalCache:
    """A bounded, LRU, content-addressed cache of input files under `root`."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._size = 0
        self._pins: Counter[CacheKey] = Counter()
        self._downloads: dict[Digest, asyncio.Future[None]] = {}
        self._tmp = root / "tmp"

    # -- life ---------------------------------------------------------------------

    def open(self) -> None:
        """Create the directory and index what a previous run left (blocking)."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir()
        found: list[tuple[int, CacheKey, _Entry]] = []
        for bucket in self.root.iterdir():
            if bucket == self._tmp or not bucket.is_dir() or len(bucket.name) != 2:
                continue
            for path in bucket.iterdir():
                key = _parse_name(path.name)
                info = path.lstat()
                if (key is None or not stat.S_ISREG(info.st_mode)
                        or info.st_size != key[0].size_bytes
                        or stat.S_IMODE(info.st_mode) != _mode(key[1])):
                    path.unlink(missing_ok=True)
                    continue
                found.append((info.st_atime_ns, key,
                              _Entry(info.st_size, info.st_mtime_ns, info.st_mode)))
        for _, key, entry in sorted(found, key=lambda item: item[0]):
            self._entries[key] = entry
            self._size += entry.size
        self._evict()
        if self._entries:
            log.info("local cache %s: %d files, %d bytes", self.root, len(self._entries),
                     self._size)

    @property
    def size(self) -> int:
        return self._size

    def __len__(self) -> int:
        return len(self._entries)

    def path(self, key: CacheKey) -> Path:
        digest, executable = key
        name = f"{digest.hash}-{digest.size_bytes}" + ("-x" if executable else "")
        return self.root / digest.hash[:2] / name

    # -- lookups --------------------------------------------------------------------

    def _valid(self, key: CacheKey) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        try:
            info = self.path(key).lstat()
        except FileNotFoundError:
            info = None
        if (info is not None and info.st_size == entry.size
                and info.st_mtime_ns == entry.mtime_ns and info.st_mode == entry.mode):
            self._entries.move_to_end(key)
            return True
        log.warning("local cache: %s was modified or removed; fetching it again", key[0])
        self.stats.invalidated += 1
        self._drop(key)
        return False

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._size -= entry.size
        with contextlib.suppress(FileNotFoundError):
            self.path(key).unlink()

    def _add(self, key: CacheKey, path: Path) -> None:
        """Record `path` (already in place at self.path(key)) as an entry."""
        info = path.lstat()
        old = self._entries.pop(key, None)
        if old is not None:
            self._size -= old.size
        self._entries[key] = _Entry(info.st_size, info.st_mtime_ns, info.st_mode)
        self._size += info.st_size

    def _evict(self) -> None:
        if self._size <= self.max_bytes:
            return
        for key in list(self._entries):
            if self._size <= self.max_bytes:
                break
            if self._pins[key]:
                continue
            self._drop(key)
            self.stats.evictions += 1

    # -- filling -----------------------------------------------------------------------

    async def ensure(self, keys: Iterable[CacheKey], cas: CasClient) -> Fetch:
        """Make every (digest, executable) file present and pin it; download what lacks.

        Call `release(fetch)` once the files are linked.  Raises what the
        download raises (MissingBlobs...), after releasing its pins.
        """
        fetch = Fetch()
        wanted = list(dict.fromkeys(keys))
        for key in wanted:
            fetch.paths[key] = self.path(key)
        # Downloads land as the plain variant, from which an executable one is copied.
        fetch.pinned = list(dict.fromkeys([*wanted, *((key[0], False) for key in wanted)]))
        for key in fetch.pinned:
            self._pins[key] += 1
        try:
            await self._fill(wanted, cas, fetch)
        except BaseException:
            self.release(fetch)
            raise
        return fetch

    async def _fill(self, wanted: list[CacheKey], cas: CasClient, fetch: Fetch) -> None:
        need: list[CacheKey] = []
        for key in wanted:
            if self._valid(key):
                fetch.hits += 1
            else:
                need.append(key)
        if not need:
            self.stats.hits += fetch.hits
            return
        # A digest cached as the other variant is copied locally, not downloaded.
        digests = list(dict.fromkeys(key[0] for key in need))
        to_download = [d for d in digests
                       if not self._valid((d, False)) and not self._valid((d, True))]
        mine: dict[Digest, asyncio.Future[None]] = {}
        waits: list[asyncio.Future[None]] = []
        for digest in to_download:
            pending = self._downloads.get(digest)
            if pending is None:
                future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._downloads[digest] = future
                mine[digest] = future
            else:
                waits.append(pending)
        try:
            if mine:
                await self._download(list(mine), cas)
                for digest in mine:
                    fetch.bytes_downloaded += digest.size_bytes
        except BaseException as error:
            for future in mine.values():
                if not future.done():
                    future.set_exception(error if isinstance(error, Exception)
                                         else RuntimeError("download interrupted"))
                    future.exception()  # retrieved: waiters re-raise it themselves
            raise
        else:
            for future in mine.values():
                if not future.done():
                    future.set_result(None)
        finally:
            for digest in mine:
                self._downloads.pop(digest, None)
        if waits:
            await asyncio.gather(*waits)
        for key in need:
            if not self._valid(key):
                await asyncio.to_thread(self._make_variant, key)
                self._add(key, self.path(key))
        downloaded = set(mine)  # a download shared with another request counts as a hit
        for key in need:
            if key[0] in downloaded:
                fetch.misses += 1
            else:
                fetch.hits += 1
        self.stats.hits += fetch.hits
        self.stats.misses += fetch.misses
        self.stats.bytes_downloaded += fetch.bytes_downloaded
        self._evict()

    async def _download(self, digests: list[Digest], cas: CasClient) -> None:
        temporary = {d: self._tmp / f"{uuid.uuid4().hex}" for d in digests}
        try:
            empty = [d for d in digests if d.is_empty()]
            if empty:
                await asyncio.to_thread(_touch_all, [temporary[d] for d in empty])
            await cas.download([d for d in digests if not d.is_empty()], temporary.__getitem__)
            for key in await asyncio.to_thread(self._commit_all, temporary):
                self._add(key, self.path(key))
        finally:
            for path in temporary.values():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _commit_all(self, temporary: dict[Digest, Path]) -> list[CacheKey]:
        """Move downloaded files into place (blocking; the index is updated by the caller)."""
        placed: list[CacheKey] = []
        for digest, source in temporary.items():
            key = (digest, False)
            target = self.path(key)
            target.parent.mkdir(exist_ok=True)
            os.chmod(source, READ_ONLY)
            os.replace(source, target)
            placed.append(key)
        return placed

    def _make_variant(self, key: CacheKey) -> None:
        """Create the file for `key` from the other variant of the same digest (blocking)."""
        digest, executable = key
        source = self.path((digest, not executable))
        target = self.path(key)
        scratch = self._tmp / uuid.uuid4().hex
        shutil.copyfile(source, scratch)
        os.chmod(scratch, _mode(executable))
        os.replace(scratch, target)

    def release(self, fetch: Fetch) -> None:
        """Unpin the files of `fetch` (they may be evicted again)."""
        for key in fetch.pinned:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]
        self._evict()

    # -- linking (blocking; run in a thread) -------------------------------------------

    def link(self, key: CacheKey, destination: Path) -> None:
        """Put the cached file at `destination`: a hard link, or a copy if linking fails."""
        source = self.path(key)
        try:
            os.link(source, destination)
            self.stats.links += 1
            return
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES):
                raise
        shutil.copyfile(source, destination)
        os.chmod(destination, _mode(key[1]))
        self.stats.copies += 1

    def keys(self) -> Iterator[CacheKey]:
        return iter(list(self._entries))


def _touch_all(paths: list[Path]) -> None:
    for path in paths:
        path.touch()


def _mode(executable: bool) -> int:
    return EXECUTABLE if executable else READ_ONLY


def _parse_name(name: str) -> CacheKey | None:
    parts = name.split("-")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "x"):
        return None
    hash_, size = parts[0], parts[1]
    if len(hash_) != 64 or not size.isdigit():
        return None
    try:
        int(hash_, 16)
    except ValueError:
        return None
    return Digest(hash_, int(size)), len(parts) == 3

"""Many small blobs in one SQLite database (WAL mode): no file per blob.

A real build is mostly small blobs (Action, Command and Directory messages, small
sources, one action-cache entry per action), and on a shared virtual disk creating
a file costs from tens of microseconds to milliseconds: more than everything else a
small blob costs.  This store keeps them as rows of one table instead.

- **Writes are grouped.**  Every write (a `put`, a whole `put_batch`) joins the
  queue of the store's writer thread, which commits whatever has queued up in one
  transaction: a BatchUpdateBlobs of 500 blobs is one commit, and concurrent calls
  share commits.  A write is acknowledged once its transaction has committed.
- **Nothing half-written is ever visible**, also after a crash: a blob is a row,
  and a row is in the database once its transaction commits, or not at all (WAL
  journaling; with `fsync` also across power loss, `synchronous=FULL`).
- **Lookups never touch blob data**: FindMissingBlobs reads an index of (hash,
  size) only, and reads take many blobs per query, without opening anything.
  Keys found stored, read from the index at start-up, or committed after the
  first FindMissingBlobs, are remembered until any process deletes a blob (each
  deletion counts itself in the database, in its own transaction): asking for
  blobs that are there, the usual question before a build, then costs no query at
  all.
- **Several processes** (the replicas on one machine) may share one database
  file: SQLite locks it, WAL lets readers go on while one process writes, and
  every connection waits for a busy lock (`busy_timeout`) rather than failing.
- **Space is reclaimed** without stopping anyone: the database is created with
  incremental auto-vacuum, and after deletions (evictions) the writer returns the
  free pages to the file system in small steps between other writes.
- Use is recorded (`last_access`, refreshed at most once a minute per blob, on
  the writer thread) so that `scan` orders eviction of a size-limited wrapper
  (`max-size`) by the last use in any process.

Small lookups and small commits (an action-cache entry, a Directory message) run
on the event loop: SQLite does them in microseconds, less than a hand-off to a
thread costs, and the loop's writer never waits for another process's lock (a busy
database sends the commit to the writer thread).  Larger lookups run on a reader
thread with a connection of its own (WAL readers do not wait for the writer),
larger commits on the writer thread.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, ResourceExhausted, Unavailable
from buildfleet.storage.base import StoredBlob, WholeBlobStore

log = logging.getLogger(__name__)

T = TypeVar("T")

TOUCH_AFTER = 60.0  # a blob's recorded last use is refreshed when older than this
_QUERY_BATCH = 500  # digests per lookup statement (well under SQLite's 32,766 variables)
_VACUUM_AFTER = 256  # pages freed by deletions (1 MiB of 4 KiB pages) before a step
_VACUUM_PAGES = 4096  # at most this many free pages handed back per step (16 MiB)
BUSY_TIMEOUT_MS = 30_000
SEEN_LIMIT = 500_000  # keys remembered as stored (about 80 MB at most)
INLINE_DIGESTS = 16  # lookups of at most this many digests run on the event loop
INLINE_WRITE_BYTES = 256 * 1024  # commits of at most this much data, too
READER_CACHE_KIB = 64 * 1024  # the reader's page cache (SQLite's default is 2 MiB)
READER_MMAP = 256 * 1024 * 1024  # bytes of the file the reader maps instead of reading

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    last_access REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS blobs_digest ON blobs (hash, size);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('deletions', 0);
"""
DELETIONS = "SELECT value FROM meta WHERE key = 'deletions'"


def _key(digest: Digest) -> tuple[str, int]:
    return digest.hash, digest.size_bytes


def _digest(hash_: str, size: int) -> Digest:
    return Digest(hash_, size)


class PackedStore(WholeBlobStore):
    """Blobs as rows of one SQLite database file at `path`."""

    def __init__(self, path: Path, *, fsync: bool = False) -> None:
        self.path = path
        self.fsync = fsync
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader_thread: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        # The event loop's own connections, for small lookups and small commits: a
        # row or two costs SQLite microseconds, less than a hand-off to a thread (and
        # the wait for the GIL back).  The inline writer never waits for another
        # process's lock: when the database is busy the commit goes to the thread.
        self._inline_reader: sqlite3.Connection | None = None
        self._inline_writer: sqlite3.Connection | None = None
        # Keys known to be stored: found by lookups or committed by this process's
        # writer.  Only a deletion can make one wrong, and every deletion counts itself
        # in the `meta` table in its own transaction: the keys hold while that count
        # stays `_seen_deletions` (in every process sharing the file).
        self._seen: set[tuple[str, int]] = set()
        self._seen_deletions: int | None = None
        self._asked = False  # whether FindMissingBlobs has asked this store
        self._queue: list[tuple[Callable[[sqlite3.Connection], object],
                                asyncio.Future[None]]] = []
        self._queued_bytes = 0
        self._draining: asyncio.Task[None] | None = None
        self._opening: asyncio.Future[None] | None = None
        self._freed = 0  # pages (about) freed by deletions since the last vacuum step
        self.commits = 0  # transactions committed by this process (group commits)
        self._lock = threading.Lock()

    # -------------------------------------------------------------- set-up
    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000,
                                     isolation_level=None, check_same_thread=False)
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        connection.execute(f"PRAGMA synchronous = {'FULL' if self.fsync else 'NORMAL'}")
        return connection

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = self._connect()
        # Before the first table exists: how free pages are handed back (see above).
        writer.execute("PRAGMA auto_vacuum = INCREMENTAL")
        writer.execute("PRAGMA journal_mode = WAL")
        writer.executescript(SCHEMA)
        self._writer = writer
        reader = self._connect()
        # Lookups walk the (hash, size) index: keep it in memory, not re-read.
        reader.execute(f"PRAGMA cache_size = -{READER_CACHE_KIB}")
        reader.execute(f"PRAGMA mmap_size = {READER_MMAP}")
        (self._seen_deletions,) = reader.execute(DELETIONS).fetchone()
        self._reader = reader
        self._inline_reader = self._connect()
        inline_writer = self._connect()
        inline_writer.execute("PRAGMA busy_timeout = 0")
        self._inline_writer = inline_writer

    async def start(self) -> None:
        """Open the database (creating it); the first use opens it too."""
        if self._writer is not None:
            return
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._start())
        try:
            await asyncio.shield(self._opening)
        finally:
            if self._opening.done():
                self._opening = None

    async def _start(self) -> None:
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="packed-writer")
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="packed-reader")
        try:
            await self._run(self._writer_thread, self._open)
        except BuildfleetError:
            await self.close()
            raise
        # Learn the stored keys from the index, behind the first lookups (which the
        # reader thread serves in turn): a server started afresh answers
        # FindMissingBlobs from memory too.
        self._reader_thread.submit(self._preload)

    def _preload(self) -> None:
        try:
            connection = self._read_connection()
            (deletions,) = connection.execute(DELETIONS).fetchone()
            keys = connection.execute(
                f"SELECT hash, size FROM blobs LIMIT {SEEN_LIMIT // 2}").fetchall()
        except sqlite3.Error as error:
            log.debug("the packed store %s: not preloading its keys: %s", self.path, error)
            return
        self._remember(keys, deletions)

    async def close(self) -> None:
        if self._draining is not None:
            await asyncio.shield(self._draining)
        for attribute in ("_writer_thread", "_reader_thread"):
            executor = getattr(self, attribute)
            if executor is not None:
                executor.shutdown(wait=True)
                setattr(self, attribute, None)
        for attribute in ("_reader", "_inline_reader", "_inline_writer"):
            connection = getattr(self, attribute)
            if connection is not None:
                connection.close()
                setattr(self, attribute, None)
        with self._lock:
            self._seen.clear()
            self._seen_deletions = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _on(self, which: str, func: Callable[[], T]) -> T:
        """`func` on the writer or the reader thread."""
        if self._writer is None:
            await self.start()
        return await self._run(getattr(self, f"_{which}_thread"), func)

    async def _run(self, executor: ThreadPoolExecutor | None, func: Callable[[], T]) -> T:
        if executor is None:
            raise Unavailable(f"the packed store {self.path} is closed")
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, func)
        except sqlite3.Error as error:
            raise self._error(error) from None

    def _error(self, error: sqlite3.Error) -> BuildfleetError:
        if "full" in str(error):  # SQLITE_FULL: the disk
            return ResourceExhausted(f"the packed store {self.path}: {error}")
        return Unavailable(f"the packed store {self.path}: {error}")

    async def _inline(self, func: Callable[[sqlite3.Connection], T]) -> T:
        """`func(connection)` on the event loop with its own reading connection."""
        if self._inline_reader is None:
            await self.start()
        connection = self._inline_reader
        if connection is None:
            raise Unavailable(f"the packed store {self.path} is closed")
        try:
            return func(connection)
        except sqlite3.Error as error:
            raise self._error(error) from None

    def _read_connection(self) -> sqlite3.Connection:
        if self._reader is None:
            raise sqlite3.OperationalError("the store is closed")
        return self._reader

    # -------------------------------------------------------------- writes
    async def _write(self, work: Callable[[sqlite3.Connection], object], size: int = 0
                     ) -> None:
        """Run `work` (writing about `size` bytes) in the next group commit; returns
        once it has committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((work, future))
        self._queued_bytes += size
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        await future

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                size, self._queued_bytes = self._queued_bytes, 0
                try:
                    if size > INLINE_WRITE_BYTES or not self._commit_inline(group):
                        await self._on("writer", functools.partial(self._commit, group))
                except BuildfleetError as error:
                    for _, future in group:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for _, future in group:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._draining = None

    def _commit_inline(self, group: list[tuple[Callable[[sqlite3.Connection], object],
                                               asyncio.Future[None]]]) -> bool:
        """Commit a small group on the event loop; False when another connection holds
        the write lock (the writer thread then waits for it)."""
        if self._inline_writer is None:
            return False
        try:
            self._commit(group, self._inline_writer)
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                return False
            raise self._error(error) from None
        except sqlite3.Error as error:
            raise self._error(error) from None
        return True

    def _commit(self, group: list[tuple[Callable[[sqlite3.Connection], object],
                                        asyncio.Future[None]]],
                connection: sqlite3.Connection | None = None) -> None:
        """One transaction for the whole group (on the writer thread, or inline)."""
        connection = connection or self._writer
        if connection is None:
            raise sqlite3.OperationalError("the store is closed")
        connection.execute("BEGIN IMMEDIATE")
        try:
            for work, _ in group:
                work(connection)
            connection.execute("COMMIT")
            self.commits += 1
        except BaseException:
            # SQLite may have rolled back already (a full disk does): the error that
            # stopped the transaction is the one to report, not ROLLBACK's
            if connection.in_transaction:
                connection.execute("ROLLBACK")
            raise
        if self._freed >= _VACUUM_AFTER:
            self._freed = 0
            connection.execute(f"PRAGMA incremental_vacuum({_VACUUM_PAGES})").fetchall()

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        now = time.time()
        rows = [(*_key(digest), bytes(data), now) for digest, data in blobs]
        if not rows:
            return

        deletions = 0

        def insert(connection: sqlite3.Connection) -> None:
            nonlocal deletions
            connection.executemany(
                "INSERT INTO blobs (hash, size, data, last_access) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (hash, size) DO UPDATE SET data = excluded.data, "
                "last_access = excluded.last_access", rows)
            (deletions,) = connection.execute(DELETIONS).fetchone()

        await self._write(insert, sum(len(row[2]) for row in rows))
        self._remember([(row[0], row[1]) for row in rows], deletions, written=True)

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """The whole batch in one commit (shared with concurrent writers)."""
        try:
            await self.put_many(blobs)
        except BuildfleetError as error:
            return [error] * len(blobs)
        return [None] * len(blobs)

    async def delete(self, digest: Digest) -> bool:
        deleted = False

        def remove(connection: sqlite3.Connection) -> None:
            nonlocal deleted
            cursor = connection.execute("DELETE FROM blobs WHERE hash = ? AND size = ?",
                                        _key(digest))
            deleted = cursor.rowcount > 0
            if deleted:
                connection.execute(
                    "UPDATE meta SET value = value + 1 WHERE key = 'deletions'")
                self._freed += 1 + digest.size_bytes // 4096

        await self._write(remove)
        return deleted

    def _touch_later(self, stale: list[Digest]) -> None:
        """Record the use of blobs whose last use is old (not waited for: a read
        stays a read)."""
        if not stale or self._writer is None:
            return
        now = time.time()
        keys = [(now, *_key(digest)) for digest in stale]

        def touch(connection: sqlite3.Connection) -> None:
            connection.executemany(
                "UPDATE blobs SET last_access = ? WHERE hash = ? AND size = ?", keys)

        task = asyncio.ensure_future(self._write(touch))
        task.add_done_callback(_log_touch_failure)

    # --------------------------------------------------------------- reads
    def _lookup(self, digests: list[Digest], columns: str,
                connection: sqlite3.Connection | None = None) -> list[tuple[Any, ...]]:
        """Rows (hash, size, *columns) of the stored blobs among `digests`."""
        connection = connection or self._read_connection()
        rows: list[tuple[Any, ...]] = []
        for start in range(0, len(digests), _QUERY_BATCH):
            batch = digests[start:start + _QUERY_BATCH]
            wanted = set(batch)  # Digests: (hash, size) tuples
            rows.extend(row for row in connection.execute(
                f"SELECT hash, size{columns} FROM blobs "
                f"WHERE hash IN ({','.join('?' * len(batch))})", [d.hash for d in batch])
                if (row[0], row[1]) in wanted)
        return rows

    def _missing(self, wanted: list[Digest], connection: sqlite3.Connection | None = None
                 ) -> list[Digest]:
        """The digests among `wanted` that are not stored (on the reader thread, or
        inline): one index-only query per batch of those not known to be stored."""
        connection = connection or self._read_connection()
        (deletions,) = connection.execute(DELETIONS).fetchone()
        self._asked = True
        with self._lock:
            if deletions != self._seen_deletions or len(self._seen) > SEEN_LIMIT:
                self._seen.clear()
                self._seen_deletions = deletions
            seen = self._seen
            # A Digest is a (hash, size) tuple: it compares equal to its row.
            unknown = [digest.hash for digest in wanted if digest not in seen]
        found: list[tuple[str, int]] = []
        full = ",".join("?" * _QUERY_BATCH)
        for start in range(0, len(unknown), _QUERY_BATCH):
            batch = unknown[start:start + _QUERY_BATCH]
            marks = full if len(batch) == _QUERY_BATCH else ",".join("?" * len(batch))
            found.extend(connection.execute(
                f"SELECT hash, size FROM blobs WHERE hash IN ({marks})", batch))
        with self._lock:
            if self._seen_deletions == deletions:
                seen.update(found)
        present = set(found)
        return [digest for digest in wanted if digest not in seen and digest not in present]

    def _remember(self, keys: list[tuple[str, int]], deletions: int, *,
                  written: bool = False) -> None:
        """Keys known to be stored as of the deletion count `deletions`.  Keys just
        `written` only once FindMissingBlobs has asked this store (a client asks
        before it uploads; an action cache is never asked, and remembers no entry)."""
        with self._lock:
            if written and not self._asked:
                return
            if self._seen_deletions == deletions and len(self._seen) < SEEN_LIMIT:
                self._seen.update(keys)

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(digests)
        if not wanted:
            return []
        if len(wanted) <= INLINE_DIGESTS:
            return await self._inline(lambda connection: self._missing(wanted, connection))
        return await self._on("reader", lambda: self._missing(wanted))

    async def get_many(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        unique = list(dict.fromkeys(digests))
        if not unique:
            return {}
        columns = ", data, last_access"
        if len(unique) <= INLINE_DIGESTS:
            rows = await self._inline(lambda connection: self._lookup(unique, columns,
                                                                      connection))
        else:
            rows = await self._on("reader", lambda: self._lookup(unique, columns))
        found: dict[Digest, bytes] = {}
        stale: list[Digest] = []
        cutoff = time.time() - TOUCH_AFTER
        for hash_, size, data, last_access in rows:
            digest = _digest(hash_, size)
            found[digest] = bytes(data)
            if last_access < cutoff:
                stale.append(digest)
        self._touch_later(stale)
        return found

    async def scan(self) -> AsyncIterator[StoredBlob]:
        def everything() -> list[tuple[str, int, int, float]]:
            return list(self._read_connection().execute(
                "SELECT hash, size, length(data), last_access FROM blobs"))

        for hash_, size, stored, last_access in await self._on("reader",
                                                               everything):
            yield StoredBlob(_digest(hash_, size), stored, last_access)


def _log_touch_failure(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not record the use of blobs: %s", task.exception())

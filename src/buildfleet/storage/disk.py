"""A blob store in a local directory, safe for several processes sharing it.

Layout: ``<root>/blobs/<first two hex digits>/<hash>-<size>``, one file per blob,
and ``<root>/tmp`` for the temporary files of streamed writes.  Several server
processes (replicas on one machine, or on several machines sharing a volume) may
use the same directory at once:

- A blob becomes visible in one atomic step, so a reader never sees part of one.
  A whole blob (`put`, `put_batch`) is written to an anonymous file (``O_TMPFILE``,
  in ``tmp``) and linked into place: it has no name until it is complete, and
  vanishes by itself if the process dies.  A streamed write goes to a named
  temporary file under ``tmp`` (it may be resumed later) and is renamed into
  place.  Where the name is taken already (another process stored the same blob
  first, or a blob is stored again) the new file replaces the old one with a
  rename, so concurrent writers of one blob all succeed, and readers see either
  copy.  Filesystems without ``O_TMPFILE`` use the temporary-file-and-rename path
  for everything.
- A reader holds an open file: a blob deleted or replaced by another process
  while it is read goes on reading the bytes it opened.  A blob deleted between
  a lookup and the open is reported missing, never as an error.
- Temporary file names are unique across processes and machines:
  ``<hash>.<node>.<pid>.<random>.tmp``, where ``node`` identifies the kernel
  boot and PID namespace.  At start-up a store removes the temporary files of
  processes of its own node that are no longer running (a crash leaves them
  behind) and, from other nodes, only files untouched for STALE_TEMP_SECONDS
  (longer than an upload may stay idle), so it never deletes the in-progress
  file of another live process.
- Use refreshes a blob's modification time (at most once per TOUCH_INTERVAL), so
  `scan` reports when any process last used a blob, not only when it was
  written; size-limited stores order eviction by it.

With ``fsync=True`` every blob and the directory entry naming it are flushed to
the device before the write is acknowledged.

Readers, and streamed writers once committed, report a `version` of the file:
(device, inode, size, change time in nanoseconds).  Writing to the file,
truncating it or replacing it changes the version, so the CAS can skip hashing
again a blob it verified and that has not changed since (see
buildfleet.storage.cas).  Versions are reported only where that holds:
`start()` checks that the file system gives a file a new change time however
soon it changes after one was read (recent Linux kernels do, with multigrain
timestamps; older ones may repeat a timestamp for a few milliseconds), and
otherwise reports none.

Reads, lookups and single small blobs are handled inline on the event loop
(page-cache reads and writes take microseconds).  Creating a file costs tens of
microseconds to milliseconds (see bench/RESULTS.md), so a batch of whole blobs is
written by the store's I/O threads (`io_threads`, two by default), as are large
blobs and large streamed chunks.  The store may also be used from other threads.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from buildfleet.digest import Digest
from buildfleet.errors import BuildfleetError, ResourceExhausted, Unavailable
from buildfleet.storage.base import BlobReader, BlobStore, BlobWriter, StoredBlob

log = logging.getLogger(__name__)

T = TypeVar("T")

# A temporary file of another node (or of unknown origin) is removed at start-up
# once it has not been written to for this long.  Longer than ByteStream's idle
# timeout, after which an unfinished upload is aborted anyway.
STALE_TEMP_SECONDS = 3600
# A temporary file of this node whose process looks alive is kept, unless it is
# this old (the process id has then surely been reused).
ORPHAN_TEMP_SECONDS = 7 * 24 * 3600
# A blob read or looked up is given a fresh modification time when its current
# one is older than this, so that every process sees how recently it was used.
TOUCH_INTERVAL = 900
# Chunks of a streamed write at least this large are written by an I/O thread.
OFFLOAD_BYTES = 256 * 1024
DEFAULT_IO_THREADS = 2
# A batch is split among I/O threads in groups of at least this many blobs.
_MIN_GROUP = 16

_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# Errors of open(O_TMPFILE) or of linking /proc/self/fd that mean the feature is
# not available here (rather than a real failure to store).
_NO_TMPFILE = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.EXDEV,
                         errno.EPERM, errno.ENOSYS})
_ESTALE = getattr(errno, "ESTALE", -1)
# Any directory descriptor: passing one makes os.link call linkat(2), which can
# follow /proc/self/fd/N to an anonymous file (see DiskStore._put_anonymous).
_link_dir_fd: int | None = None
_link_dir_lock = threading.Lock()


def _any_dir_fd() -> int:
    global _link_dir_fd
    with _link_dir_lock:
        if _link_dir_fd is None:
            _link_dir_fd = os.open("/", os.O_RDONLY | _O_CLOEXEC)
        return _link_dir_fd


def _os_error(error: OSError, what: str) -> BuildfleetError:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the storage device is full")
    return Unavailable(f"{what}: {error.strerror or error}")


def _node_id() -> str | None:
    """What identifies this kernel boot and PID namespace, or None when unknown.

    Two processes with the same node id see each other's process ids, so one
    can tell whether the other is still running."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None
    return hashlib.sha256(f"{boot}/{namespace}".encode()).hexdigest()[:12]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class DiskStore(BlobStore):
    """Blobs as files under one directory; survives restarts; see the module docstring."""

    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = False,
                 io_threads: int = DEFAULT_IO_THREADS) -> None:
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._tmp = self.root / "tmp"
        self._blobs_dir = os.fspath(self._blobs)
        self._tmp_dir = os.fspath(self._tmp)
        self._fsync = fsync
        self._io_threads = max(1, io_threads)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._made_dirs: set[str] = set()
        self._use_tmpfile = bool(_O_TMPFILE)
        self._node = _node_id()
        self._versions = False  # whether files report versions (checked by `start`)
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)

    # -- paths and helpers ----------------------------------------------------

    def path(self, digest: Digest) -> Path:
        """Where the blob lives (whether or not it is there)."""
        return self._blobs / digest.hash[:2] / f"{digest.hash}-{digest.size_bytes}"

    def _shard(self, digest: Digest) -> str:
        return f"{self._blobs_dir}/{digest.hash[:2]}"

    def _file(self, digest: Digest) -> str:
        return f"{self._blobs_dir}/{digest.hash[:2]}/{digest.hash}-{digest.size_bytes}"

    def _temp_name(self, digest: Digest) -> str:
        return (f"{self._tmp_dir}/{digest.hash}.{self._node or 'unknown'}.{os.getpid()}."
                f"{secrets.token_hex(8)}.tmp")

    def _ensure_dir(self, directory: str) -> None:
        if directory not in self._made_dirs:
            os.makedirs(directory, exist_ok=True)
            self._made_dirs.add(directory)

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._executor_lock:  # the store may be used from several threads
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(
                        self._io_threads, thread_name_prefix="disk-store-io")
                executor = self._executor
        return executor

    async def _in_thread(self, func: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), func)

    def _sync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | _O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _touch(target: int | str, mtime: float, now: float) -> bool:
        """Refresh the modification time if it is old; whether it was refreshed."""
        if now - mtime > TOUCH_INTERVAL:
            try:
                os.utime(target)
                return True
            except OSError:  # read-only, or gone: recency is only a hint
                pass
        return False

    def _version(self, stat: os.stat_result) -> Hashable | None:
        if not self._versions:
            return None
        return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_ctime_ns)

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        await self._in_thread(self._clean_temp_files)
        self._versions = await self._in_thread(
            lambda: change_times_are_fine_grained(self._tmp_dir))

    def _clean_temp_files(self) -> None:
        """Remove temporary files that no live writer will ever finish."""
        now = time.time()
        own_pid = os.getpid()
        try:
            entries = list(os.scandir(self._tmp_dir))
        except FileNotFoundError:
            os.makedirs(self._tmp_dir, exist_ok=True)
            return
        for entry in entries:
            try:
                age = now - entry.stat().st_mtime
            except FileNotFoundError:
                continue
            parts = entry.name.split(".")
            if (self._node is not None and len(parts) == 5 and parts[1] == self._node
                    and parts[2].isdigit()):
                pid = int(parts[2])
                if pid == own_pid or (_pid_alive(pid) and age < ORPHAN_TEMP_SECONDS):
                    continue  # still being written by a live process of this node
            elif age < STALE_TEMP_SECONDS:
                continue  # maybe another machine's upload in progress
            log.info("removing the temporary file %s left behind by a writer that is gone",
                     entry.path)
            _unlink_quietly(entry.path)

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    # -- reads ----------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        missing: list[Digest] = []
        stat, touch, now = os.stat, self._touch, time.time()
        for digest in digests:
            path = self._file(digest)
            try:
                mtime = stat(path).st_mtime
            except (FileNotFoundError, NotADirectoryError):
                missing.append(digest)
                continue
            except OSError as error:
                if error.errno == _ESTALE:
                    missing.append(digest)
                    continue
                raise _os_error(error, f"looking up {digest}") from error
            touch(path, mtime, now)
        return missing

    def _open_fd(self, digest: Digest, what: str
                 ) -> tuple[int, int, Hashable | None] | None:
        """(fd, size, version) of the blob's file, refreshing its modification time;
        None if absent."""
        try:
            fd = os.open(self._file(digest), os.O_RDONLY | _O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as error:
            if error.errno == _ESTALE:
                return None
            raise _os_error(error, f"{what} {digest}") from error
        try:
            stat = os.fstat(fd)
        except OSError as error:
            os.close(fd)
            raise _os_error(error, f"{what} {digest}") from error
        if self._touch(fd, stat.st_mtime, time.time()) and self._versions:
            try:
                stat = os.fstat(fd)  # the touch changed the change time
            except OSError as error:
                os.close(fd)
                raise _os_error(error, f"{what} {digest}") from error
        return fd, stat.st_size, self._version(stat)

    async def get(self, digest: Digest) -> bytes | None:
        opened = self._open_fd(digest, "reading")
        if opened is None:
            return None
        fd, size, _ = opened
        try:
            # Asking for one byte more than the size tells the end of the file apart
            # from a short read in one call.
            pieces: list[bytes] = []
            position = 0
            want = size + 1
            while True:
                piece = os.pread(fd, want, position)
                if piece:
                    pieces.append(piece)
                    position += len(piece)
                if not piece or (len(piece) < want and position >= size):
                    break
                want = size - position + 1 if position < size else 65536
            return pieces[0] if len(pieces) == 1 else b"".join(pieces)
        except OSError as error:
            raise _os_error(error, f"reading {digest}") from error
        finally:
            os.close(fd)

    async def open(self, digest: Digest) -> BlobReader | None:
        opened = self._open_fd(digest, "opening")
        if opened is None:
            return None
        return _FileReader(opened[0], opened[1], str(digest), opened[2])

    # -- whole-blob writes ----------------------------------------------------

    async def put(self, digest: Digest, data: bytes) -> None:
        if len(data) >= OFFLOAD_BYTES:
            await self._in_thread(lambda: self._put_sync(digest, data))
        else:
            self._put_sync(digest, data)

    async def put_many(self, blobs: Iterable[tuple[Digest, bytes]]) -> None:
        for error in await self.put_batch(list(blobs)):
            if error is not None:
                raise error

    async def put_batch(self, blobs: Sequence[tuple[Digest, bytes]]
                        ) -> list[BuildfleetError | None]:
        """Store several blobs, each on its own: per blob, its error or None.

        The files are written by I/O threads, in groups, so that a batch of small
        blobs costs neither one thread hop per blob nor the event loop's time."""
        if not blobs:
            return []
        if len(blobs) < _MIN_GROUP and sum(len(data) for _, data in blobs) < OFFLOAD_BYTES:
            return self._put_group(blobs)
        groups = min(self._io_threads, max(1, len(blobs) // _MIN_GROUP))
        loop = asyncio.get_running_loop()
        pool = self._pool()
        parts = await asyncio.gather(*(
            loop.run_in_executor(pool, self._put_group, blobs[start::groups])
            for start in range(groups)))
        results: list[BuildfleetError | None] = [None] * len(blobs)
        for start, part in enumerate(parts):
            results[start::groups] = part
        return results

    def _put_group(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[BuildfleetError | None]:
        results: list[BuildfleetError | None] = []
        synced: set[str] = set()
        for digest, data in blobs:
            try:
                self._put_sync(digest, data, sync_dir=False)
                if self._fsync:
                    synced.add(self._shard(digest))
                results.append(None)
            except BuildfleetError as error:
                results.append(error)
        for directory in synced:
            try:
                self._sync_dir(directory)
            except OSError as error:
                failure = _os_error(error, "flushing a directory")
                return [failure if result is None else result for result in results]
        return results

    def _put_sync(self, digest: Digest, data: bytes, *, sync_dir: bool = True) -> None:
        """Store one blob (see the module docstring); raises BuildfleetError."""
        shard = self._shard(digest)
        target = self._file(digest)
        try:
            self._ensure_dir(shard)
            if not (self._use_tmpfile and self._put_anonymous(target, data)):
                self._put_named(digest, target, data)
            if self._fsync and sync_dir:
                self._sync_dir(shard)
        except OSError as error:
            raise _os_error(error, f"storing {digest}") from error

    def _put_anonymous(self, target: str, data: bytes) -> bool:
        """Write an anonymous file and link it at `target`; False when the name is
        taken or O_TMPFILE cannot be used here (the caller then renames into place).

        The file is created in ``tmp``, not in the shard: ext4 allocates a file's
        inode near its directory's, and keeping every new inode in one place (as
        named temporary files did) measured no worse than spreading them over the
        shards' groups, and better while many files had just been deleted."""
        try:
            fd = os.open(self._tmp_dir, os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the tmp directory was removed under us
            os.makedirs(self._tmp_dir, exist_ok=True)
            fd = os.open(self._tmp_dir, os.O_WRONLY | _O_TMPFILE | _O_CLOEXEC, 0o644)
        except OSError as error:
            if error.errno in _NO_TMPFILE:
                self._tmpfile_unavailable(error)
                return False
            raise
        try:
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
            source = f"/proc/self/fd/{fd}"
            try:
                try:
                    os.link(source, target, src_dir_fd=_any_dir_fd(), follow_symlinks=True)
                except FileNotFoundError:
                    if not os.path.isdir("/proc/self/fd"):
                        raise
                    shard = os.path.dirname(target)  # removed under us
                    self._made_dirs.discard(shard)
                    self._ensure_dir(shard)
                    os.link(source, target, src_dir_fd=_any_dir_fd(), follow_symlinks=True)
            except FileExistsError:
                return False
            except OSError as error:
                if error.errno in _NO_TMPFILE or not os.path.isdir("/proc/self/fd"):
                    self._tmpfile_unavailable(error)
                    return False
                raise
            return True
        finally:
            os.close(fd)

    def _tmpfile_unavailable(self, error: OSError) -> None:
        if self._use_tmpfile:
            self._use_tmpfile = False
            log.info("%s: anonymous temporary files cannot be used here (%s); writing "
                     "named temporary files instead", self.root, error.strerror or error)

    def _put_named(self, digest: Digest, target: str, data: bytes) -> None:
        temp = self._temp_name(digest)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        try:
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            self._publish(temp, target)
        except BaseException:
            _unlink_quietly(temp)
            raise

    def _publish(self, temp: str, target: str) -> None:
        try:
            os.replace(temp, target)
        except FileNotFoundError:
            if not os.path.exists(temp):
                raise
            shard = os.path.dirname(target)  # the shard directory was removed under us
            self._made_dirs.discard(shard)
            self._ensure_dir(shard)
            os.replace(temp, target)

    # -- streamed writes ------------------------------------------------------

    async def begin_write(self, digest: Digest) -> BlobWriter:
        temp = self._temp_name(digest)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
        except FileNotFoundError:  # the tmp directory was removed under us
            try:
                os.makedirs(self._tmp_dir, exist_ok=True)
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o644)
            except OSError as error:
                raise _os_error(error, f"writing {digest}") from error
        except OSError as error:
            raise _os_error(error, f"writing {digest}") from error
        return _FileWriter(self, fd, temp, digest)

    # -- deletion and listing -------------------------------------------------

    async def delete(self, digest: Digest) -> bool:
        try:
            os.unlink(self._file(digest))
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as error:
            if error.errno == _ESTALE:
                return False
            raise _os_error(error, f"deleting {digest}") from error

    async def scan(self) -> AsyncIterator[StoredBlob]:
        shards = await self._in_thread(self._list_shards)
        for shard in shards:
            for blob in await self._in_thread(functools.partial(self._scan_shard, shard)):
                yield blob

    def _list_shards(self) -> list[str]:
        try:
            entries = sorted(os.scandir(self._blobs_dir), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        return [entry.path for entry in entries if entry.is_dir()]

    @staticmethod
    def _scan_shard(shard: str) -> list[StoredBlob]:
        found: list[StoredBlob] = []
        try:
            entries = list(os.scandir(shard))
        except (FileNotFoundError, NotADirectoryError):
            return found
        for entry in entries:
            name, _, size = entry.name.partition("-")
            try:
                digest = Digest.parse(name, int(size))
                stat = entry.stat()
            except (BuildfleetError, ValueError, FileNotFoundError):
                continue
            found.append(StoredBlob(digest, stat.st_size, stat.st_mtime))
        return found


class _FileReader(BlobReader):
    def __init__(self, fd: int, size: int, what: str, version: Hashable | None) -> None:
        self._fd: int | None = fd
        self.size = size
        self._what = what
        self.version = version

    async def read(self, offset: int, length: int) -> bytes:
        if self._fd is None:
            raise ValueError("reader is closed")
        try:
            return os.pread(self._fd, length, offset)
        except OSError as error:
            raise _os_error(error, f"reading {self._what}") from error

    async def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)


class _FileWriter(BlobWriter):
    """A streamed write into a named temporary file, renamed into place on commit.

    Large chunks are written by an I/O thread.  The file descriptor is closed only
    once no thread uses it any more (an abort during a write, for example when the
    upload is cancelled, closes it when that write ends), so that a descriptor
    number is never written to after it may have been reused."""

    def __init__(self, store: DiskStore, fd: int, temp: str, digest: Digest) -> None:
        self._store = store
        self._fd: int | None = fd
        self._temp = temp
        self._target = store._file(digest)
        self._what = str(digest)
        self._inflight: Future[None] | None = None
        self._broken = False  # a write did not complete

    async def write(self, data: bytes) -> None:
        fd = self._fd
        if fd is None:
            raise RuntimeError("write after commit or abort")
        if self._broken:
            raise RuntimeError("write after a failed write")
        self._broken = True
        try:
            if len(data) >= OFFLOAD_BYTES:
                future = self._store._pool().submit(_write_all, fd, data)
                self._inflight = future
                await asyncio.wrap_future(future)
                self._inflight = None
            else:
                _write_all(fd, data)
        except OSError as error:
            await self.abort()
            raise _os_error(error, f"writing {self._what}") from error
        self._broken = False

    async def commit(self) -> None:
        if self._fd is None:
            raise RuntimeError("commit after commit or abort")
        if self._broken:
            await self.abort()
            raise Unavailable(f"storing {self._what}: a write was interrupted")
        fd, self._fd = self._fd, None
        store = self._store

        def finish() -> None:
            try:
                if store._fsync:
                    os.fsync(fd)
                store._publish(self._temp, self._target)
                # After the rename, which sets the change time.
                self.version = store._version(os.fstat(fd))
            finally:
                os.close(fd)
            if store._fsync:
                store._sync_dir(os.path.dirname(self._target))

        try:
            if store._fsync:
                await store._in_thread(finish)
            else:
                finish()
        except OSError as error:
            _unlink_quietly(self._temp)
            raise _os_error(error, f"storing {self._what}") from error

    async def abort(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        inflight, temp = self._inflight, self._temp

        def discard(_: object = None) -> None:
            os.close(fd)
            _unlink_quietly(temp)

        if inflight is not None and not inflight.done():
            inflight.add_done_callback(discard)
        else:
            discard()


def change_times_are_fine_grained(directory: str, tries: int = 5) -> bool:
    """Whether a file in `directory` gets a new change time when it is written right
    after its status was read, every time out of `tries`."""
    try:
        fd = os.open(directory, _O_TMPFILE | os.O_RDWR | _O_CLOEXEC, 0o600) \
            if _O_TMPFILE else None
    except OSError:
        fd = None
    path = None
    if fd is None:
        path = f"{directory}/ctime-probe.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_CLOEXEC, 0o600)
        except OSError:
            return False
    try:
        for _ in range(tries):
            before = os.fstat(fd).st_ctime_ns
            os.write(fd, b"x")
            if os.fstat(fd).st_ctime_ns == before:
                return False
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        if path is not None:
            _unlink_quietly(path)


"""An asyncio REAPI CAS client: for the bot, for tests and for benchmarks.

`CasClient` talks to one instance of a ContentAddressableStorage + ByteStream
endpoint over a grpc.aio channel:

- `find_missing` asks FindMissingBlobs in batches of at most `FIND_BATCH` digests;
- `upload` stores blobs given as bytes or as local files: FindMissingBlobs first
  (skipped when all of them, at most `SEND_WITHOUT_ASKING` bytes, fit in one
  batch: sending them again costs less than the extra round trip), then
  BatchUpdateBlobs for the blobs that fit in the server's
  `max_batch_total_size_bytes` (from GetCapabilities), ByteStream Write
  (``{instance}/uploads/{uuid}/blobs/{hash}/{size}``) for the larger ones;
- `read_blobs` / `download` fetch many blobs concurrently (at most
  `max_concurrency` calls in flight): BatchReadBlobs for small blobs, ByteStream
  Read (``{instance}/blobs/{hash}/{size}``) for larger ones; every blob is verified
  against its digest, and `download` streams large blobs straight to a file;
- `get_tree` fetches every Directory under a root with GetTree (following page
  tokens), falling back to reading the directories level by level when the
  server does not implement GetTree;
- `build_tree` / `upload_directory` turn a local directory into Directory
  messages (or a Tree message) and upload it.

Missing blobs raise `MissingBlobs` (naming every digest); a blob whose bytes do
not match its digest raises `CorruptBlob`; anything the server refuses raises
`CasError` with the gRPC code.  grpc.aio.AioRpcError from the channel (server
unreachable...) is re-raised as `CasError` with the same code.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet._proto.google.bytestream import bytestream_pb2 as bs_pb2
from buildfleet._proto.google.bytestream import bytestream_pb2_grpc as bs_grpc
from buildfleet.digest import Digest

__all__ = [
    "CasClient", "CasError", "CorruptBlob", "LocalTree", "MissingBlobs", "build_tree",
    "digest_of_file", "grpc_code", "proto_digest",
]

MiB = 1024 * 1024
DEFAULT_BATCH_LIMIT = 4 * MiB  # when the server states no limit (0) or has no Capabilities
BATCH_OVERHEAD = 256  # bytes of framing counted per blob in a batch (digest, status...)
BATCH_MARGIN = 16 * 1024  # room left in a batch for the rest of the message
FIND_BATCH = 10_000  # digests per FindMissingBlobs call
MAX_BATCH_BLOBS = 2_000  # blobs per BatchReadBlobs / BatchUpdateBlobs call
# An upload of at most this many bytes that fits in one batch is sent without
# asking FindMissingBlobs first (the bot's outputs, mostly).
SEND_WITHOUT_ASKING = 1 * MiB
CHUNK_SIZE = MiB  # bytes per ByteStream WriteRequest
HASH_CHUNK = MiB
DEFAULT_CONCURRENCY = 16
DEFAULT_TIMEOUT = 300.0  # seconds per call

M = TypeVar("M", bound=Message)
T = TypeVar("T")


class CasError(Exception):
    """The CAS refused or failed a request; `code` is the gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class MissingBlobs(CasError):
    """Some blobs are not in the CAS."""

    def __init__(self, digests: Iterable[Digest], what: str = "blob") -> None:
        self.digests = sorted(set(digests))
        shown = ", ".join(str(d) for d in self.digests[:5])
        more = f" and {len(self.digests) - 5} more" if len(self.digests) > 5 else ""
        super().__init__(grpc.StatusCode.NOT_FOUND,
                         f"{what} not found in the CAS: {shown}{more}")


class CorruptBlob(CasError):
    """The CAS sent bytes that do not hash to the digest asked for."""

    def __init__(self, digest: Digest, detail: str) -> None:
        super().__init__(grpc.StatusCode.DATA_LOSS, f"blob {digest} from the CAS: {detail}")
        self.digest = digest


def proto_digest(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


def _from_proto(message: re_pb2.Digest) -> Digest:
    return Digest(message.hash, message.size_bytes)


def digest_of_file(path: str | os.PathLike[str]) -> Digest:
    """The digest of a local file (read in chunks; blocking)."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(HASH_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return Digest(hasher.hexdigest(), size)


def _rpc_error(error: grpc.aio.AioRpcError, what: str) -> CasError:
    return CasError(error.code(), f"{what}: {error.details() or error.code().name}")


@dataclass
class LocalTree:
    """A local directory as REAPI Directory messages.

    `root` is the top Directory; `children` every other Directory, each once, in
    topological order (parents before children); `directories` maps each
    Directory's digest to its serialized bytes (root included); `files` maps
    each file digest to one local path holding it.
    """

    root: re_pb2.Directory
    root_digest: Digest
    children: list[re_pb2.Directory] = field(default_factory=list)
    directories: dict[Digest, bytes] = field(default_factory=dict)
    files: dict[Digest, Path] = field(default_factory=dict)

    def tree(self) -> re_pb2.Tree:
        return re_pb2.Tree(root=self.root, children=self.children)

    def blobs(self) -> dict[Digest, bytes | Path]:
        """Every blob of the tree: Directory messages and file contents."""
        blobs: dict[Digest, bytes | Path] = dict(self.files)
        blobs.update(self.directories)
        return blobs


def build_tree(path: str | os.PathLike[str]) -> LocalTree:
    """Describe the directory at `path` (blocking; symlinks are recorded, not followed).

    Files are executable when their owner execute bit is set.  Anything that is
    not a regular file, directory or symlink (fifos, sockets, devices) is left out.
    """
    files: dict[Digest, Path] = {}
    directories: dict[Digest, bytes] = {}
    order: list[Digest] = []  # post-order: children before parents
    messages: dict[Digest, re_pb2.Directory] = {}

    def visit(directory: Path) -> Digest:
        message = re_pb2.Directory()
        with os.scandir(directory) as entries:
            listing = sorted(entries, key=lambda e: e.name)
        for entry in listing:
            mode = entry.stat(follow_symlinks=False).st_mode
            if stat.S_ISLNK(mode):
                message.symlinks.add(name=entry.name, target=os.readlink(entry.path))
            elif stat.S_ISDIR(mode):
                child = visit(Path(entry.path))
                message.directories.add(name=entry.name, digest=proto_digest(child))
            elif stat.S_ISREG(mode):
                digest = digest_of_file(entry.path)
                files.setdefault(digest, Path(entry.path))
                message.files.add(name=entry.name, digest=proto_digest(digest),
                                  is_executable=bool(mode & stat.S_IXUSR))
        data = message.SerializeToString(deterministic=True)
        digest = Digest.of(data)
        if digest not in directories:
            directories[digest] = data
            messages[digest] = message
            order.append(digest)
        return digest

    root_digest = visit(Path(path))
    # Reverse post-order of a DAG is a topological order: parents before children.
    children = [messages[d] for d in reversed(order) if d != root_digest]
    return LocalTree(root=messages[root_digest], root_digest=root_digest, children=children,
                     directories=directories, files=files)


class CasClient:
    """CAS + ByteStream calls for one instance, batched and bounded."""

    def __init__(self, channel: grpc.aio.Channel, instance: str = "", *,
                 max_batch_size: int | None = None,
                 max_concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.channel = channel
        self.instance = instance
        self.timeout = timeout
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self.bytestream = self._bytestream  # for other ByteStream resources (log streams)
        self._capabilities = re_grpc.CapabilitiesStub(channel)
        self._batch_limit = max_batch_size
        self._limit_lock = asyncio.Lock()
        self._slots = asyncio.Semaphore(max_concurrency)

    # -- limits ----------------------------------------------------------------

    async def batch_limit(self) -> int:
        """The largest batch in bytes (GetCapabilities' max_batch_total_size_bytes)."""
        if self._batch_limit is not None:
            return self._batch_limit
        async with self._limit_lock:
            if self._batch_limit is None:
                limit = DEFAULT_BATCH_LIMIT
                try:
                    capabilities = await self._capabilities.GetCapabilities(
                        re_pb2.GetCapabilitiesRequest(instance_name=self.instance),
                        timeout=self.timeout)
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise _rpc_error(error, "GetCapabilities") from None
                else:
                    stated = capabilities.cache_capabilities.max_batch_total_size_bytes
                    if stated > 0:
                        limit = min(stated, DEFAULT_BATCH_LIMIT * 16)
                self._batch_limit = limit
            return self._batch_limit

    async def _fits_batch(self) -> int:
        """Largest single blob that goes in a batch call."""
        return max(0, await self.batch_limit() - BATCH_MARGIN - BATCH_OVERHEAD)

    def _batches(self, sizes: Iterable[tuple[Digest, int]], limit: int) -> list[list[Digest]]:
        batches: list[list[Digest]] = []
        current: list[Digest] = []
        total = 0
        budget = max(1, limit - BATCH_MARGIN)
        for digest, size in sizes:
            cost = size + BATCH_OVERHEAD
            if current and (total + cost > budget or len(current) >= MAX_BATCH_BLOBS):
                batches.append(current)
                current, total = [], 0
            current.append(digest)
            total += cost
        if current:
            batches.append(current)
        return batches

    async def _bounded(self, work: Awaitable[T]) -> T:
        async with self._slots:
            return await work

    # -- existence ---------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> set[Digest]:
        """The digests among `digests` that the CAS does not hold."""
        unique = list(dict.fromkeys(digests))
        chunks = [unique[i:i + FIND_BATCH] for i in range(0, len(unique), FIND_BATCH)]

        async def ask(chunk: list[Digest]) -> list[Digest]:
            try:
                response = await self._cas.FindMissingBlobs(
                    re_pb2.FindMissingBlobsRequest(
                        instance_name=self.instance,
                        blob_digests=[proto_digest(d) for d in chunk]),
                    timeout=self.timeout)
            except grpc.aio.AioRpcError as error:
                raise _rpc_error(error, "FindMissingBlobs") from None
            return [_from_proto(d) for d in response.missing_blob_digests]

        results = await asyncio.gather(*(self._bounded(ask(c)) for c in chunks))
        return {d for found in results for d in found}

    # -- uploads -------------------------------------------------------------------

    async def upload(self, blobs: Mapping[Digest, bytes | os.PathLike[str] | str],
                     *, check_missing: bool = True) -> int:
        """Store the blobs the CAS lacks; returns how many were sent.

        Each value is the blob's bytes or the path of a local file holding them.
        """
        if not blobs:
            return 0
        wanted = {d for d in blobs if d.size_bytes}  # the empty blob is always there
        fits = await self._fits_batch()
        total = sum(d.size_bytes + BATCH_OVERHEAD for d in blobs)
        if check_missing and not (total <= min(SEND_WITHOUT_ASKING, fits)
                                  and len(blobs) <= MAX_BATCH_BLOBS):
            wanted = await self.find_missing(blobs)
        small = [d for d in blobs if d in wanted and d.size_bytes <= fits]
        large = [d for d in blobs if d in wanted and d.size_bytes > fits]
        limit = await self.batch_limit()
        work: list[Awaitable[None]] = [
            self._bounded(self._batch_update(batch, blobs))
            for batch in self._batches(((d, d.size_bytes) for d in small), limit)]
        work += [self._bounded(self._write(d, blobs[d])) for d in large]
        await asyncio.gather(*work)
        return len(small) + len(large)

    async def upload_blob(self, data: bytes) -> Digest:
        """Store one blob given as bytes; its digest."""
        digest = Digest.of(data)
        await self.upload({digest: data})
        return digest

    async def upload_message(self, message: Message) -> Digest:
        return await self.upload_blob(message.SerializeToString(deterministic=True))

    async def _batch_update(self, batch: list[Digest],
                            blobs: Mapping[Digest, bytes | os.PathLike[str] | str]) -> None:
        contents = await asyncio.to_thread(_load_all, batch, blobs)
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance)
        for digest in batch:
            request.requests.add(digest=proto_digest(digest), data=contents[digest])
        try:
            response = await self._cas.BatchUpdateBlobs(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error, "BatchUpdateBlobs") from None
        for entry in response.responses:
            if entry.status.code != 0:
                raise CasError(grpc_code(entry.status.code),
                               f"BatchUpdateBlobs refused {_from_proto(entry.digest)}: "
                               f"{entry.status.message}")

    async def _write(self, digest: Digest, source: bytes | os.PathLike[str] | str) -> None:
        prefix = f"{self.instance}/" if self.instance else ""
        name = f"{prefix}uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"

        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            offset = 0
            async for chunk in _chunks(source):
                offset += len(chunk)
                yield bs_pb2.WriteRequest(
                    resource_name=name if offset == len(chunk) else "",
                    write_offset=offset - len(chunk), data=chunk,
                    finish_write=offset == digest.size_bytes)
            if offset == 0:
                yield bs_pb2.WriteRequest(resource_name=name, finish_write=True)

        try:
            response = await self._bytestream.Write(requests(), timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error, f"ByteStream.Write of {digest}") from None
        if response.committed_size not in (digest.size_bytes, -1):
            raise CasError(grpc.StatusCode.DATA_LOSS,
                           f"ByteStream.Write of {digest}: the server committed "
                           f"{response.committed_size} bytes")

    async def upload_directory(self, path: str | os.PathLike[str]) -> LocalTree:
        """Upload a local directory (files and Directory messages); its description."""
        tree = await asyncio.to_thread(build_tree, path)
        await self.upload(tree.blobs())
        return tree

    # -- downloads -----------------------------------------------------------------

    async def read_blob(self, digest: Digest) -> bytes:
        return (await self.read_blobs([digest]))[digest]

    async def read_message(self, digest: Digest, cls: type[M], what: str = "") -> M:
        """Fetch and parse one message; CasError (INVALID_ARGUMENT) when it does not parse."""
        data = await self.read_blob(digest)
        message = cls()
        try:
            message.ParseFromString(data)
        except DecodeError:
            raise CasError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{what or cls.DESCRIPTOR.name} {digest} is not a valid "
                           f"{cls.DESCRIPTOR.full_name}") from None
        return message

    async def read_blobs(self, digests: Iterable[Digest]) -> dict[Digest, bytes]:
        """Fetch blobs into memory, concurrently; MissingBlobs names every absent one."""
        found: dict[Digest, bytes] = {}
        missing: list[Digest] = []
        batches, large = await self._plan_reads(digests)

        async def batch(chunk: list[Digest]) -> None:
            got, absent = await self._batch_read(chunk)
            found.update(got)
            missing.extend(absent)

        async def stream(digest: Digest) -> None:
            parts: list[bytes] = []
            try:
                async for chunk in self._read_stream(digest):
                    parts.append(chunk)
            except MissingBlobs:
                missing.append(digest)
                return
            data = b"".join(parts)
            _verify(digest, data)
            found[digest] = data

        work: list[Awaitable[None]] = [self._bounded(batch(b)) for b in batches]
        work += [self._bounded(stream(d)) for d in large]
        await asyncio.gather(*work)
        if missing:
            raise MissingBlobs(missing)
        return found

    async def download(self, digests: Iterable[Digest],
                       destination: Callable[[Digest], Path]) -> None:
        """Write each blob to the file `destination(digest)`, verified; concurrently.

        Large blobs are streamed to disk; MissingBlobs names every absent blob
        (the others are written all the same).
        """
        missing: list[Digest] = []
        batches, large = await self._plan_reads(digests)

        async def batch(chunk: list[Digest]) -> None:
            got, absent = await self._batch_read(chunk)
            missing.extend(absent)
            await asyncio.to_thread(_write_all, got, destination)

        async def stream(digest: Digest) -> None:
            try:
                await self._stream_to_file(digest, destination(digest))
            except MissingBlobs:
                missing.append(digest)

        work: list[Awaitable[None]] = [self._bounded(batch(b)) for b in batches]
        work += [self._bounded(stream(d)) for d in large]
        await asyncio.gather(*work)
        if missing:
            raise MissingBlobs(missing)

    async def _plan_reads(self, digests: Iterable[Digest]
                          ) -> tuple[list[list[Digest]], list[Digest]]:
        """Each distinct digest once: batches for BatchReadBlobs, and the blobs too
        large for a batch, which are streamed."""
        unique = list(dict.fromkeys(digests))
        fits = await self._fits_batch()
        small = [d for d in unique if d.size_bytes <= fits]
        large = [d for d in unique if d.size_bytes > fits]
        batches = self._batches(((d, d.size_bytes) for d in small), await self.batch_limit())
        return batches, large

    async def _batch_read(self, chunk: list[Digest]) -> tuple[dict[Digest, bytes], list[Digest]]:
        try:
            response = await self._cas.BatchReadBlobs(
                re_pb2.BatchReadBlobsRequest(instance_name=self.instance,
                                             digests=[proto_digest(d) for d in chunk]),
                timeout=self.timeout)
        except grpc.aio.AioRpcError as error:
            raise _rpc_error(error, "BatchReadBlobs") from None
        got: dict[Digest, bytes] = {}
        absent: list[Digest] = []
        for entry in response.responses:
            digest = _from_proto(entry.digest)
            if grpc_code(entry.status.code) == grpc.StatusCode.NOT_FOUND:
                absent.append(digest)
            elif entry.status.code != 0:
                raise CasError(grpc_code(entry.status.code),
                               f"BatchReadBlobs {digest}: {entry.status.message}")
            else:
                _verify(digest, entry.data)
                got[digest] = entry.data
        asked = set(chunk)
        unanswered = asked - set(got) - set(absent)
        if unanswered:
            raise CasError(grpc.StatusCode.INTERNAL,
                           f"BatchReadBlobs did not answer for {len(unanswered)} blobs")
        return got, absent

    async def _read_stream(self, digest: Digest) -> AsyncIterator[bytes]:
        prefix = f"{self.instance}/" if self.instance else ""
        name = f"{prefix}blobs/{digest.hash}/{digest.size_bytes}"
        call = self._bytestream.Read(bs_pb2.ReadRequest(resource_name=name),
                                     timeout=self.timeout)
        try:
            async for response in call:
                yield response.data
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise MissingBlobs([digest]) from None
            raise _rpc_error(error, f"ByteStream.Read of {digest}") from None

    async def _stream_to_file(self, digest: Digest, path: Path) -> None:
        hasher = hashlib.sha256()
        size = 0
        stream = await asyncio.to_thread(open, path, "wb")
        try:
            async for chunk in self._read_stream(digest):
                hasher.update(chunk)
                size += len(chunk)
                if size > digest.size_bytes:
                    raise CorruptBlob(digest, f"more than {digest.size_bytes} bytes")
                await asyncio.to_thread(stream.write, chunk)
        finally:
            await asyncio.to_thread(stream.close)
        if size != digest.size_bytes or hasher.hexdigest() != digest.hash:
            raise CorruptBlob(digest, f"{size} bytes hashing to {hasher.hexdigest()}")

    # -- trees -----------------------------------------------------------------------

    async def get_tree(self, root: Digest) -> dict[Digest, re_pb2.Directory]:
        """Every Directory under `root` (root included), by digest.

        MissingBlobs names the directories the CAS lacks (the root or any other).
        """
        try:
            return await self._get_tree_paged(root)
        except CasError as error:
            if error.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
        return await self._get_tree_by_levels(root)

    async def _get_tree_paged(self, root: Digest) -> dict[Digest, re_pb2.Directory]:
        received: dict[Digest, re_pb2.Directory] = {}
        token = ""
        while True:
            call = self._cas.GetTree(re_pb2.GetTreeRequest(
                instance_name=self.instance, root_digest=proto_digest(root), page_token=token),
                timeout=self.timeout)
            token = ""
            try:
                async for page in call:
                    for directory in page.directories:
                        data = directory.SerializeToString(deterministic=True)
                        received.setdefault(Digest.of(data), directory)
                    token = page.next_page_token or token
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.NOT_FOUND:
                    raise MissingBlobs([root], "input root directory") from None
                raise _rpc_error(error, f"GetTree of {root}") from None
            if not token:
                break
        return await self._complete_tree(root, received)

    async def _complete_tree(self, root: Digest, received: dict[Digest, re_pb2.Directory]
                             ) -> dict[Digest, re_pb2.Directory]:
        """Keep the directories reachable from `root`; fetch any the pages lacked.

        Digests are recomputed from the messages a server returns, which can
        differ from the client's bytes when a serialization is not canonical;
        directories not matched that way are read by digest.
        """
        tree: dict[Digest, re_pb2.Directory] = {}
        level = [root]
        while level:
            absent = [d for d in level if d not in received and d not in tree]
            if absent:
                received.update(await self._read_directories(absent))
            following: list[Digest] = []
            for digest in level:
                if digest in tree:
                    continue
                directory = received[digest]
                tree[digest] = directory
                following.extend(_from_proto(n.digest) for n in directory.directories)
            level = [d for d in dict.fromkeys(following) if d not in tree]
        return tree

    async def _get_tree_by_levels(self, root: Digest) -> dict[Digest, re_pb2.Directory]:
        return await self._complete_tree(root, {})

    async def _read_directories(self, digests: list[Digest]) -> dict[Digest, re_pb2.Directory]:
        try:
            blobs = await self.read_blobs(digests)
        except MissingBlobs as error:
            raise MissingBlobs(error.digests, "directory") from None
        parsed: dict[Digest, re_pb2.Directory] = {}
        for digest, data in blobs.items():
            directory = re_pb2.Directory()
            try:
                directory.ParseFromString(data)
            except DecodeError:
                raise CasError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"blob {digest} is not a valid Directory") from None
            parsed[digest] = directory
        return parsed


def grpc_code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode with the numeric value `code` (UNKNOWN when there is none)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN


def _verify(digest: Digest, data: bytes) -> None:
    if len(data) != digest.size_bytes:
        raise CorruptBlob(digest, f"got {len(data)} bytes")
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest.hash:
        raise CorruptBlob(digest, f"content hashes to {actual}")


def _load_all(batch: list[Digest], blobs: Mapping[Digest, bytes | os.PathLike[str] | str]
              ) -> dict[Digest, bytes]:
    contents: dict[Digest, bytes] = {}
    for digest in batch:
        source = blobs[digest]
        if isinstance(source, bytes):
            contents[digest] = source
        else:
            with open(source, "rb") as stream:
                contents[digest] = stream.read()
            if len(contents[digest]) != digest.size_bytes:
                raise CasError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"file {source} changed while being uploaded")
    return contents


def _write_all(blobs: Mapping[Digest, bytes], destination: Callable[[Digest], Path]) -> None:
    for digest, data in blobs.items():
        with open(destination(digest), "wb") as stream:
            stream.write(data)


async def _chunks(source: bytes | os.PathLike[str] | str) -> AsyncIterator[bytes]:
    if isinstance(source, bytes):
        for start in range(0, len(source), CHUNK_SIZE):
            yield source[start:start + CHUNK_SIZE]
        return
    stream = await asyncio.to_thread(open, source, "rb")
    try:
        while chunk := await asyncio.to_thread(stream.read, CHUNK_SIZE):
            yield chunk
    finally:
        await asyncio.to_thread(stream.close)

"""The REAPI ContentAddressableStorage service: a thin translation onto `Cas`.

Batch calls answer one google.rpc.Status per blob, so one bad blob never fails
the others; only a request over the instance's batch size limit (or naming an
unknown instance or digest function) fails as a whole.  GetTree walks the tree
breadth first and pages it with opaque tokens (see `_PageToken`).
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import zstandard
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from buildfleet.digest import Digest, check_digest_function
from buildfleet.errors import BuildfleetError, InvalidArgument, NotFound, Unimplemented
from buildfleet.server.instance import Instance, Instances
from buildfleet.server.rpc import add_service, rpc, status_proto
from buildfleet.storage.cas import Cas

log = logging.getLogger(__name__)

IDENTITY = re_pb2.Compressor.IDENTITY
ZSTD = re_pb2.Compressor.ZSTD

# BatchReadBlobs compresses (when the client accepts zstd) only blobs above this
# size, and only sends the compressed form when it is actually smaller.
COMPRESS_MIN_SIZE = 1024
ZSTD_LEVEL = 3
_DECOMPRESS_CHUNK = 1024 * 1024

# GetTree paging.  A page holds at most `page_size` directories and stops early
# once it holds PAGE_BYTES of serialized directories, so that a page of large
# directories still fits in one gRPC message.
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000
PAGE_BYTES = 4 * 1024 * 1024
# Directories fetched from storage per Cas.get_many call while walking a level.
FETCH_BATCH = 256


def _proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)


def _ok() -> status_pb2.Status:
    return status_pb2.Status(code=code_pb2.OK)


def _compressor_name(value: int) -> str:
    try:
        return re_pb2.Compressor.Value.Name(value)
    except ValueError:
        return str(value)


def decompress_zstd(data: bytes, digest: Digest) -> bytes:
    """The zstd-decoded `data`, never more than `digest.size_bytes` + 1 bytes of it.

    Decoding stops one byte past the announced size, so a small payload that
    expands enormously costs no more memory than the blob it claims to be.
    """
    bound = digest.size_bytes + 1
    out = bytearray()
    try:
        with zstandard.ZstdDecompressor().stream_reader(
                io.BytesIO(data), read_across_frames=True) as reader:
            while len(out) < bound:
                piece = reader.read(min(_DECOMPRESS_CHUNK, bound - len(out)))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as error:
        raise InvalidArgument(f"blob {digest}: data is not valid zstd: {error}") from None
    if len(out) > digest.size_bytes:
        raise InvalidArgument(
            f"blob {digest}: zstd data decompresses to more than the "
            f"{digest.size_bytes} bytes the digest announces"
        )
    return bytes(out)


class ContentAddressableStorageService(re_grpc.ContentAddressableStorageServicer):
    """FindMissingBlobs, BatchUpdateBlobs, BatchReadBlobs and GetTree over `Instances`."""

    FULL_NAME = "build.bazel.remote.execution.v2.ContentAddressableStorage"

    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self,
                    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"])

    def _instance(self, name: str, digest_function: int) -> Instance:
        instance = self.instances.get(name)
        check_digest_function(digest_function)
        return instance

    # -- FindMissingBlobs ---------------------------------------------------

    @rpc
    async def FindMissingBlobs(self, request: re_pb2.FindMissingBlobsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> re_pb2.FindMissingBlobsResponse:
        instance = self._instance(request.instance_name, request.digest_function)
        digests = Digest.from_protos(request.blob_digests, "blob_digests")
        missing = await instance.cas.find_missing(digests)
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[_proto(d) for d in missing])

    # -- BatchUpdateBlobs ---------------------------------------------------

    @rpc
    async def BatchUpdateBlobs(self, request: re_pb2.BatchUpdateBlobsRequest,
                               context: grpc.aio.ServicerContext
                               ) -> re_pb2.BatchUpdateBlobsResponse:
        instance = self._instance(request.instance_name, request.digest_function)
        limit = instance.max_batch_total_size
        total = sum(len(entry.data) for entry in request.requests)
        if total > limit:
            raise InvalidArgument(
                f"BatchUpdateBlobs: the request carries {total} bytes of blob data, more than "
                f"this instance's max_batch_total_size of {limit} bytes; upload large blobs "
                "through ByteStream.Write"
            )
        # Decode every entry first, then store the valid ones in one call (the disk
        # store writes them on its I/O threads); each entry gets its own status.
        errors: list[BuildfleetError | None] = []
        blobs: list[tuple[Digest, bytes]] = []
        positions: list[int] = []
        for index, entry in enumerate(request.requests):
            try:
                blobs.append(self._decode_one(instance, index, entry))
                positions.append(index)
                errors.append(None)
            except BuildfleetError as error:
                errors.append(error)
        for index, outcome in zip(positions, await instance.cas.put_many(blobs), strict=True):
            errors[index] = outcome
        response = re_pb2.BatchUpdateBlobsResponse()
        add = response.responses.add
        ok = _ok()
        for entry, failure in zip(request.requests, errors, strict=True):
            add(digest=entry.digest, status=ok if failure is None else status_proto(failure))
        return response

    @staticmethod
    def _decode_one(instance: Instance, index: int,
                    entry: re_pb2.BatchUpdateBlobsRequest.Request) -> tuple[Digest, bytes]:
        digest = Digest.from_proto(entry.digest, f"requests[{index}].digest")
        data = entry.data
        if entry.compressor == ZSTD:
            limit = instance.max_batch_total_size
            if digest.size_bytes > limit:
                raise InvalidArgument(
                    f"blob {digest}: a compressed blob in a batch may expand to at most "
                    f"max_batch_total_size ({limit} bytes); upload it through ByteStream.Write"
                )
            data = decompress_zstd(data, digest)
        elif entry.compressor != IDENTITY:
            raise InvalidArgument(
                f"blob {digest}: compressor {_compressor_name(entry.compressor)} is not "
                "supported (IDENTITY and ZSTD are)"
            )
        return digest, data

    # -- BatchReadBlobs -----------------------------------------------------

    @rpc
    async def BatchReadBlobs(self, request: re_pb2.BatchReadBlobsRequest,
                             context: grpc.aio.ServicerContext
                             ) -> re_pb2.BatchReadBlobsResponse:
        instance = self._instance(request.instance_name, request.digest_function)
        limit = instance.max_batch_total_size
        total = sum(max(d.size_bytes, 0) for d in request.digests)
        if total > limit:
            raise InvalidArgument(
                f"BatchReadBlobs: the requested blobs total {total} bytes, more than this "
                f"instance's max_batch_total_size of {limit} bytes; read large blobs "
                "through ByteStream.Read"
            )
        use_zstd = ZSTD in request.acceptable_compressors
        parsed: list[Digest | InvalidArgument] = []
        for index, message in enumerate(request.digests):
            try:
                parsed.append(Digest.from_proto(message, f"digests[{index}]"))
            except InvalidArgument as error:
                parsed.append(error)
        found = await instance.cas.get_many(d for d in parsed if isinstance(d, Digest))
        compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL) if use_zstd else None
        response = re_pb2.BatchReadBlobsResponse()
        for message, digest in zip(request.digests, parsed, strict=True):
            entry = response.responses.add(digest=message)
            if isinstance(digest, InvalidArgument):
                entry.status.CopyFrom(status_proto(digest))
                continue
            data = found.get(digest)
            if data is None:
                entry.status.CopyFrom(status_proto(NotFound(f"blob {digest} not found")))
                continue
            entry.status.CopyFrom(_ok())
            if compressor is not None and len(data) > COMPRESS_MIN_SIZE:
                packed = compressor.compress(data)
                if len(packed) < len(data):
                    entry.data = packed
                    entry.compressor = ZSTD
                    continue
            entry.data = data
        return response

    # -- GetTree ------------------------------------------------------------

    @rpc
    async def GetTree(self, request: re_pb2.GetTreeRequest,
                      context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[re_pb2.GetTreeResponse]:
        instance = self._instance(request.instance_name, request.digest_function)
        root = Digest.from_proto(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise InvalidArgument(f"page_size {request.page_size} is negative")
        page_size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start: _PageToken | None = None
        if request.page_token:
            start = _PageToken.decode(request.page_token, root)
        if not await instance.cas.contains(root):
            raise NotFound(f"root directory {root} not found")

        walk = _walk_tree(instance.cas, root, start)
        page: list[re_pb2.Directory] = []
        page_bytes = 0
        position = start.position if start else 0
        async for digest, directory in walk:
            if page and (len(page) >= page_size or page_bytes >= PAGE_BYTES):
                token = _PageToken(root, position, digest).encode()
                yield re_pb2.GetTreeResponse(directories=page, next_page_token=token)
                page, page_bytes = [], 0
            page.append(directory)
            page_bytes += directory.ByteSize()
            position += 1
        yield re_pb2.GetTreeResponse(directories=page)

    # -- chunking -----------------------------------------------------------

    @rpc
    async def SplitBlob(self, request: re_pb2.SplitBlobRequest,
                        context: grpc.aio.ServicerContext) -> re_pb2.SplitBlobResponse:
        raise Unimplemented("SplitBlob: this server does not support blob chunking")

    @rpc
    async def SpliceBlob(self, request: re_pb2.SpliceBlobRequest,
                         context: grpc.aio.ServicerContext) -> re_pb2.SpliceBlobResponse:
        raise Unimplemented("SpliceBlob: this server does not support blob chunking")


@dataclass(frozen=True)
class _PageToken:
    """Where a GetTree page starts: the root, a position in BFS order, and a check.

    `position` counts the directories returned before the page; `next_hash` is
    the hash of the directory at that position, so that a token replayed
    against a tree that changed since (a directory evicted or added) is refused
    rather than silently skipping or repeating directories.  Encoded as
    unpadded urlsafe base64 of ``1/<root hash>/<root size>/<position>/<next hash>``.
    """

    root: Digest
    position: int
    next: Digest

    VERSION = "1"

    def encode(self) -> str:
        text = "/".join((self.VERSION, self.root.hash, str(self.root.size_bytes),
                         str(self.position), self.next.hash, str(self.next.size_bytes)))
        return base64.urlsafe_b64encode(text.encode("ascii")).decode("ascii").rstrip("=")

    @classmethod
    def decode(cls, token: str, root: Digest) -> _PageToken:
        invalid = InvalidArgument(
            "page_token is not a token this server issued for this root_digest "
            "(pass the next_page_token of a previous GetTree response unchanged)")
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                   validate=True)
            fields = raw.decode("ascii").split("/")
            if len(fields) != 6 or fields[0] != cls.VERSION:
                raise invalid
            if not all(f.isdigit() for f in (fields[2], fields[3], fields[5])):
                raise invalid
            token_root = Digest.parse(fields[1], int(fields[2]))
            position = int(fields[3])
            next_digest = Digest.parse(fields[4], int(fields[5]))
        except (binascii.Error, UnicodeError, ValueError, InvalidArgument):
            raise invalid from None
        if token_root != root or position <= 0:
            raise invalid
        return cls(token_root, position, next_digest)


async def _walk_tree(cas: Cas, root: Digest, start: _PageToken | None
                     ) -> AsyncIterator[tuple[Digest, re_pb2.Directory]]:
    """The directories of the tree under `root`, breadth first, each digest once.

    Directories missing from the CAS are left out with everything below them; a
    directory that does not parse is left out (logged), unless it is the root.
    With `start`, the first `start.position` directories are walked but not
    yielded, and the next one must be `start.next`.
    """
    skip = start.position if start else 0
    seen: set[Digest] = {root}
    level: list[Digest] = [root]
    emitted = 0
    while level:
        following: list[Digest] = []
        for offset in range(0, len(level), FETCH_BATCH):
            batch = level[offset:offset + FETCH_BATCH]
            blobs = await cas.get_many(batch)
            for digest in batch:
                data = blobs.get(digest)
                if data is None:
                    continue
                directory = _parse_directory(digest, data, is_root=digest == root)
                if directory is None:
                    continue
                _children(directory, digest, seen, following)
                if emitted == skip and start is not None and digest != start.next:
                    raise InvalidArgument(
                        "page_token does not match the tree under root_digest any more "
                        "(directories were added or removed since it was issued); "
                        "start again without a page_token")
                if emitted >= skip:
                    yield digest, directory
                emitted += 1
            del blobs
        level = following
    if emitted <= skip and start is not None:
        raise InvalidArgument(
            f"page_token position {skip} is past the end of the tree under root_digest "
            f"({emitted} directories); start again without a page_token")


def _parse_directory(digest: Digest, data: bytes, *, is_root: bool) -> re_pb2.Directory | None:
    directory = re_pb2.Directory()
    try:
        directory.ParseFromString(data)
    except DecodeError:
        if is_root:
            raise InvalidArgument(f"root_digest {digest} is not a valid Directory") from None
        log.warning("GetTree: directory %s does not parse as a Directory; leaving it out",
                    digest)
        return None
    return directory


def _children(directory: re_pb2.Directory, parent: Digest, seen: set[Digest],
              into: list[Digest]) -> None:
    for node in directory.directories:
        try:
            child = Digest.from_proto(node.digest)
        except InvalidArgument:
            log.warning("GetTree: directory %s names subdirectory %r with an invalid digest; "
                        "leaving it out", parent, node.name)
            continue
        if child not in seen:
            seen.add(child)
            into.append(child)

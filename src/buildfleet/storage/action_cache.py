"""The action cache: action digest -> ActionResult, served only while complete.

Results are stored serialized in any `BlobStore`, keyed by the action digest.
A lookup returns a result only while every blob it references (output files,
the trees of output directories and every file inside them -- or, for a
directory given only by its root Directory, that whole hierarchy -- stdout and stderr)
is still in the CAS, so a client is never handed a result it cannot download.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from google.protobuf.message import DecodeError

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import FailedPrecondition, InvalidArgument, NotFound
from buildfleet.storage.base import BlobStore
from buildfleet.storage.cas import Cas

log = logging.getLogger(__name__)


def _digest(message: re_pb2.Digest, what: str) -> Digest:
    return Digest.from_proto(message, what)


class ActionCache:
    """Stores ActionResults and checks their completeness against a CAS."""

    def __init__(self, store: BlobStore, cas: Cas, *, allow_updates: bool = True) -> None:
        self.store = store
        self.cas = cas
        self.hits = 0  # lookups answered (for metrics)
        self.misses = 0  # lookups that found nothing usable
        self.allow_updates = allow_updates

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    async def referenced_blobs(self, result: re_pb2.ActionResult) -> list[Digest]:
        """Every CAS blob `result` points at, including files inside output trees.

        A tree that is itself missing is listed (so the result counts as
        incomplete) without looking inside it.
        """
        blobs: list[Digest] = []
        for output in result.output_files:
            blobs.append(_digest(output.digest, f"output file {output.path!r}"))
        for name in ("stdout_digest", "stderr_digest"):
            if result.HasField(name):
                blobs.append(_digest(getattr(result, name), name))
        for directory in result.output_directories:
            what = f"output directory {directory.path!r}"
            if directory.HasField("root_directory_digest"):
                root = _digest(directory.root_directory_digest, what)
                if not directory.HasField("tree_digest"):
                    # DIRECTORY_ONLY format: walk the Directory messages instead.
                    blobs.extend(await self.cas.directory_blobs(root, what))
                    continue
                blobs.append(root)
            tree_digest = _digest(directory.tree_digest, what)
            blobs.append(tree_digest)
            tree = await self.cas.get_message(tree_digest, re_pb2.Tree, "output tree")
            if tree is None:
                continue
            for node in [tree.root, *tree.children]:
                for file in node.files:
                    blobs.append(_digest(file.digest, f"file {file.name!r} in output tree"))
        return blobs

    async def get(self, action_digest: Digest) -> re_pb2.ActionResult | None:
        """The cached result, or None when absent or no longer complete in the CAS."""
        result = await self._lookup(action_digest)
        if result is None:
            self.misses += 1
        else:
            self.hits += 1
        return result

    async def _lookup(self, action_digest: Digest) -> re_pb2.ActionResult | None:
        data = await self.store.get(action_digest)
        if data is None:
            return None
        result = re_pb2.ActionResult()
        try:
            result.ParseFromString(data)
            missing = await self.cas.find_missing(await self.referenced_blobs(result))
        except (DecodeError, InvalidArgument):
            log.error("action cache entry for %s is unreadable; dropping it", action_digest)
            await self.store.delete(action_digest)
            return None
        if missing:
            log.debug("action cache entry for %s is incomplete (%d blobs gone)",
                      action_digest, len(missing))
            return None
        return result

    async def put(self, action_digest: Digest, result: re_pb2.ActionResult,
                  *, check_blobs: bool = True) -> None:
        """Store a result; with `check_blobs`, refuse one that references missing blobs."""
        if check_blobs:
            missing = await self.cas.find_missing(await self.referenced_blobs(result))
            if missing:
                raise missing_blobs_error(missing, "the action result references blobs "
                                          "that are not in the CAS")
        await self.store.put(action_digest, result.SerializeToString(deterministic=True))

    async def externalize(self, result: re_pb2.ActionResult) -> None:
        """Move inline bytes (stdout_raw, stderr_raw, output file contents) into the CAS.

        `result` is changed in place to reference them by digest only, so a stored
        entry stays small and every client can download what it names.  Inline
        bytes that contradict a digest also given are INVALID_ARGUMENT.
        """
        blobs: dict[Digest, bytes] = {}
        for digest_field, raw_field in (("stdout_digest", "stdout_raw"),
                                        ("stderr_digest", "stderr_raw")):
            data: bytes = getattr(result, raw_field)
            if data:
                given = getattr(result, digest_field) if result.HasField(digest_field) else None
                digest = _inline_blob(data, given, f"action_result.{digest_field}")
                blobs[digest] = data
                getattr(result, digest_field).CopyFrom(digest_proto(digest))
            result.ClearField(raw_field)
        for index, output in enumerate(result.output_files):
            if output.contents:
                digest = _inline_blob(output.contents, output.digest,
                                      f"action_result.output_files[{index}].digest "
                                      f"(path {output.path!r})")
                output.digest.CopyFrom(digest_proto(digest))
                blobs[digest] = output.contents
            output.ClearField("contents")
        for digest, data in blobs.items():
            await self.cas.put(digest, data)

    async def inlined(self, stored: re_pb2.ActionResult, action_digest: Digest, *,
                      inline_stdout: bool, inline_stderr: bool, inline_paths: Iterable[str],
                      limit: int) -> re_pb2.ActionResult:
        """A copy of `stored` with the requested outputs inlined from the CAS.

        stdout, then stderr, then the requested output files (in result order)
        draw on one budget of `limit` bytes; what does not fit is left to be
        downloaded by digest, as the REAPI allows.
        """
        result = re_pb2.ActionResult()
        result.CopyFrom(stored)
        result.ClearField("stdout_raw")
        result.ClearField("stderr_raw")
        for output in result.output_files:
            output.ClearField("contents")
        budget = _InlineBudget(limit)
        for wanted, digest_field, raw_field in (
            (inline_stdout, "stdout_digest", "stdout_raw"),
            (inline_stderr, "stderr_digest", "stderr_raw"),
        ):
            if wanted and result.HasField(digest_field):
                digest = Digest.from_proto(getattr(result, digest_field), digest_field)
                if budget.take(digest.size_bytes):
                    setattr(result, raw_field, await self._read_for_inline(digest, action_digest))
        paths = set(inline_paths)  # per REAPI, empty means none
        if paths:
            for output in result.output_files:
                if output.path not in paths:
                    continue
                digest = Digest.from_proto(output.digest, f"output file {output.path!r}")
                if budget.take(digest.size_bytes):
                    output.contents = await self._read_for_inline(digest, action_digest)
        return result

    async def _read_for_inline(self, digest: Digest, action_digest: Digest) -> bytes:
        data = await self.cas.get(digest)
        if data is None:  # removed since the completeness check
            raise NotFound(f"action result for {action_digest} is no longer complete: "
                           f"blob {digest} is missing from the CAS")
        return data


class _InlineBudget:
    """How many more bytes a response may inline."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True


def missing_blobs_error(missing: list[Digest], message: str) -> FailedPrecondition:
    """FAILED_PRECONDITION with a PreconditionFailure detail listing each missing blob."""
    from google.rpc import error_details_pb2

    failure = error_details_pb2.PreconditionFailure()
    for digest in missing:
        failure.violations.add(type="MISSING", subject=f"blobs/{digest.hash}/{digest.size_bytes}",
                               description="blob not found in the CAS")
    shown = ", ".join(str(d) for d in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return FailedPrecondition(f"{message}: {shown}{more}", details=[failure])


def _inline_blob(data: bytes, digest_message: re_pb2.Digest | None, what: str) -> Digest:
    """The digest of inline bytes, checked against the digest the client also sent."""
    digest = Digest.of(data)
    if digest_message is not None:
        given = _digest(digest_message, what)
        if given != digest:
            raise InvalidArgument(f"{what} is {given} but the inline bytes have digest {digest}")
    return digest


def digest_proto(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size_bytes)

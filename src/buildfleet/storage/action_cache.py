"""The action cache: action digest -> ActionResult, served only while complete.

Results are stored serialized in any `BlobStore`, keyed by the action digest.
A lookup returns a result only while every blob it references (output files,
the trees of output directories and every file inside them, stdout and stderr)
is still in the CAS, so a client is never handed a result it cannot download.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.digest import Digest
from buildfleet.errors import FailedPrecondition, InvalidArgument
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
            tree_digest = _digest(directory.tree_digest, f"output directory {directory.path!r}")
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

"""Which build an operation comes from: the client's RequestMetadata.

Bazel, BuildStream, recc and most REAPI clients send a
`build.bazel.remote.execution.v2.RequestMetadata` with every call (the gRPC header
`REQUEST_METADATA_HEADER`): the tool and its version, the id of this invocation of
the tool, the id that correlates several invocations (a CI job running Bazel more
than once), the action's mnemonic and its target.  The scheduler keeps it with each
operation, in the client's encoding, so that operators can see whose build an
action belongs to, and `build_key` names the build an operation counts towards:
the correlated invocation, else the tool invocation, else the principal that
submitted it, else one build that every anonymous client shares.  Which of these
count, in which order, is the scheduler's `fair-share-by` (all three by default;
`[principal]` shares the bots between users rather than builds).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from google.protobuf.message import DecodeError

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.errors import InvalidArgument

REQUEST_METADATA_HEADER = "build.bazel.remote.execution.v2.requestmetadata-bin"
# The most of it kept with an operation: ids, tool and target names, not documents.
MAX_REQUEST_METADATA = 4096


def checked_request_metadata(data: bytes) -> bytes:
    """The RequestMetadata header as stored: InvalidArgument when it does not parse or
    is larger than MAX_REQUEST_METADATA; canonical bytes otherwise."""
    if not data:
        return b""
    if len(data) > MAX_REQUEST_METADATA:
        raise InvalidArgument(f"the {REQUEST_METADATA_HEADER} header is {len(data)} bytes, "
                              f"more than the {MAX_REQUEST_METADATA} this server keeps")
    try:
        metadata = re_pb2.RequestMetadata.FromString(data)
    except DecodeError:
        raise InvalidArgument(f"the {REQUEST_METADATA_HEADER} header is not a "
                              "serialized build.bazel.remote.execution.v2.RequestMetadata"
                              ) from None
    return metadata.SerializeToString(deterministic=True)


def request_metadata(data: bytes) -> re_pb2.RequestMetadata:
    """The stored bytes as a message (empty when there are none or they do not parse)."""
    try:
        return re_pb2.RequestMetadata.FromString(data)
    except DecodeError:
        return re_pb2.RequestMetadata()


BUILD_KINDS = ("correlated", "invocation", "principal", "anonymous")


def build_kind(build: str) -> str:
    """Which kind of build a build key names (a bounded set: metrics label by it)."""
    kind = build.partition(":")[0]
    return kind if kind in BUILD_KINDS and build else "anonymous"


def count_by_kind(queued: Iterable[Iterable[str]], running: Iterable[Iterable[str]]
                  ) -> dict[str, tuple[int, int, int]]:
    """kind -> (builds with work, queued actions, running actions), from the builds
    of each queued and each running job."""
    builds: dict[str, set[str]] = {kind: set() for kind in BUILD_KINDS}
    counts = {kind: [0, 0] for kind in BUILD_KINDS}
    for index, jobs in enumerate((queued, running)):
        for job_builds in jobs:
            for build in job_builds or ("",):
                kind = build_kind(build)
                builds[kind].add(build)
                counts[kind][index] += 1
    return {kind: (len(builds[kind]), counts[kind][0], counts[kind][1]) for kind in BUILD_KINDS}


KEYS = ("correlated", "invocation", "principal")  # `fair-share-by`'s default order


def of_build(data: bytes, owner: str, wanted: str, keys: Sequence[str] = KEYS) -> bool:
    """Whether an operation belongs to `wanted`: one of its invocation ids, or its
    build key."""
    metadata = request_metadata(data)
    return wanted in (metadata.tool_invocation_id, metadata.correlated_invocations_id,
                      build_key(data, owner, keys))


def build_key(data: bytes, owner: str, keys: Sequence[str] = KEYS) -> str:
    """The build an operation counts towards: the first of `keys` it has (see the
    module docstring), else the shared build ""."""
    metadata = request_metadata(data) if data and keys != ("principal",) else None
    for key in keys:
        if key == "principal":
            if owner:
                return "principal:" + owner
        elif metadata is not None:
            value = (metadata.correlated_invocations_id if key == "correlated"
                     else metadata.tool_invocation_id)
            if value:
                return f"{key}:{value}"
    return ""

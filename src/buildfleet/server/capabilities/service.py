"""The Capabilities service: what an instance supports, for clients and workers.

Clients (Bazel, buildbox-casd, buildbox-worker...) call GetCapabilities once at
start-up and adapt to the answer.  An unknown instance name is refused with
INVALID_ARGUMENT; buildbox-worker exits at start-up on that, which is intended:
a misconfigured worker should fail loudly rather than wait for work that never
comes.

Execution priorities (`ExecutionPolicy.priority`) are accepted in the range
EXECUTION_PRIORITY_MIN..EXECUTION_PRIORITY_MAX; as in REAPI, a *lower* value runs
*sooner*, and 0 is the default.  Cache priorities are not implemented: the only
accepted value is 0.  A priority outside the range is clamped to its nearer end
(REAPI lets a server clamp to the range it advertises), so a client asking for
-2**31 cannot jump ahead of everything else forever.
"""

from __future__ import annotations

import grpc

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet._proto.build.bazel.semver import semver_pb2
from buildfleet.server.instance import Instance, Instances
from buildfleet.server.rpc import add_service, rpc

# Bazel 4.2 refuses a server whose low version is above 2.0.
LOW_API_VERSION = semver_pb2.SemVer(major=2, minor=0)
HIGH_API_VERSION = semver_pb2.SemVer(major=2, minor=3)

# Lower runs first (REAPI ExecutionPolicy.priority); 0 is the default.
EXECUTION_PRIORITY_MIN = -1000
EXECUTION_PRIORITY_MAX = 1000


def clamp_priority(priority: int) -> int:
    """`priority` moved into the advertised execution priority range."""
    return min(max(priority, EXECUTION_PRIORITY_MIN), EXECUTION_PRIORITY_MAX)

_SHA256 = re_pb2.DigestFunction.SHA256
_ZSTD = re_pb2.Compressor.ZSTD


def server_capabilities(instance: Instance) -> re_pb2.ServerCapabilities:
    """The capabilities of one instance."""
    priority_range = re_pb2.PriorityCapabilities.PriorityRange
    cache = re_pb2.CacheCapabilities(
        digest_functions=[_SHA256],
        action_cache_update_capabilities=re_pb2.ActionCacheUpdateCapabilities(
            update_enabled=instance.action_cache.allow_updates),
        cache_priority_capabilities=re_pb2.PriorityCapabilities(
            priorities=[priority_range(min_priority=0, max_priority=0)]),
        max_batch_total_size_bytes=instance.max_batch_total_size,
        symlink_absolute_path_strategy=re_pb2.SymlinkAbsolutePathStrategy.ALLOWED,
        supported_compressors=[_ZSTD],
        supported_batch_update_compressors=[_ZSTD],
        max_cas_blob_size_bytes=instance.cas.max_blob_size,  # 0: no limit
        split_blob_support=False,
        splice_blob_support=False,
    )
    execution = re_pb2.ExecutionCapabilities(
        digest_function=_SHA256,
        digest_functions=[_SHA256],
        exec_enabled=instance.scheduler is not None,
        execution_priority_capabilities=re_pb2.PriorityCapabilities(
            priorities=[priority_range(min_priority=EXECUTION_PRIORITY_MIN,
                                       max_priority=EXECUTION_PRIORITY_MAX)]),
    )
    return re_pb2.ServerCapabilities(
        cache_capabilities=cache,
        execution_capabilities=execution,
        low_api_version=LOW_API_VERSION,
        high_api_version=HIGH_API_VERSION,
    )


class CapabilitiesService(re_grpc.CapabilitiesServicer):
    """build.bazel.remote.execution.v2.Capabilities."""

    FULL_NAME = "build.bazel.remote.execution.v2.Capabilities"

    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, re_pb2.DESCRIPTOR.services_by_name["Capabilities"])

    @rpc
    async def GetCapabilities(self, request: re_pb2.GetCapabilitiesRequest,
                              context: grpc.aio.ServicerContext) -> re_pb2.ServerCapabilities:
        return server_capabilities(self.instances.get(request.instance_name))

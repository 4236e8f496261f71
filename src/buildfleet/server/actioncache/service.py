"""The ActionCache service: action digest -> ActionResult over gRPC.

The domain logic (storage, completeness against the CAS, the missing-blob
error) lives in buildfleet.storage.action_cache; this module translates the
requests and handles inlining:

* The stored result never carries inline bytes.  UpdateActionResult moves any
  inline ``stdout_raw`` / ``stderr_raw`` / ``OutputFile.contents`` into the CAS
  and keeps only their digests (REAPI lets the server return "a modified but
  equivalent result"), so a stored entry stays small.
* GetActionResult inlines on request, from the CAS, as long as the total of the
  inlined bytes (stdout, then stderr, then the requested output files in result
  order) stays within the instance's ``max-inline-size``; what does not fit is
  left out, which the spec allows (the client downloads it by digest instead).
"""

from __future__ import annotations

import grpc

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet._proto.build.bazel.remote.execution.v2 import (
    remote_execution_pb2_grpc as re_grpc,
)
from buildfleet.digest import Digest, check_digest_function
from buildfleet.errors import InvalidArgument, NotFound, PermissionDenied
from buildfleet.server.instance import Instances
from buildfleet.server.rpc import add_service, rpc


def _check_digest(message: re_pb2.Digest, what: str) -> Digest:
    return Digest.from_proto(message, what)


def _validate_result(result: re_pb2.ActionResult) -> None:
    """INVALID_ARGUMENT naming the field of the first malformed digest."""
    for index, output in enumerate(result.output_files):
        _check_digest(output.digest,
                      f"action_result.output_files[{index}].digest (path {output.path!r})")
    for name in ("stdout_digest", "stderr_digest"):
        if result.HasField(name):
            _check_digest(getattr(result, name), f"action_result.{name}")
    for index, directory in enumerate(result.output_directories):
        where = f"action_result.output_directories[{index}]"
        has_tree = directory.HasField("tree_digest")
        has_root = directory.HasField("root_directory_digest")
        if not has_tree and not has_root:
            raise InvalidArgument(f"{where} (path {directory.path!r}): neither tree_digest "
                                  "nor root_directory_digest is set")
        if has_tree:
            _check_digest(directory.tree_digest,
                          f"{where}.tree_digest (path {directory.path!r})")
        if has_root:
            _check_digest(directory.root_directory_digest,
                          f"{where}.root_directory_digest (path {directory.path!r})")


class ActionCacheService(re_grpc.ActionCacheServicer):
    """build.bazel.remote.execution.v2.ActionCache."""

    FULL_NAME = "build.bazel.remote.execution.v2.ActionCache"

    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def register(self, server: grpc.aio.Server) -> None:
        add_service(server, self, re_pb2.DESCRIPTOR.services_by_name["ActionCache"])

    @rpc
    async def GetActionResult(self, request: re_pb2.GetActionResultRequest,
                              context: grpc.aio.ServicerContext) -> re_pb2.ActionResult:
        instance = self.instances.get(request.instance_name)
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, "action_digest")
        stored = await instance.action_cache.get(action_digest)
        if stored is None:
            raise NotFound(f"no action result for action {action_digest}")
        return await instance.action_cache.inlined(
            stored, action_digest, inline_stdout=request.inline_stdout,
            inline_stderr=request.inline_stderr, inline_paths=request.inline_output_files,
            limit=int(instance.settings.max_inline_size))

    @rpc
    async def UpdateActionResult(self, request: re_pb2.UpdateActionResultRequest,
                                 context: grpc.aio.ServicerContext) -> re_pb2.ActionResult:
        instance = self.instances.get(request.instance_name)
        if not instance.action_cache.allow_updates:
            raise PermissionDenied(f"the action cache of instance {instance.name!r} is "
                                   "read-only for clients")
        check_digest_function(request.digest_function)
        action_digest = Digest.from_proto(request.action_digest, "action_digest")
        # request.results_cache_policy is accepted and ignored: every entry is
        # kept alike (the advertised cache priority range is 0..0).
        result = re_pb2.ActionResult()
        result.CopyFrom(request.action_result)
        _validate_result(result)
        await instance.action_cache.externalize(result)
        await instance.action_cache.put(action_digest, result, check_blobs=True)
        return result

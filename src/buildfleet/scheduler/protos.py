"""Conversions between scheduler objects and REAPI / longrunning messages."""

from __future__ import annotations

from google.longrunning import operations_pb2
from google.protobuf.any_pb2 import Any as AnyProto
from google.rpc import status_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.scheduler.model import Operation, Properties

TYPE_PREFIX = "type.googleapis.com/"
EXECUTE_RESPONSE_URL = TYPE_PREFIX + re_pb2.ExecuteResponse.DESCRIPTOR.full_name
METADATA_URL = TYPE_PREFIX + re_pb2.ExecuteOperationMetadata.DESCRIPTOR.full_name
ACTION_URL = TYPE_PREFIX + re_pb2.Action.DESCRIPTOR.full_name
DIGEST_URL = TYPE_PREFIX + re_pb2.Digest.DESCRIPTOR.full_name
ACTION_RESULT_URL = TYPE_PREFIX + re_pb2.ActionResult.DESCRIPTOR.full_name


def execute_response(*, code: int = 0, message: str = "", result: re_pb2.ActionResult | None = None,
                     cached: bool = False) -> bytes:
    """A serialized ExecuteResponse."""
    response = re_pb2.ExecuteResponse(
        status=status_pb2.Status(code=code, message=message if code else ""),
        cached_result=cached, message=message)
    if result is not None:
        response.result.CopyFrom(result)
    return response.SerializeToString()


def operation_proto(operation: Operation) -> operations_pb2.Operation:
    """The google.longrunning.Operation a client sees for `operation`."""
    metadata = re_pb2.ExecuteOperationMetadata(stage=int(operation.stage))  # type: ignore[arg-type]
    metadata.action_digest.hash = operation.action_digest.hash
    metadata.action_digest.size_bytes = operation.action_digest.size_bytes
    metadata.digest_function = re_pb2.DigestFunction.SHA256
    partial = metadata.partial_execution_metadata
    partial.queued_timestamp.FromNanoseconds(int(operation.queued_at * 1e9))
    if operation.worker:
        partial.worker = operation.worker
    message = operations_pb2.Operation(
        name=operation.name, done=operation.done,
        metadata=AnyProto(type_url=METADATA_URL, value=metadata.SerializeToString()))
    if operation.done and operation.response is not None:
        message.response.CopyFrom(AnyProto(type_url=EXECUTE_RESPONSE_URL,
                                           value=operation.response))
    return message


def platform_requirements(platform: re_pb2.Platform) -> Properties:
    """The (name, value) pairs an action requires."""
    return frozenset((p.name, p.value) for p in platform.properties)

"""Stream names in the metadata of executing operations (ExecuteOperationMetadata
`stdout_stream_name` / `stderr_stream_name`)."""

from __future__ import annotations

from google.longrunning import operations_pb2

from buildfleet._proto.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from buildfleet.server.logstream.store import LogStreams

EXECUTING = re_pb2.ExecutionStage.EXECUTING


def with_stream_names(logs: LogStreams | None, instance_name: str,
                      message: operations_pb2.Operation) -> operations_pb2.Operation:
    """`message`, naming the streams of the action's output while it executes."""
    if logs is None or message.done:
        return message
    metadata = re_pb2.ExecuteOperationMetadata()
    metadata.ParseFromString(message.metadata.value)
    if metadata.stage != EXECUTING:
        return message
    digest = metadata.action_digest
    output = logs.for_action(instance_name, f"{digest.hash}/{digest.size_bytes}")
    if output is None:  # the server holds all the output it may: none streamed
        return message
    metadata.stdout_stream_name = output.stdout[0]
    metadata.stderr_stream_name = output.stderr[0]
    named = operations_pb2.Operation()
    named.CopyFrom(message)
    named.metadata.value = metadata.SerializeToString()
    return named
